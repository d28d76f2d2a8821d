"""Tests for the YAML experiment format and its validation."""

import pytest

from spaces.config import ConfigError, load_config


def _write(tmp_path, text: str):
    path = tmp_path / "experiment.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_config_defaults_cover_five_factors():
    config = load_config(overrides={"training": {"weights": "imagenet"}})
    for name in ("backbone", "balancing", "unfrozen_layers", "augmentation_intensity", "learning_rate"):
        assert config.space[name].kind in ("choice", "range"), name
    assert config.space["learning_rate"].log


def test_load_config_yaml_narrows_space(tmp_path):
    path = _write(tmp_path, """
version: 1
search: {num_samples: 4, max_epochs: 3}
space:
  backbone: [MobileNetV2, ResNet50]
  balancing: oversample
  learning_rate: {low: 1.0e-4, high: 1.0e-3, log: true}
  image_size: [64, 96]
""")
    config = load_config(path)
    assert config.search["num_samples"] == 4
    assert config.space["backbone"].values == ("MobileNetV2", "ResNet50")
    assert config.space["balancing"].kind == "fixed"
    assert config.space["image_size"].values == (64, 96)
    assert (config.space["learning_rate"].low, config.space["learning_rate"].high) == (1e-4, 1e-3)


def test_load_config_overrides_win(tmp_path):
    path = _write(tmp_path, "search: {num_samples: 4}\n")
    config = load_config(path, overrides={"search": {"num_samples": 9}})
    assert config.search["num_samples"] == 9


def test_load_config_scratch_fixes_depth():
    config = load_config(overrides={"training": {"weights": "none"}})
    assert config.space["unfrozen_layers"].values == (-1,)


def test_load_config_default_depth_fits_backbones():
    config = load_config(overrides={"training": {"weights": "imagenet"}, "space": {"backbone": ["VGG16"]}})
    assert config.space["unfrozen_layers"].high == 13


def test_load_config_round_trip(tmp_path):
    config = load_config(overrides={"space": {"backbone": ["MobileNetV2"]}})
    import yaml

    path = _write(tmp_path, yaml.safe_dump(config.to_dict()))
    assert load_config(path).to_dict() == config.to_dict()


@pytest.mark.parametrize("text,message", [
    ("serch: {num_samples: 3}\n", r"unknown key 'serch'. Allowed keys here: version, data, search"),
    ("search: {num_sample: 3}\n", r"unknown key 'search.num_sample'"),
    ("space: {learning_rate: {low: 0.1, high: 0.001}}\n", r"space.learning_rate: low 0.1 is greater than high 0.001"),
    ("space: {dropout: {low: 0, high: 0.5, log: true}}\n", r"space.dropout: a log range needs low > 0, got 0.0"),
    ("space: {backbone: [ResNet5]}\n", r"invalid value 'ResNet5' for space.backbone\[0\]: expected one of VGG16"),
    ("space: {backbone: []}\n", r"expected a non-empty list of choices"),
    ("space: {batch_size: [32, 'big']}\n", r"invalid value 'big' for space.batch_size\[1\]"),
    ("space: {augmentation_intensity: {low: 0, high: 1.5}}\n", r"space.augmentation_intensity.high: expected a number in"),
    ("search: {objective: accuracy}\n", r"invalid value 'accuracy' for search.objective"),
    ("search: {grace_period: 5, max_epochs: 2}\n", r"grace_period 5 exceeds search.max_epochs 2"),
    ("space: {backbone: [Xception], image_size: [64]}\n", r"image size 64 px .* below Xception's minimum of 71 px"),
    ("version: 2\n", r"unsupported version 2"),
    ("- a\n- b\n", r"expected a mapping of sections"),
])
def test_load_config_errors_name_key_and_value(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_load_config_depth_beyond_backbones(tmp_path):
    path = _write(tmp_path, "training: {weights: imagenet}\nspace: {backbone: [VGG16], unfrozen_layers: {low: 0, high: 50}}\n")
    with pytest.raises(ConfigError, match="reaches 50, but the chosen backbones have at most 13 weight layers"):
        load_config(path)


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="Cannot read experiment file"):
        load_config(tmp_path / "absent.yaml")


