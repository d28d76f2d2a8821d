"""Typed Parquet export of a run."""

import pyarrow.parquet as pq

from results.export import EPOCH_SCHEMA, TRIAL_SCHEMA, export_run


def test_export_run_twice_identical(synthetic_run):
    export_run(synthetic_run)
    first = (synthetic_run / "trials.parquet").read_bytes(), (synthetic_run / "epochs.parquet").read_bytes()
    export_run(synthetic_run)
    second = (synthetic_run / "trials.parquet").read_bytes(), (synthetic_run / "epochs.parquet").read_bytes()
    assert first == second


def test_export_run_schemas_fixed(synthetic_run):
    export_run(synthetic_run)
    assert pq.read_schema(synthetic_run / "trials.parquet").remove_metadata() == TRIAL_SCHEMA
    assert pq.read_schema(synthetic_run / "epochs.parquet").remove_metadata() == EPOCH_SCHEMA


def test_export_run_stop_reasons(synthetic_run):
    trials = export_run(synthetic_run).set_index("trial_id")
    for trial_id, row in trials.iterrows():
        if row["status"] == "ERROR":
            assert row["stop_reason"] == "error", trial_id
            assert row["error"], trial_id
        else:
            assert row["stop_reason"] == ("asha" if row["stopped_early"] else "max_epochs"), trial_id


def test_export_run_unsearched_optionals_null(synthetic_run):
    trials = export_run(synthetic_run)
    schema = pq.read_schema(synthetic_run / "trials.parquet")
    assert str(schema.field("unfrozen_fraction").type) == "double"
    assert str(schema.field("fine_tune_lr_multiplier").type) == "double"
    assert trials["unfrozen_fraction"].isna().all()
    assert trials["fine_tune_lr_multiplier"].isna().all()


def test_trial_id_of_folder_with_underscored_params():
    from pathlib import Path

    from results.export import _trial_id_of_folder

    folder = Path("train_classifier_8d637394_2_augmentation_intensity=0.0710,backbone=MobileNetV2_2026-12-04_20-37-20")
    assert _trial_id_of_folder(folder) == "8d637394"
