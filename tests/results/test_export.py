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


def test_export_run_rows_lost_from_result_json(synthetic_run):
    """Rows missing from result.json (Ray can overwrite it when a paused trial restarts) come from progress.csv."""
    import csv
    import json

    before = export_run(synthetic_run).set_index("trial_id")
    epochs_before = pq.read_table(synthetic_run / "epochs.parquet").to_pandas()
    trial_dir = next(path.parent for path in sorted(synthetic_run.glob("*/result.json"))
                     if len(path.read_text().splitlines()) >= 2)
    lines = (trial_dir / "result.json").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    with (trial_dir / "progress.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=sorted({key for row in rows for key in row}))
        writer.writeheader()
        writer.writerows(rows)
    (trial_dir / "result.json").write_text("\n".join(lines[1:]) + "\n")

    after = export_run(synthetic_run).set_index("trial_id")
    epochs_after = pq.read_table(synthetic_run / "epochs.parquet").to_pandas()
    trial_id = rows[0]["trial_id"]
    assert after.loc[trial_id, "epochs_run"] == before.loc[trial_id, "epochs_run"]
    assert after.loc[trial_id, "stop_reason"] == before.loc[trial_id, "stop_reason"]
    assert after.loc[trial_id, "best_objective"] == before.loc[trial_id, "best_objective"]
    mine_before = epochs_before[epochs_before["trial_id"] == trial_id].reset_index(drop=True)
    mine_after = epochs_after[epochs_after["trial_id"] == trial_id].reset_index(drop=True)
    assert list(mine_after["epoch"]) == list(mine_before["epoch"])
    assert list(mine_after["objective_value"]) == list(mine_before["objective_value"])
