import pickle

import optuna
import pytest
from ray.tune.search.optuna import OptunaSearch

from spaces.config import _PARAMETER_KINDS, load_config
from spaces.tune_space import _DRAW_ORDER, ConditionalSpace, active_parameters

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _draws(config, count=60, sampler=None):
    study = optuna.create_study(direction="maximize", sampler=sampler or optuna.samplers.RandomSampler(seed=0))
    space = ConditionalSpace(config)
    configs = []
    for _ in range(count):
        trial = study.ask()
        fixed = space(trial)
        configs.append({**trial.params, **fixed})
        study.tell(trial, 0.5)
    return configs


def _config(**space):
    base = {"backbone": ["MobileNetV2", "ResNet50"], "balancing": ["none", "smote", "class_weight"],
            "image_size": [224]}
    return load_config(overrides={"training": {"weights": "imagenet"}, "space": {**base, **space}})


def test_draw_order_covers_every_parameter():
    assert set(_DRAW_ORDER) == set(_PARAMETER_KINDS)


def test_smote_k_drawn_only_for_smote():
    configs = _draws(_config(smote_k={"low": 2, "high": 8}))

    smote = [c for c in configs if c["balancing"] == "smote"]
    other = [c for c in configs if c["balancing"] != "smote"]
    assert smote and other
    assert all(2 <= c["smote_k"] <= 8 for c in smote)
    assert all("smote_k" not in c for c in other)


def test_fixed_smote_k_only_with_smote():
    configs = _draws(_config())

    assert all(c["smote_k"] == 5 for c in configs if c["balancing"] == "smote")
    assert all("smote_k" not in c for c in configs if c["balancing"] != "smote")


def test_multiplier_skipped_for_frozen_backbone():
    configs = _draws(_config(unfrozen_layers={"low": 0, "high": 3}, fine_tune_lr_multiplier={"low": 0.01, "high": 1.0}),
                     count=80)

    frozen = [c for c in configs if c["unfrozen_layers"] == 0]
    unfrozen = [c for c in configs if c["unfrozen_layers"] != 0]
    assert frozen and unfrozen
    assert all("fine_tune_lr_multiplier" not in c for c in frozen)
    assert all(0.01 <= c["fine_tune_lr_multiplier"] <= 1.0 for c in unfrozen)


def test_multiplier_skipped_when_fraction_rounds_to_zero():
    values = {"backbone": "MobileNetV2", "balancing": "none", "unfrozen_fraction": 0.005}

    assert active_parameters(values, pretrained=True, head_epochs=1) == set()
    assert active_parameters({**values, "unfrozen_fraction": 0.5}, pretrained=True, head_epochs=1) == {
        "fine_tune_lr_multiplier"}


@pytest.mark.parametrize(("weights", "head_epochs"), [("none", 1), ("imagenet", 0)])
def test_multiplier_never_drawn_without_head_phase(weights, head_epochs):
    config = load_config(overrides={
        "training": {"weights": weights, "head_epochs": head_epochs},
        "space": {"backbone": ["MobileNetV2"], "image_size": [224], "unfrozen_layers": {"low": 1, "high": 5},
                  "fine_tune_lr_multiplier": {"low": 0.01, "high": 1.0}},
    })

    configs = _draws(config, count=10)

    assert all("fine_tune_lr_multiplier" not in c for c in configs)


def test_fixed_values_returned_not_recorded():
    config = _config(batch_size=32, dropout=0.2)
    study = optuna.create_study(direction="maximize")
    trial = study.ask()

    fixed = ConditionalSpace(config)(trial)

    assert fixed["batch_size"] == 32
    assert fixed["dropout"] == 0.2
    assert "batch_size" not in trial.params
    assert "learning_rate" in trial.params


def test_space_survives_pickle():
    space = ConditionalSpace(_config(smote_k={"low": 2, "high": 8}))

    restored = pickle.loads(pickle.dumps(space))

    assert restored.space == space.space
    assert restored.pretrained is True


def test_optuna_search_suggests_conditional_config():
    searcher = OptunaSearch(space=ConditionalSpace(_config(smote_k={"low": 2, "high": 8})), metric="val_pauc80",
                            mode="max", sampler=optuna.samplers.RandomSampler(seed=1))

    suggestions = [searcher.suggest(f"trial_{i}") for i in range(30)]

    assert {s["balancing"] for s in suggestions} == {"none", "smote", "class_weight"}
    for suggestion in suggestions:
        assert ("smote_k" in suggestion) == (suggestion["balancing"] == "smote")
        assert suggestion["image_size"] == 224


def test_tpe_learns_over_conditional_space():
    config = _config(smote_k={"low": 2, "high": 8})
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=5)

    configs = _draws(config, count=20, sampler=sampler)

    assert len(configs) == 20
    assert all(("smote_k" in c) == (c["balancing"] == "smote") for c in configs)
