"""``lesiontune results`` on run folders in object storage: moto's S3 server on 127.0.0.1, with a free port.

Each test uploads the synthetic run of ``conftest.py`` into a new bucket and runs a command on its URI.
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest

import results.remote
from results.cli import add_results_commands
from results.evaluate import TestSplitAlreadyEvaluatedError

pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")

pytestmark = pytest.mark.usefixtures("aws_test_environment")


@pytest.fixture(scope="module")
def endpoint(s3_endpoint):
    """moto's S3 server on 127.0.0.1 (tests/conftest.py), as ``HOST:PORT``."""
    return s3_endpoint


def _s3(endpoint: str, **options) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", **options)


@pytest.fixture
def bucket(endpoint) -> str:
    name = f"runs-{uuid.uuid4().hex[:12]}"
    _s3(endpoint, allow_bucket_creation=True).create_dir(name)
    return name


def _uri(endpoint: str, bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix}?endpoint_override={endpoint}&scheme=http"


def _upload(endpoint: str, folder: Path, key_prefix: str) -> None:
    filesystem = _s3(endpoint)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with filesystem.open_output_stream(f"{key_prefix}/{path.relative_to(folder).as_posix()}") as stream:
                stream.write(path.read_bytes())


def _keys(endpoint: str, prefix: str) -> list[str]:
    infos = _s3(endpoint).get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(info.path for info in infos if info.type == pafs.FileType.File)


@pytest.fixture
def remote_run(endpoint, bucket, synthetic_run) -> str:
    """Upload the synthetic run to ``BUCKET/runs/synthetic`` and return its URI."""
    _upload(endpoint, synthetic_run, f"{bucket}/runs/synthetic")
    return _uri(endpoint, bucket, "runs/synthetic")


@pytest.fixture
def read_keys(monkeypatch) -> list[str]:
    """Record the path of every file that results.remote copies from object storage."""
    recorded: list[str] = []
    download = results.remote.download_run_files
    read = results.remote.read_bytes

    def recording_download(run, destination, **options):
        copied = download(run, destination, **options)
        recorded.extend(copied)
        return copied

    def recording_read(location):
        recorded.append(location.path)
        return read(location)

    monkeypatch.setattr(results.remote, "download_run_files", recording_download)
    monkeypatch.setattr(results.remote, "read_bytes", recording_read)
    return recorded


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lesiontune")
    add_results_commands(parser.add_subparsers(dest="action", required=True))
    args = parser.parse_args(list(argv))
    return args.handler(args)


def test_leaderboard_remote_matches_local(remote_run, synthetic_run, capsys):
    assert _run("leaderboard", str(synthetic_run), "--top", "3") == 0
    local_output = capsys.readouterr().out

    assert _run("leaderboard", remote_run, "--top", "3") == 0

    assert capsys.readouterr().out == local_output
    assert "Top 3 of 4 trials in 1 run(s)" in local_output


def test_leaderboard_remote_glob(endpoint, bucket, synthetic_run, capsys):
    for name in ("alpha", "beta"):
        _upload(endpoint, synthetic_run, f"{bucket}/runs/{name}")
    trial_folder = next(path for path in synthetic_run.iterdir() if (path / "params.json").is_file())
    _upload(endpoint, trial_folder, f"{bucket}/runs/gamma/{trial_folder.name}")  # a folder without a config

    assert _run("leaderboard", _uri(endpoint, bucket, "runs/*"), "--top", "3") == 0

    output = capsys.readouterr().out
    assert "Top 3 of 8 trials in 2 run(s) by val_pauc80" in output
    assert "alpha" in output
    assert "beta" in output


def test_leaderboard_remote_glob_no_match(endpoint, bucket, remote_run):
    pattern = _uri(endpoint, bucket, "runs/zz*")

    with pytest.raises(FileNotFoundError, match=rf"No run folder matches s3://{bucket}/runs/zz\*\?endpoint_override="
                                                r".*a run folder contains lesiontune_config\.yaml"):
        _run("leaderboard", pattern)


def test_remote_pattern_in_parent_rejected(endpoint, bucket):
    with pytest.raises(ValueError, match=r"only the last folder name of a URI may contain"):
        _run("leaderboard", _uri(endpoint, bucket, "r*/synthetic"))


def test_export_remote_uploads_tables(endpoint, bucket, remote_run, read_keys, capsys):
    assert _run("export", remote_run, "--top", "2") == 0

    output = capsys.readouterr().out
    keys = _keys(endpoint, f"{bucket}/runs/synthetic")
    assert f"{bucket}/runs/synthetic/trials.parquet" in keys
    assert f"{bucket}/runs/synthetic/epochs.parquet" in keys
    assert f"Wrote {_uri(endpoint, bucket, 'runs/synthetic/trials.parquet')} (4 trials)" in output
    assert read_keys
    assert not any("checkpoint_" in key for key in read_keys)
    with _s3(endpoint).open_input_file(f"{bucket}/runs/synthetic/trials.parquet") as stream:
        trials = pd.read_parquet(stream)
    assert sorted(trials["trial_id"]) == ["aaaa1111", "bbbb2222", "cccc3333", "dddd4444"]


