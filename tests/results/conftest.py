"""A synthetic run folder laid out as a lesiontune search writes it, built without Ray.

The run has 48 generated PNG images in 24 groups of 2 (one patient each) and a real image cache at
32 px. Every checkpoint's ``model.keras`` is one small Keras classifier (pixels in [0, 255], backbone
preprocessing layer, one convolution, sigmoid). The four trials are:

- ``aaaa1111``: 2 epochs, objective 0.05 then 0.08, checkpoints after both epochs (best: epoch 2);
- ``bbbb2222``: 2 epochs, objective 0.06 then 0.04, checkpoints after both epochs (best: epoch 1);
- ``cccc3333``: 1 epoch, objective 0.01, stopped early by ASHA;
- ``dddd4444``: 1 epoch reported, then failed (``error.txt``), no checkpoint.

Groups 0-7 are training, 8-15 validation and 16-23 test. Groups whose number is a multiple of 3 are
positive, so the test split has 4 positive and 12 negative images.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from data.cache import build_image_cache
from data.io import write_json_atomic, write_parquet_atomic

IMAGE_SIZE = 32
GROUPS = 24
IMAGES_PER_GROUP = 2
SEXES = ("female", "male", None)
AGES = (25.0, 45.0, 65.0, 80.0, None)
SITES = ("back", "face", None)

TRIALS = {
    # trial id: (hyperparameters, objective per epoch, checkpoint epochs, stopped early, error)
    "aaaa1111": ({"balancing": "oversample", "learning_rate": 1e-3, "augmentation_intensity": 0.3, "batch_size": 16,
                  "dropout": 0.2}, [0.05, 0.08], [1, 2], False, None),
    "bbbb2222": ({"balancing": "none", "learning_rate": 2e-4, "augmentation_intensity": 0.8, "batch_size": 32,
                  "dropout": 0.1}, [0.06, 0.04], [1, 2], False, None),
    "cccc3333": ({"balancing": "class_weight", "learning_rate": 3e-5, "augmentation_intensity": 0.1, "batch_size": 16,
                  "dropout": 0.4}, [0.01], [1], True, None),
    "dddd4444": ({"balancing": "undersample", "learning_rate": 5e-3, "augmentation_intensity": 0.5, "batch_size": 32,
                  "dropout": 0.3}, [0.02], [], False, "TrialDivergedError: Training loss became nan in epoch 2"),
}


def _write_images(folder: Path) -> pd.DataFrame:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for index in range(GROUPS * IMAGES_PER_GROUP):
        group = index // IMAGES_PER_GROUP
        label = int(group % 3 == 0)
        pixels = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
        pixels[..., 0] = np.clip(pixels[..., 0].astype(int) + 80 * label, 0, 255)
        path = folder / f"IMG_{index:03d}.png"
        Image.fromarray(pixels).save(path)
        split = ("train", "validation", "test")[group // 8]
        rows.append({"image_id": path.stem, "path": str(path), "label": label, "group": f"patient_{group:02d}",
                     "diagnosis": "melanoma" if label else "nevus", "sex": SEXES[group % 3],
                     "age_approx": AGES[group % 5], "anatom_site": SITES[index % 3], "split": split})
    return pd.DataFrame(rows)


def _config(data_path: Path, objective: str) -> dict:
    return {
        "version": 1,
        "data": {"path": str(data_path), "layout": "class-folders", "positive_class": "melanoma",
                 "validation_fraction": 0.15, "test_fraction": 0.15, "cache_dir": None},
        "search": {"name": "synthetic", "objective": objective, "num_samples": 4, "max_epochs": 2, "grace_period": 1,
                   "reduction_factor": 2, "seed": 0, "max_concurrent_trials": None, "storage_path": None},
        "training": {"weights": "none", "head_epochs": 1, "fine_tune_learning_rate_multiplier": 0.1,
                     "specificity_target": 0.8, "sensitivity_target": 0.866},
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
        "space": {"backbone": "MobileNetV2", "balancing": ["none", "class_weight", "undersample", "oversample"],
                  "unfrozen_layers": -1, "augmentation_intensity": {"low": 0.0, "high": 1.0, "log": False},
                  "learning_rate": {"low": 1e-5, "high": 1e-2, "log": True}, "batch_size": [16, 32, 64],
                  "dropout": {"low": 0.0, "high": 0.5, "log": False}, "image_size": IMAGE_SIZE},
    }


def _result_line(trial_id: str, epoch: int, objective: str, value: float, config: dict) -> dict:
    return {"trial_id": trial_id, "epoch": epoch, "training_iteration": epoch, f"val_{objective}": value,
            "val_auc": 0.5 + value, "val_sensitivity": 0.75, "val_specificity": 0.5, "val_f2": 0.6,
            "val_threshold": 0.5, "train_loss": 0.7 - 0.1 * epoch, "epoch_seconds": 3.0,
            "time_total_s": 3.0 * epoch, "trainable_weight_layers": 52, "config": config}


def _write_trials(run_dir: Path, objective: str, cache_path: Path, model_file: Path,
                  validation_scores: np.ndarray) -> None:
    for number, (trial_id, (params, values, checkpoint_epochs, _, error)) in enumerate(TRIALS.items(), start=1):
        config = {"backbone": "MobileNetV2", "unfrozen_layers": -1, "image_size": IMAGE_SIZE, **params}
        folder_name = f"train_classifier_{trial_id}_{number}_balancing={params['balancing']}_2026-01-01_00-00-00"
        trial_dir = run_dir / folder_name
        trial_dir.mkdir()
        (trial_dir / "params.json").write_text(json.dumps(config), encoding="utf-8")
        lines = [_result_line(trial_id, epoch, objective, value, config) for epoch, value in enumerate(values, 1)]
        (trial_dir / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
        if error:
            (trial_dir / "error.txt").write_text(f"Traceback (most recent call last):\n{error}\n", encoding="utf-8")
        for epoch in checkpoint_epochs:
            checkpoint = trial_dir / f"checkpoint_{epoch - 1:06d}"
            checkpoint.mkdir()
            shutil.copyfile(model_file, checkpoint / "model.keras")
            np.save(checkpoint / "validation_scores.npy", validation_scores.astype(np.float32))
            threshold = float(np.quantile(validation_scores, 0.5 - 0.1 * epoch))
            metrics = {f"val_{objective}": values[epoch - 1], "val_auc": 0.5 + values[epoch - 1],
                       "val_sensitivity": 0.75, "val_specificity": 0.5, "val_threshold": threshold}
            state = {"epoch": epoch, "phase": "fine_tune", "threshold": threshold, "metrics": metrics,
                     "config": config, "setup": {"manifest_path": str(run_dir / "manifest.parquet"),
                                                 "cache_paths": {str(IMAGE_SIZE): str(cache_path)}}}
            (checkpoint / "state.json").write_text(json.dumps(state), encoding="utf-8")


def make_run(root: Path, name: str, *, objective: str, images: pd.DataFrame, cache_path: Path, model_file: Path,
             validation_scores: np.ndarray) -> Path:
    """Write a run folder ``root/name`` over the given images, cache and model file."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    data_path = Path(images["path"].iloc[0]).parent
    (run_dir / "lesiontune_config.yaml").write_text(yaml.safe_dump(_config(data_path, objective), sort_keys=False),
                                                     encoding="utf-8")
    manifest = images.assign(label=images["label"].astype(np.int8), cache_row=np.arange(len(images)))
    manifest["split"] = pd.Categorical(manifest["split"], categories=["train", "validation", "test"])
    write_parquet_atomic(manifest, run_dir / "manifest.parquet")
    write_parquet_atomic(pd.DataFrame({"image_id": ["IMG_900", "IMG_901", "IMG_902"],
                                       "reason": ["no diagnosis", "no diagnosis", "unreadable image: file not found"]}),
                         run_dir / "exclusions.parquet")
    write_json_atomic({"root": str(data_path), "layout": "class-folders", "group_column": "patient_id",
                       "images": len(images), "positive": int(images["label"].sum()),
                       "negative": int((images["label"] == 0).sum()), "excluded": 3,
                       "excluded_by_reason": {"no diagnosis": 2, "unreadable image: file not found": 1},
                       "cache_paths": {str(IMAGE_SIZE): str(cache_path)}},
                      run_dir / "data_summary.json")
    _write_trials(run_dir, objective, cache_path, model_file, validation_scores)
    return run_dir


