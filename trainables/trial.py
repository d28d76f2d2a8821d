"""The Ray Tune function trainable: train one classifier and report validation metrics each epoch.

A trial receives its searched hyperparameters as the Tune ``config`` and everything fixed for the
experiment as a :class:`TrialSetup`. It imports nothing from the driver. Each epoch it predicts the
validation split, chooses the F2-maximising threshold there, and reports the metrics with a checkpoint
(the ``.keras`` model, the threshold and the validation scores).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["DEPTH_HYPERPARAMETERS", "HYPERPARAMETERS", "OPTIONAL_HYPERPARAMETERS", "TrialDivergedError", "TrialNotRetriedError", "TrialSetup",
           "train_classifier"]

logger = logging.getLogger(__name__)

HYPERPARAMETERS = ("backbone", "balancing", "augmentation_intensity", "learning_rate", "batch_size", "dropout",
                   "image_size")
"""Keys of a trial's config; every one is required."""

DEPTH_HYPERPARAMETERS = ("unfrozen_layers", "unfrozen_fraction")
"""Keys that set how many backbone weight layers train: a config has exactly one of them."""

OPTIONAL_HYPERPARAMETERS = {"smote_k": 5, "fine_tune_lr_multiplier": None}
"""Keys a trial's config may omit, with their defaults. ``smote_k`` only matters for ``smote`` balancing.
``fine_tune_lr_multiplier`` replaces ``TrialSetup.fine_tune_learning_rate_multiplier`` when it is not None."""

MODEL_FILE = "model.keras"
STATE_FILE = "state.json"
SCORES_FILE = "validation_scores.npy"


FATAL_ERROR_FILE = "lesiontune_fatal_error.txt"


class TrialDivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


class TrialNotRetriedError(RuntimeError):
    """A retry of a trial that already failed for a reason a retry cannot fix (a bad value, divergence)."""


@dataclass(frozen=True)
class TrialSetup:
    """Settings shared by every trial of one experiment (not searched)."""

    manifest_path: str
    cache_paths: dict[int, str]  # image size in pixels -> image cache folder
    max_epochs: int
    weights: str = "none"  # "imagenet", "none" or a folder of weight files
    objective: str = "pauc80"
    seed: int = 0
    cpus_per_trial: int = 1
    head_epochs: int = 1  # epochs that train only the head before pretrained layers unfreeze
    fine_tune_learning_rate_multiplier: float = 0.1
    specificity_target: float = 0.8
    sensitivity_target: float = 0.866
    mixed_precision: bool = False  # compute in float16 with float32 weights (Keras "mixed_float16" policy)
    jit_compile: bool | str = "auto"  # XLA compilation of the train step: "auto", True or False
    gpus_per_trial: float = 0.0  # GPUs that Ray reserves for the trial. A fraction below 1 caps its GPU memory.
    # The manifest file's bytes, read instead of ``manifest_path`` when set: a run folder in object storage
    # is not a path that trials can open.
    manifest_parquet: bytes | None = None

    @property
    def metric(self) -> str:
        """Name of the reported metric that the scheduler and searcher maximise."""
        return f"val_{self.objective}"


def _check_config(config: dict) -> None:
    missing = [key for key in HYPERPARAMETERS if key not in config]
    if missing:
        raise ValueError(f"Trial config is missing {', '.join(missing)}; it has {', '.join(sorted(config))}.")
    depth_keys = [key for key in DEPTH_HYPERPARAMETERS if key in config]
    if len(depth_keys) != 1:
        raise ValueError(f"Invalid trial config: it sets {len(depth_keys)} of unfrozen_layers and unfrozen_fraction, "
                         "but needs exactly one of them.")


def _unfrozen_depth(config: dict, weight_layers: int) -> int:
    """Return the number of top weight layers to train: -1 for every layer, 0 for a frozen backbone.

    ``unfrozen_fraction`` in [0, 1] is rounded to whole layers with Python's ``round`` (halves go to the
    even number), so 0.5 of MobileNetV2's 52 weight layers is 26.
    """
    if "unfrozen_fraction" in config:
        return round(float(config["unfrozen_fraction"]) * weight_layers)
    return int(config["unfrozen_layers"])


