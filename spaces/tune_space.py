"""Turn a validated search space into what Ray Tune's searchers take.

Two forms exist. :func:`to_param_space` gives Tune's ``param_space`` (every parameter always drawn),
which random search uses. :class:`ConditionalSpace` is an Optuna define-by-run function for
``OptunaSearch(space=...)``: it draws a parameter only where it changes the trial, so TPE does not
model values that have no effect, and the trial's config has no key for them. The conditions:

- ``smote_k`` only when ``balancing`` is ``smote``;
- ``fine_tune_lr_multiplier`` only when some backbone layers train after the head phase, which needs
  pretrained weights, ``training.head_epochs`` above 0 and an unfrozen depth that is not 0 layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray import tune

from spaces.config import ExperimentConfig, Parameter
from trainables.backbones import get_backbone

__all__ = ["ConditionalSpace", "active_parameters", "to_param_space"]

# Parameters that a trial's config carries only when their condition holds.
CONDITIONAL_PARAMETERS = ("smote_k", "fine_tune_lr_multiplier")

# The order in which the define-by-run function draws parameters. A conditional one comes after
# the parameters that its condition reads.
_DRAW_ORDER = ("backbone", "balancing", "smote_k", "image_size", "batch_size", "learning_rate", "dropout",
               "augmentation_intensity", "unfrozen_layers", "unfrozen_fraction", "fine_tune_lr_multiplier")


def _domain(parameter: Parameter) -> Any:
    if parameter.kind == "fixed":
        return parameter.values[0]
    if parameter.kind == "choice":
        return tune.choice(list(parameter.values))
    if parameter.is_integer:
        # tune.randint excludes its upper bound; the YAML range includes it.
        if parameter.log:
            return tune.lograndint(int(parameter.low), int(parameter.high) + 1)
        return tune.randint(int(parameter.low), int(parameter.high) + 1)
    if parameter.log:
        return tune.loguniform(float(parameter.low), float(parameter.high))
    return tune.uniform(float(parameter.low), float(parameter.high))


def to_param_space(space: Mapping[str, Parameter]) -> dict[str, Any]:
    """Return ``{name: tune domain or fixed value}`` for every searched parameter."""
    return {name: _domain(parameter) for name, parameter in space.items()}


def active_parameters(values: Mapping[str, Any], *, pretrained: bool, head_epochs: int) -> set[str]:
    """Return the conditional parameters that change a trial with these values.

    Args:
        values: the trial's other parameters; it needs ``balancing`` and ``backbone``, and
            ``unfrozen_layers`` or ``unfrozen_fraction``.
        pretrained: whether the backbone starts from pretrained weights (not from scratch).
        head_epochs: epochs that train only the head before the chosen layers unfreeze.
    """
    active = set()
    if values.get("balancing") == "smote":
        active.add("smote_k")
    if pretrained and head_epochs > 0 and _unfrozen_layers(values) != 0:
        active.add("fine_tune_lr_multiplier")
    return active


def _unfrozen_layers(values: Mapping[str, Any]) -> int:
    """Return the trial's unfrozen depth in layers, rounded as the trial rounds a fraction."""
    if "unfrozen_fraction" in values:
        return round(float(values["unfrozen_fraction"]) * get_backbone(values["backbone"]).weight_layers)
    return int(values.get("unfrozen_layers", 0))


class ConditionalSpace:
    """Optuna define-by-run search space that skips parameters without effect.

    An instance is a module-level class with plain fields, so OptunaSearch can pickle it with its
    state and a resumed search draws from the same space.

    Args:
        config: the validated experiment. Its space, ``training.weights`` and ``training.head_epochs``
            decide which parameters are drawn.
    """

    def __init__(self, config: ExperimentConfig):
        self.space = dict(config.space)
        self.pretrained = config.training["weights"] != "none"
        self.head_epochs = int(config.training["head_epochs"])

    def __call__(self, trial) -> dict[str, Any]:
        """Draw one configuration with ``trial.suggest_*``; return the fixed values, which Optuna does not record."""
        drawn: dict[str, Any] = {}
        fixed: dict[str, Any] = {}
        for name in _DRAW_ORDER:
            parameter = self.space.get(name)
            if parameter is None:
                continue
            if name in CONDITIONAL_PARAMETERS:
                known = {**drawn, **fixed}
                if name not in active_parameters(known, pretrained=self.pretrained, head_epochs=self.head_epochs):
                    continue
            if parameter.kind == "fixed":
                fixed[name] = parameter.values[0]
            else:
                drawn[name] = _suggest(trial, parameter)
        return fixed

    def __repr__(self) -> str:
        return f"ConditionalSpace({', '.join(self.space)})"


def _suggest(trial, parameter: Parameter) -> Any:
    if parameter.kind == "choice":
        return trial.suggest_categorical(parameter.name, list(parameter.values))
    if parameter.is_integer:
        return trial.suggest_int(parameter.name, int(parameter.low), int(parameter.high), log=parameter.log)
    return trial.suggest_float(parameter.name, float(parameter.low), float(parameter.high), log=parameter.log)