def test_load_config_points_to_evaluate(tmp_path):
    path = _write(tmp_path, """
training: {weights: imagenet}
space: {backbone: [ResNet50, MobileNetV2]}
search:
  points_to_evaluate:
    - {backbone: ResNet50, balancing: class_weight, unfrozen_layers: 20, learning_rate: 1.0e-4}
""")
    points = load_config(path).search["points_to_evaluate"]
    assert points == [{"backbone": "ResNet50", "balancing": "class_weight", "unfrozen_layers": 20,
                       "learning_rate": 1e-4}]


@pytest.mark.parametrize("point,message", [
    ("{backbone: VGG16}", r"search.points_to_evaluate\[0\].backbone: expected a value inside space.backbone"),
    ("{learning_rate: 1.0}", r"search.points_to_evaluate\[0\].learning_rate: expected a value inside"),
    ("{lr: 0.001}", r"unknown parameter 'lr' in search.points_to_evaluate\[0\]"),
])
def test_load_config_points_outside_space(tmp_path, point, message):
    path = _write(tmp_path, f"space: {{backbone: [ResNet50]}}\nsearch: {{points_to_evaluate: [{point}]}}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_load_config_smote_k_default_and_range(tmp_path):
    assert load_config().space["smote_k"].values == (5,)
    assert "smote" in load_config().space["balancing"].values
    config = load_config(_write(tmp_path, "space: {balancing: smote, smote_k: {low: 3, high: 9}}\n"))
    assert (config.space["smote_k"].kind, config.space["smote_k"].low, config.space["smote_k"].high) == ("range", 3, 9)
    assert config.space["smote_k"].is_integer


def test_load_config_gpu_training_defaults():
    training = load_config().training
    assert training["mixed_precision"] is False
    assert training["jit_compile"] == "auto"


def test_load_config_gpu_training_settings(tmp_path):
    config = load_config(_write(tmp_path, "training: {mixed_precision: true, jit_compile: false}\n"))
    assert config.training["mixed_precision"] is True
    assert config.training["jit_compile"] is False


@pytest.mark.parametrize("text,message", [
    ("space: {smote_k: 0}\n", r"invalid value 0 for space.smote_k: expected an integer >= 1"),
    ("training: {mixed_precision: yes please}\n", r"invalid value 'yes please' for training.mixed_precision: expected true"),
    ("training: {jit_compile: xla}\n", r"invalid value 'xla' for training.jit_compile: expected auto, true or false"),
    ("training: {jit_compile: 1}\n", r"invalid value 1 for training.jit_compile"),
])
def test_load_config_gpu_and_smote_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_load_config_gpu_memory_default_and_value(tmp_path):
    assert load_config().resources["gpu_memory_gib"] is None
    assert load_config(_write(tmp_path, "resources: {gpu_memory_gib: 80}\n")).resources["gpu_memory_gib"] == 80
    assert load_config(overrides={"resources": {"gpu_memory_gib": 23.5}}).resources["gpu_memory_gib"] == 23.5


@pytest.mark.parametrize("text,message", [
    ("resources: {gpu_memory_gib: 0}\n", r"invalid value 0 for resources.gpu_memory_gib: expected null .* or a number "
                                         r"of GiB > 0"),
    ("resources: {gpu_memory_gib: -8}\n", r"invalid value -8 for resources.gpu_memory_gib"),
    ("resources: {gpu_memory_gib: 80GB}\n", r"invalid value '80GB' for resources.gpu_memory_gib"),
    ("resources: {gpu_memory_gib: true}\n", r"invalid value True for resources.gpu_memory_gib"),
    ("resources: {gpu_memory_gib: .inf}\n", r"invalid value inf for resources.gpu_memory_gib"),
])
def test_load_config_gpu_memory_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_load_config_rung_quorum(tmp_path):
    assert load_config().search["rung_quorum"] is None
    assert load_config(_write(tmp_path, "search: {rung_quorum: 1}\n")).search["rung_quorum"] == 1


@pytest.mark.parametrize("value", ["0", "-2", "2.5", "true", "many"])
def test_load_config_rung_quorum_errors(tmp_path, value):
    with pytest.raises(ConfigError, match=r"for search.rung_quorum: expected null \(the reduction factor"):
        load_config(_write(tmp_path, f"search: {{rung_quorum: {value}}}\n"))


def test_load_config_optional_parameters_absent_by_default():
    space = load_config(overrides={"training": {"weights": "imagenet"}}).space
    assert "unfrozen_fraction" not in space
    assert "fine_tune_lr_multiplier" not in space
    assert "unfrozen_layers" in space


def test_load_config_unfrozen_fraction_replaces_layers(tmp_path):
    path = _write(tmp_path, "training: {weights: imagenet}\nspace: {unfrozen_fraction: {low: 0.0, high: 0.5}}\n")
    config = load_config(path)
    fraction = config.space["unfrozen_fraction"]
    assert (fraction.kind, fraction.low, fraction.high) == ("range", 0.0, 0.5)
    assert not fraction.is_integer
    assert "unfrozen_layers" not in config.space
    assert "unfrozen_layers" not in config.to_dict()["space"]


def test_load_config_unfrozen_fraction_round_trip(tmp_path):
    import yaml

    config = load_config(overrides={"training": {"weights": "imagenet"}, "space": {"unfrozen_fraction": [0.25, 0.5]}})
    path = _write(tmp_path, yaml.safe_dump(config.to_dict()))
    assert load_config(path).to_dict() == config.to_dict()


def test_load_config_scratch_fixes_fraction():
    config = load_config(overrides={"training": {"weights": "none"}, "space": {"unfrozen_fraction": {"low": 0.0, "high": 0.5}}})
    assert config.space["unfrozen_fraction"].values == (1.0,)
    assert "unfrozen_layers" not in config.space


def test_load_config_fine_tune_multiplier_log_range(tmp_path):
    path = _write(tmp_path, "space: {fine_tune_lr_multiplier: {low: 0.01, high: 1.0, log: true}}\n")
    multiplier = load_config(path).space["fine_tune_lr_multiplier"]
    assert (multiplier.kind, multiplier.low, multiplier.high, multiplier.log) == ("range", 0.01, 1.0, True)


@pytest.mark.parametrize("text,message", [
    ("space: {unfrozen_layers: 5, unfrozen_fraction: 0.5}\n",
     r"space.unfrozen_layers and space.unfrozen_fraction are both set"),
    ("space: {unfrozen_layers: {low: 0, high: 40}, unfrozen_fraction: [0.1, 0.2]}\n",
     r"space.unfrozen_layers and space.unfrozen_fraction are both set.*Remove one of them"),
    ("space: {unfrozen_fraction: 1.5}\n", r"invalid value 1.5 for space.unfrozen_fraction: expected a number in \[0, 1\]"),
    ("space: {unfrozen_fraction: [0.1, -0.1]}\n", r"invalid value -0.1 for space.unfrozen_fraction\[1\]"),
    ("space: {unfrozen_fraction: 'half'}\n", r"invalid value 'half' for space.unfrozen_fraction: expected a number"),
    ("space: {fine_tune_lr_multiplier: 0}\n",
     r"invalid value 0.0 for space.fine_tune_lr_multiplier: expected a number in \(0, 1\]"),
    ("space: {fine_tune_lr_multiplier: {low: 0.1, high: 2.0}}\n", r"space.fine_tune_lr_multiplier.high: expected a number"),
    ("space: {fine_tune_lr_multiplier: {low: 0.0, high: 0.5, log: true}}\n",
     r"invalid value 0.0 for space.fine_tune_lr_multiplier.low"),
])
def test_load_config_optional_parameter_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_load_config_fraction_point_rejects_layers(tmp_path):
    path = _write(tmp_path, """
training: {weights: imagenet}
space: {unfrozen_fraction: {low: 0.0, high: 0.5}}
search: {points_to_evaluate: [{unfrozen_layers: 20}]}
""")
    with pytest.raises(ConfigError, match=r"unknown parameter 'unfrozen_layers' in search.points_to_evaluate\[0\]"):
        load_config(path)
