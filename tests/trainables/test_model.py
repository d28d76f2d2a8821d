"""Tests for the classifier: preprocessing ranges, trainability, BatchNormalization and weights."""

import urllib.error

import keras
import numpy as np
import pytest

from trainables.backbones import BACKBONES, WeightsUnavailableError
from trainables.model import (BackbonePreprocessing, GpuMemoryPlan, build_classifier, compile_classifier,
                              configure_tensorflow, gpu_total_memory_mib, plan_gpu_memory, resolve_weights,
                              set_precision_policy, set_unfrozen_layers)

PIXELS = np.array([[[[0.0, 127.5, 255.0]]]], dtype=np.float32)  # (1, 1, 1, 3) RGB in [0, 255]


@pytest.mark.parametrize("name,module", [("MobileNetV2", "mobilenet_v2"), ("ResNet50", "resnet50"),
                                         ("VGG16", "vgg16"), ("Xception", "xception"),
                                         ("InceptionV3", "inception_v3")])
def test_preprocessing_matches_keras(name, module):
    expected = getattr(keras.applications, module).preprocess_input(PIXELS.copy())
    layer = BackbonePreprocessing(BACKBONES[name].preprocessing)
    assert np.allclose(keras.ops.convert_to_numpy(layer(PIXELS)), expected, atol=1e-4)


def _backbone_input_range(classifier):
    """Return (min, max) of what the backbone receives for inputs 0 and 255."""
    probe = keras.Model(classifier.model.input, classifier.model.get_layer("preprocessing").output)
    values = keras.ops.convert_to_numpy(probe(np.stack([np.zeros((32, 32, 3)), np.full((32, 32, 3), 255.0)])))
    return float(values.min()), float(values.max())


def test_backbone_receives_expected_range():
    mobilenet = build_classifier(backbone="MobileNetV2", image_size=32)
    efficientnet = build_classifier(backbone="EfficientNetV2B0", image_size=32)
    assert _backbone_input_range(mobilenet) == pytest.approx((-1.0, 1.0))
    # EfficientNetV2 rescales inside the model, so it receives raw pixels.
    assert _backbone_input_range(efficientnet) == pytest.approx((0.0, 255.0))
    rescaling = [l for l in efficientnet.backbone.layers if isinstance(l, keras.layers.Rescaling)]
    assert rescaling


def test_build_classifier_head_and_output():
    classifier = build_classifier(backbone="MobileNetV2", image_size=32, dropout=0.3)
    output = classifier.model.predict(np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3)).astype("float32"),
                                      verbose=0)
    assert output.shape == (2, 1)
    assert np.all((output >= 0) & (output <= 1))
    assert classifier.model.get_layer("dropout").rate == 0.3
    assert classifier.model.layers[-1].activation.__name__ == "sigmoid"


def test_scratch_batchnorm_momentum_and_trains():
    classifier = build_classifier(backbone="MobileNetV2", image_size=32, weights="none")
    norms = [l for l in classifier.backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert norms and all(l.momentum == 0.9 for l in norms)
    set_unfrozen_layers(classifier, 0)
    assert all(l.trainable for l in norms)
    compile_classifier(classifier, learning_rate=1e-3)
    images = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3)).astype("float32")
    before = [keras.ops.convert_to_numpy(w).copy() for w in norms[0].non_trainable_weights]
    classifier.model.fit(images, np.array([0, 1] * 4, dtype="float32"), epochs=1, verbose=0)
    after = [keras.ops.convert_to_numpy(w) for w in norms[0].non_trainable_weights]
    assert not np.allclose(before[0], after[0])


@pytest.fixture
def pretrained_classifier(tmp_path):
    """A MobileNetV2 loaded from a weights folder, as on an air-gapped cluster (random weights saved here)."""
    source = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(96, 96, 3))
    # keras.applications files are legacy HDF5; saving the whole model as .h5 writes that format.
    source.save(tmp_path / BACKBONES["MobileNetV2"].weights_file_for(96))
    return build_classifier(backbone="MobileNetV2", image_size=96, weights=str(tmp_path)), source


def test_weights_folder_loads_file(pretrained_classifier):
    classifier, source = pretrained_classifier
    assert classifier.pretrained
    first = classifier.backbone.layers[1].get_weights()[0]
    assert np.allclose(first, source.layers[1].get_weights()[0])


