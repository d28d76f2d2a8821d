import json

import numpy as np
import pandas as pd
import pytest

from results.analysis import read_run_manifest
from results.model_export import export_model
from results.predict import collect_image_paths, load_exported_model, predict_images, write_predictions


@pytest.fixture(scope="module")
def model_dir(evaluated_run, tmp_path_factory):
    return export_model(evaluated_run, "aaaa1111", tmp_path_factory.mktemp("export") / "model")


@pytest.fixture(scope="module")
def exported(model_dir):
    return load_exported_model(model_dir)


def test_predict_images_match_evaluate(evaluated_run, exported):
    manifest = read_run_manifest(evaluated_run)
    test = manifest[manifest["split"] == "test"]
    reference = pd.read_parquet(evaluated_run / "predictions.parquet")
    reference = reference[(reference["trial_id"] == "aaaa1111") & (reference["split"] == "test")]

    predictions = predict_images(exported, test["path"].tolist())

    assert predictions["path"].tolist() == test["path"].tolist()
    assert reference["image_id"].tolist() == test["image_id"].tolist()
    np.testing.assert_allclose(predictions["score"].to_numpy(), reference["score"].to_numpy(), atol=1e-5)
    expected = (reference["score"] >= exported.threshold).tolist()
    assert predictions["decision"].tolist() == expected


def test_predict_images_bad_image_row(exported, run_inputs, tmp_path):
    good = run_inputs["images"]["path"].iloc[0]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    missing = tmp_path / "missing.png"

    predictions = predict_images(exported, [corrupt, good, missing])

    assert predictions["path"].tolist() == [str(corrupt), good, str(missing)]
    bad = predictions.iloc[[0, 2]]
    assert bad["score"].isna().all()
    assert bad["decision"].isna().all()
    assert bad["error"].iloc[1] == "file not found"
    assert bad["error"].iloc[0] != ""
    assert pd.isna(predictions["error"].iloc[1])
    assert 0.0 <= predictions["score"].iloc[1] <= 1.0


def test_collect_image_paths_walks_folders(tmp_path):
    (tmp_path / "nested").mkdir()
    for name in ("b.JPG", "a.png", "nested/c.jpeg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")

    paths = collect_image_paths([tmp_path, tmp_path / "notes.txt"])

    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["a.png", "b.JPG", "nested/c.jpeg", "notes.txt"]


def test_collect_image_paths_rejects_folder_without_images(tmp_path):
    with pytest.raises(ValueError, match="contain no image files"):
        collect_image_paths([tmp_path])


def test_write_predictions_csv_and_parquet(tmp_path):
    predictions = pd.DataFrame({"path": ["a.jpg"], "score": [0.7], "decision": pd.array([True], dtype="boolean"),
                                "threshold": [0.5], "error": pd.array([None], dtype="string")})

    write_predictions(predictions, tmp_path / "out.csv")
    write_predictions(predictions, tmp_path / "out.parquet")

    assert pd.read_csv(tmp_path / "out.csv")["score"].tolist() == [0.7]
    assert pd.read_parquet(tmp_path / "out.parquet")["decision"].tolist() == [True]


def test_write_predictions_rejects_other_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"out\.json: the name must end in \.csv or \.parquet"):
        write_predictions(pd.DataFrame(), tmp_path / "out.json")


def test_load_exported_model_rejects_missing_file(model_dir, tmp_path):
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "preprocessing.json").write_text((model_dir / "preprocessing.json").read_text())

    with pytest.raises(FileNotFoundError, match="threshold.json not found in .*export-model"):
        load_exported_model(incomplete)


def test_load_exported_model_rejects_size_mismatch(model_dir, tmp_path):
    changed = tmp_path / "changed"
    changed.mkdir()
    for name in ("model.keras", "threshold.json"):
        (changed / name).write_bytes((model_dir / name).read_bytes())
    preprocessing = json.loads((model_dir / "preprocessing.json").read_text())
    (changed / "preprocessing.json").write_text(json.dumps({**preprocessing, "image_size": 64}))

    with pytest.raises(ValueError, match=r"inputs of shape \(32, 32, 3\) but preprocessing.json gives image_size 64"):
        load_exported_model(changed)


def test_fixture_scores_vary(run_inputs):
    # Guards the comparison with evaluate's scores against a model that scores every image alike.
    assert np.ptp(run_inputs["validation_scores"]) > 0.01
