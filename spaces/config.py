"""The YAML experiment format: parse, validate and resolve it into typed settings.

A file sets any of five sections; every key is optional and defaults to the values below::

    version: 1
    data:       {path: null, layout: auto, positive_class: melanoma, validation_fraction: 0.15, test_fraction: 0.15,
                 cache_dir: null}
    search:     {name: null, objective: pauc80, num_samples: 20, max_epochs: 8, grace_period: 1,
                 reduction_factor: 2, seed: 0, max_concurrent_trials: null, storage_path: null, max_failures: 2,
                 points_to_evaluate: [], algorithm: tpe, scheduler: asha, rung_quorum: null, reuse_workers: true}
    training:   {weights: none, head_epochs: 1, fine_tune_learning_rate_multiplier: 0.1,
                 specificity_target: 0.8, sensitivity_target: 0.866, mixed_precision: false, jit_compile: auto}
    resources:  {cpus_per_trial: 1, gpus_per_trial: 0, gpu_memory_gib: null}
    space:      {backbone: [...], balancing: [...], unfrozen_layers: {low: 0, high: 40}, ..., smote_k: 5,
                 unfrozen_fraction: null, fine_tune_lr_multiplier: null}

In ``space`` a list is a categorical choice, a mapping ``{low, high, log}`` a range (integer when the
parameter is an integer), and a scalar a fixed value. Every error names the key path, the value and
what is allowed. A ``null`` optional parameter (``unfrozen_fraction``, ``fine_tune_lr_multiplier``) is
not searched and is absent from the resolved space.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from data.balancing import DEFAULT_SMOTE_K
from trainables import BALANCING_METHODS, OBJECTIVES
from trainables.backbones import BACKBONES, get_backbone

__all__ = ["ConfigError", "ExperimentConfig", "Parameter", "default_config_dict", "load_config"]

CONFIG_VERSION = 1
POSITIVE_CLASSES = ("melanoma", "malignant")
LAYOUTS = ("auto", "isic-cli", "ham10000", "isic2020", "isic2019", "class-folders")
ALGORITHMS = ("tpe", "random")
SCHEDULERS = ("asha", "fifo")


class ConfigError(ValueError):
    """An invalid experiment setting; the message names the key path, the value and the fix."""


def default_config_dict() -> dict[str, Any]:
    """Return the default experiment as a plain dict in the YAML format."""
    return {
        "version": CONFIG_VERSION,
        "data": {"path": None, "layout": "auto", "positive_class": "melanoma",
                 "validation_fraction": 0.15, "test_fraction": 0.15, "cache_dir": None},
        "search": {"name": None, "objective": "pauc80", "num_samples": 20, "max_epochs": 8, "grace_period": 1,
                   "reduction_factor": 2, "seed": 0, "max_concurrent_trials": None, "storage_path": None,
                   "max_failures": 2, "points_to_evaluate": [], "algorithm": "tpe", "scheduler": "asha",
                   "rung_quorum": None, "reuse_workers": True},
        "training": {"weights": "none", "head_epochs": 1, "fine_tune_learning_rate_multiplier": 0.1,
                     "specificity_target": 0.8, "sensitivity_target": 0.866, "mixed_precision": False,
                     "jit_compile": "auto"},
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "gpu_memory_gib": None},
        "space": {
            "backbone": ["MobileNetV2", "EfficientNetV2B0", "ResNet50", "VGG16", "Xception", "InceptionV3"],
            "balancing": list(BALANCING_METHODS),
            "unfrozen_layers": {"low": 0, "high": 40},
            "augmentation_intensity": {"low": 0.0, "high": 1.0},
            "learning_rate": {"low": 1.0e-5, "high": 1.0e-2, "log": True},
            "batch_size": [16, 32, 64],
            "dropout": {"low": 0.0, "high": 0.5},
            "image_size": [224],
            "smote_k": DEFAULT_SMOTE_K,
            "unfrozen_fraction": None,
            "fine_tune_lr_multiplier": None,
        },
    }


# Kind of each searched parameter: (python type, description of allowed values).
_PARAMETER_KINDS: dict[str, tuple[type, str]] = {
    "backbone": (str, f"one of {', '.join(BACKBONES)}"),
    "balancing": (str, f"one of {', '.join(BALANCING_METHODS)}"),
    "unfrozen_layers": (int, "an integer >= -1 (-1: every layer, 0: frozen backbone)"),
    "augmentation_intensity": (float, "a number in [0, 1]"),
    "learning_rate": (float, "a number > 0"),
    "batch_size": (int, "an integer >= 1"),
    "dropout": (float, "a number in [0, 1)"),
    "image_size": (int, "an integer number of pixels >= 32"),
    "smote_k": (int, "an integer >= 1 (nearest minority neighbours for smote balancing)"),
    "unfrozen_fraction": (float, "a number in [0, 1] (share of the backbone's weight layers that train)"),
    "fine_tune_lr_multiplier": (float, "a number in (0, 1] (learning-rate factor after the head phase)"),
}

# Parameters that may be null in the YAML; a null one is left out of the space.
_OPTIONAL_PARAMETERS = ("unfrozen_fraction", "fine_tune_lr_multiplier")


@dataclass(frozen=True)
class Parameter:
    """One searched parameter: a fixed value, a categorical choice, or a numeric range."""

    name: str
    kind: str  # "fixed", "choice" or "range"
    values: tuple[Any, ...] = ()  # the fixed value (one) or the choices
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False

    @property
    def is_integer(self) -> bool:
        return _PARAMETER_KINDS[self.name][0] is int

    def candidates(self) -> tuple[Any, ...]:
        """Return the values a trial can take, or the range bounds for a range."""
        return self.values if self.kind != "range" else (self.low, self.high)


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated experiment: data, search budget, training settings, resources and the space."""

    data: dict[str, Any]
    search: dict[str, Any]
    training: dict[str, Any]
    resources: dict[str, Any]
    space: dict[str, Parameter]

    def to_dict(self) -> dict[str, Any]:
        """Return the resolved config in the YAML format, ready to save beside the results."""
        space: dict[str, Any] = {}
        for name, parameter in self.space.items():
            if parameter.kind == "fixed":
                space[name] = parameter.values[0]
            elif parameter.kind == "choice":
                space[name] = list(parameter.values)
            else:
                space[name] = {"low": parameter.low, "high": parameter.high, "log": parameter.log}
        return {"version": CONFIG_VERSION, "data": dict(self.data), "search": dict(self.search),
                "training": dict(self.training), "resources": dict(self.resources), "space": space}