def test_unfrozen_layers_counts_weight_layers_batchnorm_frozen(pretrained_classifier):
    classifier, _ = pretrained_classifier
    frozen = set_unfrozen_layers(classifier, 0)
    compile_classifier(classifier, learning_rate=1e-3)
    head_weights = len(classifier.model.trainable_weights)
    unfrozen = set_unfrozen_layers(classifier, 5)
    compile_classifier(classifier, learning_rate=1e-4)
    assert frozen == 0
    assert unfrozen == 5
    assert len(classifier.model.trainable_weights) > head_weights
    norms = [l for l in classifier.backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert not any(l.trainable for l in norms)
    images = np.random.default_rng(1).integers(0, 255, (4, 96, 96, 3)).astype("float32")
    before = keras.ops.convert_to_numpy(norms[-1].moving_mean).copy()
    classifier.model.fit(images, np.array([0, 1, 0, 1], dtype="float32"), epochs=1, verbose=0)
    assert np.allclose(before, keras.ops.convert_to_numpy(norms[-1].moving_mean))
    assert set_unfrozen_layers(classifier, -1) == BACKBONES["MobileNetV2"].weight_layers


def test_weights_folder_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="Weights file vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"):
        resolve_weights(BACKBONES["VGG16"], str(tmp_path), 64)


def test_imagenet_offline_names_both_choices(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("keras.src.utils.file_utils.urlretrieve", no_network)
    with pytest.raises(WeightsUnavailableError, match="--weights none .*--weights DIR"):
        build_classifier(backbone="MobileNetV2", image_size=96, weights="imagenet")


def test_image_size_below_minimum():
    with pytest.raises(ValueError, match="Image size 64 px is below Xception's minimum of 71 px"):
        build_classifier(backbone="Xception", image_size=64)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="Unknown backbone 'ResNet5'"):
        build_classifier(backbone="ResNet5", image_size=64)


@pytest.mark.parametrize("gpus,total,growth,expected", [
    (0.5, 16000, True, GpuMemoryPlan("limit", 8000)),
    (0.25, 81559, True, GpuMemoryPlan("limit", 20389)),
    (1, 16000, True, GpuMemoryPlan("growth")),
    (2, 16000, True, GpuMemoryPlan("growth")),
    (0.5, None, True, GpuMemoryPlan("growth")),
    (0, None, False, GpuMemoryPlan("default")),
])
def test_plan_gpu_memory_fraction_limits(gpus, total, growth, expected):
    assert plan_gpu_memory(gpus_per_trial=gpus, total_memory_mib=total, memory_growth=growth) == expected


class _FakeGpu:
    name = "/physical_device:GPU:0"


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make TensorFlow report one GPU and record the memory settings applied to it."""
    import tensorflow as tf

    calls = []
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [_FakeGpu()] if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", lambda gpu, on: calls.append(("growth", on)))
    monkeypatch.setattr(tf.config, "set_logical_device_configuration",
                        lambda gpu, configs: calls.append(("limit", configs[0].memory_limit)))
    monkeypatch.setattr("trainables.model.gpu_total_memory_mib", lambda: 16000)
    return calls


def test_configure_tensorflow_fractional_gpu_limit(fake_gpu):
    plan = configure_tensorflow(cpus=1, gpus_per_trial=0.5)
    assert plan == GpuMemoryPlan("limit", 8000)
    assert fake_gpu == [("limit", 8000)]


def test_configure_tensorflow_whole_gpu_growth(fake_gpu):
    plan = configure_tensorflow(cpus=1, gpus_per_trial=1)
    assert plan == GpuMemoryPlan("growth")
    assert fake_gpu == [("growth", True)]


def test_configure_tensorflow_without_gpu():
    assert configure_tensorflow(cpus=1, gpus_per_trial=0.5) is None


def test_gpu_total_memory_without_nvidia_smi(monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert gpu_total_memory_mib() is None


def test_set_precision_policy_mixed_head_float32():
    try:
        set_precision_policy(mixed_precision=True)
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
        classifier = build_classifier(backbone="MobileNetV2", image_size=32)
        assert classifier.model.layers[-1].dtype_policy.compute_dtype == "float32"
        assert classifier.model.output.dtype == "float32"
    finally:
        set_precision_policy(mixed_precision=False)
    assert keras.mixed_precision.global_policy().name == "float32"