def _fine_tune_multiplier(config: dict, setup: TrialSetup) -> float:
    searched = config.get("fine_tune_lr_multiplier", OPTIONAL_HYPERPARAMETERS["fine_tune_lr_multiplier"])
    return setup.fine_tune_learning_rate_multiplier if searched is None else float(searched)


def _load_inputs(setup: TrialSetup, config: dict):
    """Read the manifest and the image cache; return (images, train, validation) with rows and labels."""
    from data.balancing import balance_rows
    from data.cache import open_image_cache
    from data.splits import read_manifest

    manifest = read_manifest(setup.manifest_path if setup.manifest_parquet is None else setup.manifest_parquet)
    size = int(config["image_size"])
    if size not in setup.cache_paths and str(size) not in setup.cache_paths:
        raise ValueError(f"No image cache for image_size {size} px; caches exist for {sorted(setup.cache_paths)}.")
    cache = open_image_cache(setup.cache_paths.get(size) or setup.cache_paths[str(size)])
    train = manifest[manifest["split"] == "train"]
    validation = manifest[manifest["split"] == "validation"]
    smote_k = int(config.get("smote_k", OPTIONAL_HYPERPARAMETERS["smote_k"]))
    balanced = balance_rows(train["cache_row"].to_numpy(), train["label"].to_numpy(),
                            method=config["balancing"], seed=setup.seed, images=cache.images, smote_k=smote_k)
    return cache.images, balanced, validation["cache_row"].to_numpy(), validation["label"].to_numpy()


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _epoch_report(metrics, *, epoch: int, loss: float, seconds: float, setup: TrialSetup,
                  trainable_layers: int) -> dict[str, object]:
    """Build the dict given to ``tune.report``; no NaN or infinity reaches the scheduler."""
    values = metrics.as_dict()
    report: dict[str, object] = {f"val_{key}": _finite_or_none(value) for key, value in values.items()}
    objective = values[setup.objective]
    # An undefined objective (one class in validation) is reported as the worst value, 0, and flagged.
    report[setup.metric] = float(objective) if math.isfinite(objective) else 0.0
    report["objective_defined"] = bool(math.isfinite(objective))
    report.update(epoch=epoch, train_loss=loss, epoch_seconds=seconds, trainable_weight_layers=trainable_layers)
    return report


def _setup_state(setup: TrialSetup) -> dict[str, object]:
    """Return the setup as saved in a checkpoint's ``state.json``, without the manifest's bytes."""
    return {key: value for key, value in asdict(setup).items() if key != "manifest_parquet"}


def _save_checkpoint(directory: Path, model, state: dict, scores: np.ndarray) -> None:
    model.save(directory / MODEL_FILE)
    np.save(directory / SCORES_FILE, scores.astype(np.float32))
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")


def train_classifier(config: dict, setup: TrialSetup) -> None:
    """Train one configuration for up to ``setup.max_epochs`` epochs, reporting after each.

    Use with ``tune.with_parameters(train_classifier, setup=...)``. Resumes from ``tune.get_checkpoint()``
    when Tune restores the trial. Tune retries a failed trial (``FailureConfig.max_failures``) because a
    worker may have died. A failure that a retry cannot fix leaves a marker in the trial folder, so the
    retry fails at once instead of training again.
    """
    started = time.perf_counter()
    from ray import tune

    from trainables.backbones import WeightsUnavailableError

    marker = Path(tune.get_context().get_trial_dir() or ".") / FATAL_ERROR_FILE
    if marker.is_file():
        raise TrialNotRetriedError(f"Not retried: {marker.read_text(encoding='utf-8')}")
    try:
        _train(config, setup, started=started)
    except (TrialDivergedError, WeightsUnavailableError, ValueError, FileNotFoundError) as error:
        marker.write_text(f"{type(error).__name__}: {error}", encoding="utf-8")
        raise