def test_compare_remote_and_local(remote_run, fresh_run, capsys):
    assert _run("compare", remote_run, str(fresh_run)) == 0

    header = capsys.readouterr().out.splitlines()[0]
    assert "synthetic" in header
    assert "fresh" in header


def test_report_remote_fetches_no_model(endpoint, bucket, remote_run, read_keys, capsys):
    assert _run("report", remote_run, "--top", "2") == 0

    assert f"Wrote {_uri(endpoint, bucket, 'runs/synthetic/report.html')}" in capsys.readouterr().out
    assert f"{bucket}/runs/synthetic/report.html" in _keys(endpoint, f"{bucket}/runs/synthetic")
    assert any(key.endswith("/state.json") for key in read_keys)
    assert any(key.endswith("/validation_scores.npy") for key in read_keys)
    assert not any(key.endswith("model.keras") for key in read_keys)


def test_report_remote_output_uri(endpoint, bucket, remote_run, capsys):
    output_uri = _uri(endpoint, bucket, "reports/synthetic.html")

    assert _run("report", remote_run, "--output", output_uri) == 0

    assert f"Wrote {output_uri}" in capsys.readouterr().out
    with _s3(endpoint).open_input_stream(f"{bucket}/reports/synthetic.html") as stream:
        assert stream.readall().startswith(b"<!DOCTYPE html>")


def test_export_model_remote_fetches_one_model(remote_run, read_keys, tmp_path, capsys):
    assert _run("export-model", remote_run, "--trial", "aaaa", str(tmp_path / "model")) == 0

    assert (tmp_path / "model" / "model.keras").is_file()
    assert (tmp_path / "model" / "MODEL_CARD.md").is_file()
    models = [key for key in read_keys if key.endswith("model.keras")]
    assert len(models) == 1
    assert "/checkpoint_000001/" in models[0]  # aaaa1111's best epoch is its second


def test_export_model_remote_unknown_trial_names_uri(remote_run, tmp_path):
    with pytest.raises(ValueError, match=r"No trial 'zzzz' in s3://.*/runs/synthetic\?endpoint_override="):
        _run("export-model", remote_run, "--trial", "zzzz", str(tmp_path / "model"))


def test_evaluate_remote_uploads_once(endpoint, bucket, remote_run, read_keys, capsys):
    assert _run("evaluate", remote_run, "--top", "1", "--resamples", "20") == 0

    keys = _keys(endpoint, f"{bucket}/runs/synthetic")
    assert f"{bucket}/runs/synthetic/test_evaluation.parquet" in keys
    assert f"{bucket}/runs/synthetic/predictions.parquet" in keys
    assert f"Wrote {_uri(endpoint, bucket, 'runs/synthetic/test_evaluation.parquet')}" in capsys.readouterr().out
    assert len([key for key in read_keys if key.endswith("model.keras")]) == 1

    read_keys.clear()
    with pytest.raises(TestSplitAlreadyEvaluatedError,
                       match=rf"s3://{bucket}/runs/synthetic\?endpoint_override=.* was already evaluated"):
        _run("evaluate", remote_run, "--top", "1")
    assert not any(key.endswith("model.keras") for key in read_keys)


def test_remote_run_without_config(endpoint, bucket):
    _upload(endpoint, Path(__file__).parent, f"{bucket}/runs/not-a-run")

    with pytest.raises(FileNotFoundError, match=rf"s3://{bucket}/runs/not-a-run\?endpoint_override=.* is not a "
                                                r"lesiontune run folder: lesiontune_config\.yaml not found"):
        _run("leaderboard", _uri(endpoint, bucket, "runs/not-a-run"))


def test_remote_run_missing_bucket(endpoint):
    with pytest.raises(FileNotFoundError, match=r"Storage path s3://no-such-bucket/runs/x\?endpoint_override=.*: "
                                                r"bucket 'no-such-bucket' does not exist"):
        _run("importance", _uri(endpoint, "no-such-bucket", "runs/x"))


def test_remote_run_invalid_uri():
    with pytest.raises(ValueError, match=r"Invalid storage path foo://bucket/runs/x: Unrecognized filesystem type"):
        _run("effects", "foo://bucket/runs/x")


def test_staged_runs_removes_copies(remote_run):
    with results.remote.staged_runs([remote_run]) as copies:
        local = copies[0].local
        assert (local / "lesiontune_config.yaml").is_file()
        assert local.name == "synthetic"

    assert not local.exists()