def _tiny_classifier():
    """Build a small convolutional classifier with the interface of trainables.model.build_classifier.

    A MobileNetV2 from scratch gives the same score (0.5) for every image, because its pooled features
    are about 1e-13 before training, which would make score comparisons meaningless.
    """
    import keras

    from trainables.model import BackbonePreprocessing

    keras.utils.set_random_seed(0)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), dtype="float32", name="pixels")
    features = BackbonePreprocessing("tf", name="preprocessing")(inputs)
    features = keras.layers.Conv2D(8, 3, activation="relu")(features)
    features = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="melanoma_probability",
                                 kernel_initializer=keras.initializers.RandomNormal(stddev=3.0, seed=0))(features)
    return keras.Model(inputs, outputs, name="tiny_classifier")


@pytest.fixture(scope="session")
def run_inputs(tmp_path_factory) -> dict:
    """Images, their 32 px cache, a saved tiny model and its validation scores, shared by every run."""
    from results.predict import predict_scores

    root = tmp_path_factory.mktemp("inputs")
    images = _write_images(root / "images")
    cache = build_image_cache(images["path"].tolist(), images["image_id"].tolist(), image_size=IMAGE_SIZE,
                              cache_root=root / "cache", workers=1, progress=False)
    model = _tiny_classifier()
    model_file = root / "model.keras"
    model.save(model_file)
    validation_rows = np.flatnonzero((images["split"] == "validation").to_numpy())
    scores = predict_scores(model, cache.images, validation_rows)
    return {"images": images, "cache_path": cache.path, "model_file": model_file, "validation_scores": scores}


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory, run_inputs) -> Path:
    """A run folder that tests only read (see the module docstring)."""
    return make_run(tmp_path_factory.mktemp("runs"), "synthetic", objective="pauc80", **run_inputs)


@pytest.fixture
def fresh_run(tmp_path, run_inputs) -> Path:
    """A run folder of the test's own, which the test may change."""
    return make_run(tmp_path, "fresh", objective="pauc80", **run_inputs)


@pytest.fixture(scope="session")
def evaluated_run(tmp_path_factory, run_inputs) -> Path:
    """A run folder evaluated once on its test split (top 2 trials, 50 resamples)."""
    from results.evaluate import evaluate_run

    run_dir = make_run(tmp_path_factory.mktemp("evaluated"), "evaluated", objective="pauc80", **run_inputs)
    evaluate_run(run_dir, top=2, resamples=50, seed=0)
    return run_dir