def _train(config: dict, setup: TrialSetup, *, started: float) -> None:
    import keras
    from ray import tune

    from data.augment import build_augmentation
    from data.pipeline import make_dataset
    from trainables.metrics import evaluate_scores
    from trainables.model import (Classifier, build_classifier, compile_classifier, configure_tensorflow,
                                  set_precision_policy, set_unfrozen_layers)

    _check_config(config)
    configure_tensorflow(cpus=setup.cpus_per_trial, gpus_per_trial=setup.gpus_per_trial)
    # A reused worker process still keeps the previous trial's models and layer-name counters.
    keras.backend.clear_session()
    set_precision_policy(mixed_precision=setup.mixed_precision)
    images, balanced, validation_rows, validation_labels = _load_inputs(setup, config)
    size, batch_size = int(config["image_size"]), int(config["batch_size"])
    learning_rate = float(config["learning_rate"])

    augmentation = build_augmentation(float(config["augmentation_intensity"]), image_size=size)
    train_data = make_dataset(images, balanced.rows, balanced.labels, batch_size=batch_size,
                              augmentation=augmentation, shuffle=True, seed=setup.seed,
                              sample_weights=balanced.sample_weights, partner_rows=balanced.partner_rows,
                              blend_weights=balanced.blend_weights)
    validation_data = make_dataset(images, validation_rows, validation_labels.astype(np.float32),
                                   batch_size=batch_size)

    classifier = build_classifier(backbone=config["backbone"], image_size=size, weights=setup.weights,
                                  dropout=float(config["dropout"]), seed=setup.seed)
    unfrozen = _unfrozen_depth(config, classifier.spec.weight_layers)
    start_epoch, phase, trainable_layers = 0, None, 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = json.loads((Path(directory) / STATE_FILE).read_text(encoding="utf-8"))
            model = keras.models.load_model(Path(directory) / MODEL_FILE)
        classifier = Classifier(model=model, backbone=model.get_layer("backbone"), spec=classifier.spec,
                                pretrained=classifier.pretrained)
        start_epoch, phase = int(state["epoch"]), state["phase"]
        # The restored model keeps its trainable flags, so the count of the saved phase still holds.
        trainable_layers = int(state["metrics"].get("trainable_weight_layers") or 0)
        logger.info("Resuming trial from its checkpoint after epoch %d", start_epoch)

    setup_seconds = time.perf_counter() - started
    for epoch in range(start_epoch, setup.max_epochs):
        head_only = classifier.pretrained and unfrozen != 0 and epoch < setup.head_epochs
        next_phase = "head" if head_only else "fine_tune"
        if next_phase != phase:
            trainable_layers = set_unfrozen_layers(classifier, 0 if head_only else unfrozen)
            rate = learning_rate
            if classifier.pretrained and not head_only and unfrozen != 0 and setup.head_epochs > 0:
                rate = learning_rate * _fine_tune_multiplier(config, setup)
            compile_classifier(classifier, learning_rate=rate, jit_compile=setup.jit_compile)
            phase = next_phase
            logger.info("Epoch %d: %s phase, %d backbone weight layers trainable, learning rate %.3g",
                        epoch + 1, phase, trainable_layers, rate)

        epoch_started = time.perf_counter()
        history = classifier.model.fit(train_data, epochs=epoch + 1, initial_epoch=epoch, shuffle=False, verbose=0)
        loss = float(history.history["loss"][-1])
        if not math.isfinite(loss):
            raise TrialDivergedError(
                f"Training loss became {loss} in epoch {epoch + 1} (learning rate {learning_rate:.3g}); "
                "the trial diverged. Lower the learning-rate range.")
        scores = classifier.model.predict(validation_data, verbose=0).ravel()
        if not np.all(np.isfinite(scores)):
            raise TrialDivergedError(f"Validation scores contain NaN after epoch {epoch + 1}; the trial diverged.")
        metrics = evaluate_scores(validation_labels, scores, specificity_target=setup.specificity_target,
                                  sensitivity_target=setup.sensitivity_target)
        report = _epoch_report(metrics, epoch=epoch + 1, loss=loss, seconds=time.perf_counter() - epoch_started,
                               setup=setup, trainable_layers=trainable_layers)
        report["setup_seconds"] = setup_seconds

        with tempfile.TemporaryDirectory(prefix="lesiontune-checkpoint-") as directory:
            state = {"epoch": epoch + 1, "phase": phase, "threshold": metrics.threshold,
                     "metrics": report, "config": config, "setup": _setup_state(setup)}
            _save_checkpoint(Path(directory), classifier.model, state, scores)
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(directory))