def _fail(source: str, key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{source}: invalid value {value!r} for {key}: expected {allowed}.")


def _merge(base: dict[str, Any], override: Mapping[str, Any], source: str, path: str = "") -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base``, rejecting keys that ``base`` does not have."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        key_path = f"{path}{key}"
        if key not in base:
            allowed = ", ".join(str(k) for k in base)
            raise ConfigError(f"{source}: unknown key {key_path!r}. Allowed keys here: {allowed}.")
        if isinstance(base[key], dict) and key != "space" and path != "space.":
            if not isinstance(value, Mapping):
                raise _fail(source, key_path, value, "a mapping of settings")
            merged[key] = _merge(base[key], value, source, f"{key_path}.")
        elif key == "space":
            if not isinstance(value, Mapping):
                raise _fail(source, key_path, value, "a mapping from parameter names to values, lists or ranges")
            merged[key] = _merge(base[key], value, source, "space.")
        else:
            merged[key] = value
    return merged


def _check_scalar(name: str, value: Any, key: str, source: str) -> Any:
    python_type, allowed = _PARAMETER_KINDS[name]
    if python_type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(source, key, value, allowed)
    elif python_type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _fail(source, key, value, allowed)
        value = float(value)
    elif not isinstance(value, str):
        raise _fail(source, key, value, allowed)

    ok = {
        "backbone": lambda v: v in BACKBONES,
        "balancing": lambda v: v in BALANCING_METHODS,
        "unfrozen_layers": lambda v: v >= -1,
        "augmentation_intensity": lambda v: 0.0 <= v <= 1.0,
        "learning_rate": lambda v: v > 0,
        "batch_size": lambda v: v >= 1,
        "dropout": lambda v: 0.0 <= v < 1.0,
        "image_size": lambda v: v >= 32,
        "smote_k": lambda v: v >= 1,
        "unfrozen_fraction": lambda v: 0.0 <= v <= 1.0,
        "fine_tune_lr_multiplier": lambda v: 0.0 < v <= 1.0,
    }[name](value)
    if not ok:
        raise _fail(source, key, value, allowed)
    return value


def _parse_parameter(name: str, spec: Any, source: str) -> Parameter:
    key = f"space.{name}"
    if isinstance(spec, list):
        if not spec:
            raise _fail(source, key, spec, "a non-empty list of choices")
        values = tuple(_check_scalar(name, v, f"{key}[{i}]", source) for i, v in enumerate(spec))
        if len(set(values)) != len(values):
            raise _fail(source, key, spec, "a list without repeated choices")
        return Parameter(name, "fixed", values) if len(values) == 1 else Parameter(name, "choice", values)
    if isinstance(spec, Mapping):
        if name in ("backbone", "balancing"):
            raise _fail(source, key, dict(spec), "a list of choices or one value (it is categorical)")
        unknown = set(spec) - {"low", "high", "log"}
        if unknown or "low" not in spec or "high" not in spec:
            raise _fail(source, key, dict(spec), "a range {low: ..., high: ..., log: true|false}")
        low = _check_scalar(name, spec["low"], f"{key}.low", source)
        high = _check_scalar(name, spec["high"], f"{key}.high", source)
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise _fail(source, f"{key}.log", log, "true or false")
        if low > high:
            raise ConfigError(f"{source}: invalid range for {key}: low {low!r} is greater than high {high!r}. "
                              "Swap them or fix the typo.")
        if log and low <= 0:
            raise ConfigError(f"{source}: invalid range for {key}: a log range needs low > 0, got {low!r}. "
                              "Use a small positive low such as 1e-6, or log: false.")
        if low == high:
            return Parameter(name, "fixed", (low,))
        return Parameter(name, "range", low=low, high=high, log=log)
    return Parameter(name, "fixed", (_check_scalar(name, spec, key, source),))


def _check_setting(source: str, key: str, value: Any, valid: bool, allowed: str) -> None:
    if not valid:
        raise _fail(source, key, value, allowed)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_sections(merged: dict[str, Any], source: str) -> None:
    data, search, training, resources = merged["data"], merged["search"], merged["training"], merged["resources"]
    check = lambda key, value, valid, allowed: _check_setting(source, key, value, valid, allowed)  # noqa: E731

    check("data.layout", data["layout"], data["layout"] in LAYOUTS, f"one of {', '.join(LAYOUTS)}")
    check("data.positive_class", data["positive_class"], data["positive_class"] in POSITIVE_CLASSES,
          "'melanoma' or 'malignant'")
    for name in ("validation_fraction", "test_fraction"):
        value = data[name]
        check(f"data.{name}", value, _is_number(value) and 0 < value < 0.5, "a fraction in (0, 0.5)")
    check("search.objective", search["objective"], search["objective"] in OBJECTIVES, f"one of {', '.join(OBJECTIVES)}")
    for name in ("num_samples", "max_epochs", "grace_period"):
        check(f"search.{name}", search[name], _is_int(search[name]) and search[name] >= 1, "an integer >= 1")
    check("search.reduction_factor", search["reduction_factor"],
          _is_number(search["reduction_factor"]) and search["reduction_factor"] > 1, "a number > 1")
    check("search.seed", search["seed"], _is_int(search["seed"]), "an integer")
    check("search.algorithm", search["algorithm"], search["algorithm"] in ALGORITHMS,
          "tpe (Optuna's TPE sampler) or random (uniform draws, a baseline)")
    check("search.scheduler", search["scheduler"], search["scheduler"] in SCHEDULERS,
          "asha (stop weak trials early) or fifo (every trial runs max_epochs)")
    quorum = search["rung_quorum"]
    check("search.rung_quorum", quorum, quorum is None or (_is_int(quorum) and quorum >= 1),
          "null (the reduction factor, rounded up) or an integer >= 1 (results an ASHA rung needs before a trial "
          "passes it; 1 decides each trial when it arrives)")
    check("search.reuse_workers", search["reuse_workers"], isinstance(search["reuse_workers"], bool),
          "true (a finished trial's worker process runs the next trial) or false (a new process per trial)")
    check("search.max_failures", search["max_failures"], _is_int(search["max_failures"]) and search["max_failures"] >= 0,
          "an integer >= 0 (retries of a trial whose worker died)")
    for name in ("name", "storage_path"):
        check(f"search.{name}", search[name], search[name] is None or (isinstance(search[name], str) and search[name]),
              "null or a non-empty string")
    if search["name"] and ("/" in search["name"] or search["name"].startswith(".")):
        raise _fail(source, "search.name", search["name"], "a folder name without '/' that does not start with '.'")
    for name in ("path", "cache_dir"):
        check(f"data.{name}", data[name], data[name] is None or (isinstance(data[name], str) and data[name]),
              "null or a path")
    limit = search["max_concurrent_trials"]
    check("search.max_concurrent_trials", limit, limit is None or (_is_int(limit) and limit >= 1),
          "null (derived from the resources) or an integer >= 1")
    if search["grace_period"] > search["max_epochs"]:
        raise ConfigError(f"{source}: search.grace_period {search['grace_period']} exceeds search.max_epochs "
                          f"{search['max_epochs']}: ASHA cannot stop a trial before its grace period ends.")
    weights = training["weights"]
    check("training.weights", weights, isinstance(weights, str) and bool(weights),
          "'imagenet', 'none' or a folder of pre-downloaded weight files")
    check("training.head_epochs", training["head_epochs"],
          _is_int(training["head_epochs"]) and training["head_epochs"] >= 0, "an integer >= 0")
    multiplier = training["fine_tune_learning_rate_multiplier"]
    check("training.fine_tune_learning_rate_multiplier", multiplier, _is_number(multiplier) and 0 < multiplier <= 1,
          "a number in (0, 1]")
    for name in ("specificity_target", "sensitivity_target"):
        check(f"training.{name}", training[name], _is_number(training[name]) and 0 < training[name] < 1,
              "a number in (0, 1)")
    check("training.mixed_precision", training["mixed_precision"], isinstance(training["mixed_precision"], bool),
          "true or false")
    jit_compile = training["jit_compile"]
    check("training.jit_compile", jit_compile, isinstance(jit_compile, bool) or jit_compile == "auto",
          "auto, true or false")
    cpus, gpus = resources["cpus_per_trial"], resources["gpus_per_trial"]
    check("resources.cpus_per_trial", cpus, _is_number(cpus) and cpus > 0, "a number > 0")
    check("resources.gpus_per_trial", gpus, _is_number(gpus) and gpus >= 0, "a number >= 0 (fractions pack trials)")
    gpu_memory = resources["gpu_memory_gib"]
    check("resources.gpu_memory_gib", gpu_memory, gpu_memory is None or (_is_number(gpu_memory) and gpu_memory > 0),
          "null (read with nvidia-smi where the search starts) or a number of GiB > 0, the memory of one GPU "
          "on the nodes that run trials")


def _check_backbone_sizes(space: dict[str, Parameter], source: str) -> None:
    sizes = space["image_size"].candidates()
    for name in space["backbone"].candidates():
        spec = get_backbone(name)
        smallest = min(sizes)
        if smallest < spec.min_image_size:
            raise ConfigError(f"{source}: image size {smallest} px in space.image_size is below {name}'s minimum of "
                              f"{spec.min_image_size} px. Raise the image size or drop {name} from space.backbone.")
    if "unfrozen_layers" not in space:
        return
    depth = space["unfrozen_layers"]
    deepest = max(get_backbone(n).weight_layers for n in space["backbone"].candidates())
    if max(depth.candidates()) > deepest:
        raise ConfigError(
            f"{source}: space.unfrozen_layers reaches {max(depth.candidates())}, but the chosen backbones have at most "
            f"{deepest} weight layers. Use at most {deepest}, or -1 for every layer.")


def _check_points(points: Any, space: dict[str, Parameter], source: str) -> list[dict[str, Any]]:
    """Validate the configurations TPE evaluates first: known keys, values inside the space."""
    if not isinstance(points, list):
        raise _fail(source, "search.points_to_evaluate", points, "a list of mappings from parameter names to values")
    checked = []
    for index, point in enumerate(points):
        key = f"search.points_to_evaluate[{index}]"
        if not isinstance(point, Mapping):
            raise _fail(source, key, point, "a mapping from parameter names to values")
        resolved = {}
        for name, value in point.items():
            if name not in space:
                raise ConfigError(f"{source}: unknown parameter {name!r} in {key}. Allowed: {', '.join(space)}.")
            value = _check_scalar(name, value, f"{key}.{name}", source)
            parameter = space[name]
            inside = (parameter.low <= value <= parameter.high) if parameter.kind == "range" else value in parameter.values
            if not inside:
                raise _fail(source, f"{key}.{name}", value, f"a value inside space.{name} ({parameter.candidates()})")
            if parameter.kind != "fixed":
                resolved[name] = value
        checked.append(resolved)
    return checked


def _fit_default_depth(merged: dict[str, Any]) -> None:
    """Cap the default unfrozen-depth range at the deepest chosen backbone, so defaults are always valid."""
    if "unfrozen_layers" not in merged["space"]:
        return
    if merged["space"]["unfrozen_layers"] != default_config_dict()["space"]["unfrozen_layers"]:
        return
    backbones = merged["space"]["backbone"]
    names = backbones if isinstance(backbones, list) else [backbones]
    known = [BACKBONES[n].weight_layers for n in names if n in BACKBONES]
    if known:
        merged["space"]["unfrozen_layers"] = {"low": 0, "high": min(40, max(known))}


def _space_keys(settings: Mapping[str, Any]) -> set[str]:
    """Return the space parameters that a YAML file or the command line sets, including those set to null."""
    space = settings.get("space")
    return set(space) if isinstance(space, Mapping) else set()


def _choose_depth_parameter(merged: dict[str, Any], explicit: set[str], source: str) -> None:
    """Drop ``unfrozen_layers`` from the space when ``unfrozen_fraction`` sets the depth instead."""
    if merged["space"]["unfrozen_fraction"] is None:
        return
    if "unfrozen_layers" in explicit:
        raise ConfigError(f"{source}: space.unfrozen_layers and space.unfrozen_fraction are both set, but both choose "
                          "how many backbone layers train. Remove one of them.")
    del merged["space"]["unfrozen_layers"]


def _fix_depth_for_scratch(space: dict[str, Parameter]) -> None:
    """Fix the unfrozen depth to every layer, because a network trained from scratch trains every layer.

    A searched depth would only add noise to the search.
    """
    everything = {"unfrozen_layers": -1, "unfrozen_fraction": 1.0}
    for name, value in everything.items():
        if name in space and space[name] != Parameter(name, "fixed", (value,)):
            space[name] = Parameter(name, "fixed", (value,))


def load_config(path: str | os.PathLike | None = None, *, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML experiment (or the defaults), apply command-line overrides, validate and resolve it.

    Args:
        path: a YAML file in the format above, or None for the defaults.
        overrides: nested settings from the command line, in the same format; they win over the file.
    """
    merged = default_config_dict()
    explicit: set[str] = set()
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(f"Cannot read experiment file {path}: {error.strerror}.") from error
        except yaml.YAMLError as error:
            raise ConfigError(f"Experiment file {path} is not valid YAML: {error}") from error
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: expected a mapping of sections (data, search, ...), got {type(loaded).__name__}.")
        version = loaded.get("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ConfigError(f"{path}: unsupported version {version!r}; this lesiontune reads version {CONFIG_VERSION}.")
        merged = _merge(merged, loaded, source)
        explicit |= _space_keys(loaded)
    if overrides:
        merged = _merge(merged, overrides, "command line")
        explicit |= _space_keys(overrides)

    source = str(path) if path is not None else "command line"
    _validate_sections(merged, source)
    _choose_depth_parameter(merged, explicit, source)
    _fit_default_depth(merged)
    space = {name: _parse_parameter(name, merged["space"][name], source) for name in _PARAMETER_KINDS
             if name in merged["space"] and not (name in _OPTIONAL_PARAMETERS and merged["space"][name] is None)}
    _check_backbone_sizes(space, source)
    if merged["training"]["weights"] == "none":
        _fix_depth_for_scratch(space)
    merged["search"]["points_to_evaluate"] = _check_points(merged["search"]["points_to_evaluate"], space, source)
    return ExperimentConfig(data=merged["data"], search=merged["search"], training=merged["training"],
                            resources=merged["resources"], space=space)

