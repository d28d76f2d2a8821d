"""The Tune trainable, run outside Ray with tune's session functions replaced by recorders."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data.cache import build_image_cache
from data.splits import write_manifest
from trainables import trial as trial_module
from trainables.trial import TrialDivergedError, TrialNotRetriedError, TrialSetup, train_classifier

CONFIG = {"backbone": "MobileNetV2", "balancing": "oversample", "unfrozen_layers": -1,
          "augmentation_intensity": 0.5, "learning_rate": 1e-3, "batch_size": 8, "dropout": 0.1, "image_size": 32}


class FakeSession:
    """Records tune.report calls and copies each checkpoint, as Tune would."""

    def __init__(self, trial_dir: Path):
        self.trial_dir = trial_dir
        self.reports: list[dict] = []
        self.checkpoints: list[Path] = []
        self.restore_from = None

    def report(self, metrics, *, checkpoint=None):
        assert all(not (isinstance(v, float) and not math.isfinite(v)) for v in metrics.values())
        self.reports.append(dict(metrics))
        target = self.trial_dir / f"checkpoint_{len(self.checkpoints):06d}"
        checkpoint.to_directory(str(target))
        self.checkpoints.append(target)

    def get_checkpoint(self):
        from ray import tune

        return tune.Checkpoint.from_directory(str(self.restore_from)) if self.restore_from else None

    def get_context(self):
        trial_dir = self.trial_dir

        class Context:
            def get_trial_dir(self):
                return str(trial_dir)

        return Context()


@pytest.fixture
def session(tmp_path, monkeypatch):
    from ray import tune

    fake = FakeSession(tmp_path / "trial")
    fake.trial_dir.mkdir()
    monkeypatch.setattr(tune, "report", fake.report)
    monkeypatch.setattr(tune, "get_checkpoint", fake.get_checkpoint)
    monkeypatch.setattr(tune, "get_context", fake.get_context)
    return fake


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> TrialSetup:
    folder = tmp_path_factory.mktemp("trial-data")
    rng = np.random.default_rng(0)
    rows = []
    for index in range(48):
        label = int(index % 4 == 0)
        pixels = rng.integers(0, 80, (40, 40, 3)) + (120 if label else 0)
        path = folder / f"img{index}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        rows.append({"image_id": f"img{index}", "path": str(path), "label": label, "group": f"g{index}"})
    records = pd.DataFrame(rows)
    cache = build_image_cache(records["path"].tolist(), records["image_id"].tolist(), image_size=32,
                              cache_root=folder / "cache", workers=1, progress=False)
    records["cache_row"] = [cache.row_of(i) for i in records["image_id"]]
    split = pd.Series(["train"] * 32 + ["validation"] * 16)
    write_manifest(records, split, folder / "manifest.parquet")
    return TrialSetup(manifest_path=str(folder / "manifest.parquet"), cache_paths={32: str(cache.path)}, max_epochs=2)


def test_train_classifier_reports_each_epoch(session, setup):
    train_classifier(dict(CONFIG), setup)
    assert [r["epoch"] for r in session.reports] == [1, 2]
    report = session.reports[-1]
    assert 0.0 <= report["val_pauc80"] <= 0.2
    assert report["objective_defined"] is True
    state = json.loads((session.checkpoints[-1] / "state.json").read_text())
    assert state["epoch"] == 2
    assert 0.0 <= state["threshold"] <= 1.0
    assert np.load(session.checkpoints[-1] / "validation_scores.npy").shape == (16,)
    assert (session.checkpoints[-1] / "model.keras").is_file()


def test_train_classifier_resumes_from_checkpoint(session, setup):
    train_classifier(dict(CONFIG), TrialSetup(**{**setup.__dict__, "max_epochs": 1}))
    session.restore_from = session.checkpoints[-1]
    session.reports.clear()
    train_classifier(dict(CONFIG), setup)
    assert [r["epoch"] for r in session.reports] == [2]
    assert session.reports[0]["trainable_weight_layers"] == 52


def test_train_classifier_nan_loss_fails_once(session, setup, monkeypatch):
    import keras

    def diverging_fit(self, *args, **kwargs):
        history = keras.callbacks.History()
        history.history = {"loss": [float("nan")]}
        return history

    monkeypatch.setattr(keras.Model, "fit", diverging_fit)
    with pytest.raises(TrialDivergedError, match="Training loss became nan in epoch 1"):
        train_classifier(dict(CONFIG), setup)
    assert session.reports == []
    with pytest.raises(TrialNotRetriedError, match="Not retried: TrialDivergedError"):
        train_classifier(dict(CONFIG), setup)


def test_train_classifier_missing_key(session, setup):
    config = {k: v for k, v in CONFIG.items() if k != "dropout"}
    with pytest.raises(ValueError, match="Trial config is missing dropout"):
        train_classifier(config, setup)
    assert (session.trial_dir / trial_module.FATAL_ERROR_FILE).is_file()


def test_train_classifier_smote_mixed_precision(session, setup, monkeypatch):
    import keras

    from trainables import model as model_module

    seen = {}
    original_compile, original_build = model_module.compile_classifier, model_module.build_classifier

    def recording_compile(classifier, *, learning_rate, jit_compile="auto"):
        seen["jit_compile"] = jit_compile
        original_compile(classifier, learning_rate=learning_rate, jit_compile=jit_compile)

    def recording_build(**kwargs):
        seen["policy"] = keras.mixed_precision.global_policy().name
        return original_build(**kwargs)

    monkeypatch.setattr(model_module, "compile_classifier", recording_compile)
    monkeypatch.setattr(model_module, "build_classifier", recording_build)
    gpu_setup = TrialSetup(**{**setup.__dict__, "max_epochs": 1, "mixed_precision": True, "jit_compile": False})
    try:
        train_classifier({**CONFIG, "balancing": "smote", "smote_k": 2}, gpu_setup)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert seen == {"jit_compile": False, "policy": "mixed_float16"}
    assert [r["epoch"] for r in session.reports] == [1]


def test_train_classifier_xla_mixed_precision_on_cpu(session, setup, monkeypatch):
    """XLA and mixed precision really compile and train here, on the CPU, not only with TensorFlow faked."""
    import keras

    from trainables import model as model_module

    compiled = []
    original_compile = model_module.compile_classifier

    def recording_compile(classifier, *, learning_rate, jit_compile="auto"):
        original_compile(classifier, learning_rate=learning_rate, jit_compile=jit_compile)
        compiled.append((classifier.model.jit_compile, classifier.model.dtype_policy.name))

    monkeypatch.setattr(model_module, "compile_classifier", recording_compile)
    xla_setup = TrialSetup(**{**setup.__dict__, "max_epochs": 1, "mixed_precision": True, "jit_compile": True})
    try:
        train_classifier(CONFIG, xla_setup)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert compiled == [(True, "mixed_float16")]
    assert [r["epoch"] for r in session.reports] == [1]
    assert session.reports[0]["val_auc"] is None or 0.0 <= session.reports[0]["val_auc"] <= 1.0


@pytest.fixture(scope="module")
def weights_folder(tmp_path_factory) -> Path:
    """A folder with random MobileNetV2 weights under the ImageNet file name, as on an air-gapped cluster."""
    import keras

    from trainables.backbones import BACKBONES

    folder = tmp_path_factory.mktemp("weights")
    source = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    # keras.applications files are legacy HDF5; saving the whole model as .h5 writes that format.
    source.save(folder / BACKBONES["MobileNetV2"].weights_file_for(32))
    return folder


@pytest.mark.parametrize("searched,expected_multiplier", [({"fine_tune_lr_multiplier": 0.5}, 0.5), ({}, 0.1)])
def test_train_classifier_fraction_and_multiplier(session, setup, weights_folder, monkeypatch, searched,
                                                  expected_multiplier):
    import keras

    from trainables import model as model_module

    rates = []
    original_compile = model_module.compile_classifier

    def recording_compile(classifier, *, learning_rate, jit_compile="auto"):
        original_compile(classifier, learning_rate=learning_rate, jit_compile=jit_compile)
        rates.append(float(keras.ops.convert_to_numpy(classifier.model.optimizer.learning_rate)))

    monkeypatch.setattr(model_module, "compile_classifier", recording_compile)
    pretrained = TrialSetup(**{**setup.__dict__, "weights": str(weights_folder), "head_epochs": 1})
    config = {k: v for k, v in CONFIG.items() if k != "unfrozen_layers"}
    train_classifier({**config, "unfrozen_fraction": 0.5, **searched}, pretrained)

    assert [r["trainable_weight_layers"] for r in session.reports] == [0, round(0.5 * 52)]
    assert rates == pytest.approx([1e-3, 1e-3 * expected_multiplier])


def test_train_classifier_fraction_zero_keeps_frozen(session, setup, weights_folder):
    pretrained = TrialSetup(**{**setup.__dict__, "weights": str(weights_folder), "max_epochs": 1})
    config = {k: v for k, v in CONFIG.items() if k != "unfrozen_layers"}
    train_classifier({**config, "unfrozen_fraction": 0.0}, pretrained)
    assert session.reports[-1]["trainable_weight_layers"] == 0


def test_train_classifier_both_depth_keys(session, setup):
    with pytest.raises(ValueError, match="it sets 2 of unfrozen_layers and unfrozen_fraction, but needs exactly one"):
        train_classifier({**CONFIG, "unfrozen_fraction": 0.5}, setup)
