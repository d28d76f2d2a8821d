"""Run folders in object storage: ``search.storage`` against a real S3 API server, and a search through the CLI.

The S3 server is moto's, started in this process on 127.0.0.1 with a free port, so nothing leaves the
machine. Every test gets dummy AWS credentials, and the EC2 metadata lookup of the AWS SDK is disabled.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
import yaml
from PIL import Image

from data.splits import read_manifest
from search.cli import main
from search.storage import (StorageError, check_storage_reachable, download_run_files, list_names, mask_credentials,
                            path_exists, read_bytes, read_text, resolve_storage_path, write_bytes, write_text)
from trainables.trial import TrialSetup, _setup_state

pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")

CLOSED_PORT_ENDPOINT = "127.0.0.1:1"
# The search and its resume took 70 to 85 s together on 2 CPU cores shared with other work.
SEARCH_TIMEOUT_S = 300
BENIGN_IMAGES, MELANOMA_IMAGES = 28, 12


pytestmark = pytest.mark.usefixtures("aws_test_environment")


@pytest.fixture(scope="module")
def endpoint(s3_endpoint):
    """moto's S3 server on 127.0.0.1 (tests/conftest.py), as ``HOST:PORT``."""
    return s3_endpoint


@pytest.fixture
def bucket(endpoint) -> str:
    """Create a new, empty bucket and return its name."""
    name = f"runs-{uuid.uuid4().hex[:12]}"
    _s3(endpoint, allow_bucket_creation=True).create_dir(name)
    return name


def _s3(endpoint: str, **options) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", **options)


def _uri(endpoint: str, bucket: str, prefix: str = "runs") -> str:
    return f"s3://{bucket}/{prefix}?endpoint_override={endpoint}&scheme=http"


def _put(endpoint: str, key: str, data: bytes) -> None:
    with _s3(endpoint).open_output_stream(key) as stream:
        stream.write(data)


def _keys(endpoint: str, prefix: str) -> list[str]:
    infos = _s3(endpoint).get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(info.path for info in infos if info.type == pafs.FileType.File)


def _read_parquet(endpoint: str, key: str) -> pd.DataFrame:
    with _s3(endpoint).open_input_file(key) as stream:
        return pd.read_parquet(io.BytesIO(stream.readall()))


def _run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# search.storage


def test_plain_path_is_local(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    location = resolve_storage_path("~/runs")

    assert location.is_local
    assert location.path == str(tmp_path / "runs")
    assert str(location / "x") == str(tmp_path / "runs" / "x")


def test_s3_uri_children_keep_query(endpoint):
    location = resolve_storage_path(_uri(endpoint, "bucket"))

    assert not location.is_local
    assert location.filesystem.type_name == "s3"
    assert location.path == "bucket/runs"
    assert (location / "NAME").path == "bucket/runs/NAME"
    assert str(location / "NAME") == f"s3://bucket/runs/NAME?endpoint_override={endpoint}&scheme=http"


def test_mask_credentials_user_part_and_secret_query():
    uri = "s3://AKIAEXAMPLE:SEKRITVALUE@bucket/runs?endpoint_override=127.0.0.1:9000&secret_key=OTHERSECRET"

    assert mask_credentials(uri) == "s3://***@bucket/runs?endpoint_override=127.0.0.1:9000&secret_key=***"
    assert mask_credentials("/data/user@host/runs") == "/data/user@host/runs"
    assert mask_credentials("s3://bucket/runs?scheme=http") == "s3://bucket/runs?scheme=http"


def test_storage_path_repr_masks_credentials(endpoint):
    location = resolve_storage_path(f"s3://AKIAEXAMPLE:SEKRITVALUE@bucket/runs?endpoint_override={endpoint}")

    assert "SEKRITVALUE" not in repr(location / "x")
    assert "SEKRITVALUE" not in str(location / "x")
    assert "SEKRITVALUE" in (location / "x").uri


def test_resolve_storage_path_unknown_scheme():
    with pytest.raises(ValueError, match=r"Invalid storage path foo://bucket/runs: Unrecognized filesystem type.*"
                                         r"s3://BUCKET/PREFIX"):
        resolve_storage_path("foo://bucket/runs")


def test_resolve_storage_path_unknown_query_key(endpoint):
    with pytest.raises(ValueError, match="Unexpected query parameter in S3 URI: 'bucket_region'"):
        resolve_storage_path(f"s3://bucket/runs?endpoint_override={endpoint}&bucket_region=eu")


def test_resolve_storage_path_without_bucket(endpoint):
    with pytest.raises(ValueError, match=r"it names no bucket\. Write it as s3://BUCKET/PREFIX"):
        resolve_storage_path(f"s3://?endpoint_override={endpoint}")


def test_resolve_storage_path_invalid_uri_masks_secret():
    with pytest.raises(ValueError, match=r"Invalid storage path s3://\*\*\*@bu cket/runs: Cannot parse URI") as raised:
        resolve_storage_path("s3://AKIAEXAMPLE:SEKRITVALUE@bu cket/runs")
    assert "SEKRITVALUE" not in str(raised.value)


def test_relative_file_uri_rejected():
    with pytest.raises(ValueError, match="Invalid storage path file://runs/x: .*file:///ABSOLUTE/PATH"):
        resolve_storage_path("file://runs/x")


def test_write_read_list_s3(endpoint, bucket):
    run = resolve_storage_path(_uri(endpoint, bucket)) / "run1"
    write_text(run / "config.yaml", "a: 1\n")
    write_bytes(run / "trial_1" / "result.json", b"{}\n")

    assert read_text(run / "config.yaml") == "a: 1\n"
    assert read_bytes(run / "trial_1" / "result.json") == b"{}\n"
    assert list_names(run) == ["config.yaml", "trial_1"]
    assert path_exists(run / "config.yaml")
    assert not path_exists(run / "absent.yaml")
    assert list_names(run / "absent") == []


def test_read_missing_file_names_it(endpoint, bucket):
    missing = resolve_storage_path(_uri(endpoint, bucket)) / "absent.json"

    with pytest.raises(FileNotFoundError, match=rf"Storage path s3://{bucket}/runs/absent.json\?endpoint_override="
                                                r".*: not found while reading the file"):
        read_bytes(missing)


def test_write_bytes_file_uri_leaves_no_temporary_file(tmp_path):
    folder = resolve_storage_path(f"file://{tmp_path}/runs")
    write_bytes(folder / "a.json", b"old")
    write_bytes(folder / "a.json", b"new")

    assert not folder.is_local
    assert (tmp_path / "runs" / "a.json").read_bytes() == b"new"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a.json"]


def test_download_run_files_skips_checkpoints(endpoint, bucket, tmp_path):
    run = resolve_storage_path(_uri(endpoint, bucket)) / "run1"
    for relative in ("lesiontune_config.yaml", "experiment_state-2026-01-01_00-00-00.json", "trial_a/params.json",
                     "trial_a/result.json", "trial_a/checkpoint_000000/model.keras",
                     "trial_a/checkpoint_000000/state.json"):
        write_bytes(run / relative, relative.encode())

    copied = download_run_files(run, tmp_path / "copy")

    assert copied == ["experiment_state-2026-01-01_00-00-00.json", "lesiontune_config.yaml", "trial_a/params.json",
                      "trial_a/result.json"]
    assert (tmp_path / "copy" / "trial_a" / "result.json").read_bytes() == b"trial_a/result.json"
    assert not (tmp_path / "copy" / "trial_a" / "checkpoint_000000").exists()


def test_check_storage_reachable_missing_bucket(endpoint):
    location = resolve_storage_path(_uri(endpoint, "no-such-bucket"))

    with pytest.raises(FileNotFoundError, match=r"Storage path s3://no-such-bucket/runs\?endpoint_override=.*: "
                                                r"bucket 'no-such-bucket' does not exist\. Create it first"):
        check_storage_reachable(location)


def test_check_storage_reachable_closed_port():
    # The AWS SDK retries a refused connection, so this test takes about 6 s.
    location = resolve_storage_path(_uri(CLOSED_PORT_ENDPOINT, "bucket"))

    with pytest.raises(StorageError, match=r"cannot connect to the storage endpoint while checking bucket 'bucket' "
                                           r"\(.*curlCode: 7.*\)\. Check the host and port in endpoint_override"):
        check_storage_reachable(location)


def test_check_storage_reachable_rejected_credentials(endpoint, bucket):
    location = resolve_storage_path(f"s3://AKIAUNKNOWNKEY:SEKRITVALUE@{bucket}/runs?endpoint_override={endpoint}"
                                    "&scheme=http")
    _set_moto_authentication(endpoint, "0")  # from now on the server checks every request's access key
    try:
        with pytest.raises(PermissionError, match=r"Storage path s3://\*\*\*@.*: access denied while checking bucket"
                                                  r".*AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") as raised:
            check_storage_reachable(location)
    finally:
        _set_moto_authentication(endpoint, "inf")
    assert "SEKRITVALUE" not in str(raised.value)
    assert "AKIAUNKNOWNKEY" not in str(raised.value)


def _set_moto_authentication(endpoint: str, unauthenticated_requests: str) -> None:
    """Set how many more requests moto accepts before it checks access keys ('inf': never checks)."""
    # A form content type, urllib's default, would make Flask hide the body from moto.
    request = urllib.request.Request(f"http://{endpoint}/moto-api/reset-auth", data=unauthenticated_requests.encode(),
                                     headers={"Content-Type": "text/plain"}, method="POST")
    urllib.request.urlopen(request, timeout=10).close()


# The manifest travels in the trial setup


def test_read_manifest_from_bytes_matches_file(tmp_path):
    frame = pd.DataFrame({"image_id": ["a", "b"], "label": [0, 1], "split": ["train", "validation"]})
    frame.to_parquet(tmp_path / "manifest.parquet")

    from_bytes = read_manifest((tmp_path / "manifest.parquet").read_bytes())

    pd.testing.assert_frame_equal(from_bytes, read_manifest(tmp_path / "manifest.parquet"))
    assert list(from_bytes["split"].cat.categories) == ["train", "validation", "test"]


def test_setup_state_leaves_out_manifest_bytes():
    setup = TrialSetup(manifest_path="s3://bucket/runs/x/manifest.parquet", cache_paths={32: "/cache/32"},
                       max_epochs=1, manifest_parquet=b"PAR1")

    state = _setup_state(setup)

    assert "manifest_parquet" not in state
    assert state["manifest_path"] == "s3://bucket/runs/x/manifest.parquet"
    assert json.loads(json.dumps(state))["cache_paths"] == {"32": "/cache/32"}


# The CLI's messages


def test_search_missing_bucket_one_line(endpoint, tmp_path, capsys):
    uri = _uri(endpoint, "no-such-bucket")
    status, _, err = _run_cli(capsys, ["search", "--data", str(tmp_path), "--storage-path", uri, "--name", "x"])

    assert status == 2
    assert err.startswith(f"lesiontune: error: Storage path {uri}: bucket 'no-such-bucket' does not exist")
    assert err.count("\n") == 1


def test_search_unknown_scheme_one_line(tmp_path, capsys):
    status, _, err = _run_cli(capsys, ["search", "--data", str(tmp_path), "--storage-path", "foo://bucket/runs"])

    assert status == 2
    assert err.startswith("lesiontune: error: Invalid storage path foo://bucket/runs: Unrecognized filesystem type")
    assert "Traceback" not in err


def test_search_existing_remote_run_rejected(endpoint, bucket, tmp_path, capsys):
    _put(endpoint, f"{bucket}/runs/x/experiment_state-2026-01-01_00-00-00.json", b"{}")
    uri = _uri(endpoint, bucket)
    status, _, err = _run_cli(capsys, ["search", "--data", str(tmp_path), "--storage-path", uri, "--name", "x"])

    assert status == 2
    assert f"Run folder s3://{bucket}/runs/x?endpoint_override={endpoint}&scheme=http already contains a search" in err
    assert f"--resume 's3://{bucket}/runs/x?endpoint_override={endpoint}&scheme=http'" in err
    assert _keys(endpoint, f"{bucket}/runs/x") == [f"{bucket}/runs/x/experiment_state-2026-01-01_00-00-00.json"]


def test_resume_remote_run_without_config(endpoint, bucket, capsys):
    run_uri = _uri(endpoint, bucket, "runs/missing")
    status, _, err = _run_cli(capsys, ["search", "--resume", run_uri])

    assert status == 2
    assert err.startswith(f"lesiontune: error: Cannot resume {run_uri}: lesiontune_config.yaml not found")


# A whole search through the CLI


def _write_class_folders(root: Path) -> None:
    """Write BENIGN_IMAGES + MELANOMA_IMAGES distinct 40 x 48 noise PNGs into ``benign/`` and ``melanoma/``."""
    rng = np.random.default_rng(0)
    for folder, count in (("benign", BENIGN_IMAGES), ("melanoma", MELANOMA_IMAGES)):
        (root / folder).mkdir(parents=True)
        for index in range(count):
            pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / f"{folder}_{index:02d}.png")


def _lesiontune(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    """Run ``lesiontune ARGUMENTS`` (the entry point ``search.cli:main``) in a fresh process."""
    environment = {**os.environ, "LESIONTUNE_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-c", "import sys; from search.cli import main; sys.exit(main())", *arguments]
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    completed = subprocess.run(command, env=environment, cwd=work, capture_output=True, text=True,
                               timeout=SEARCH_TIMEOUT_S)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


@pytest.mark.integration
def test_search_s3_end_to_end_then_resume(endpoint, bucket, tmp_path):
    _write_class_folders(tmp_path / "data")
    storage_uri = _uri(endpoint, bucket)
    run_uri = _uri(endpoint, bucket, "runs/remote")
    run_key = f"{bucket}/runs/remote"

    started = time.monotonic()
    completed = _lesiontune(tmp_path, "search", "--data", str(tmp_path / "data"), "--storage-path", storage_uri,
                            "--name", "remote", "--weights", "none", "--backbones", "MobileNetV2", "--image-size",
                            "32", "--num-samples", "2", "--max-epochs", "1", "--quiet")
    search_seconds = time.monotonic() - started

    keys = _keys(endpoint, run_key)
    for name in ("lesiontune_config.yaml", "manifest.parquet", "data_summary.json", "data_report.parquet",
                 "exclusions.parquet", "duplicates.parquet", "trials.parquet", "epochs.parquet"):
        assert f"{run_key}/{name}" in keys, f"{name} missing from the bucket after {search_seconds:.0f} s: {keys}"
    checkpoints = [key for key in keys if "/checkpoint_" in key and key.endswith("/state.json")]
    assert len(checkpoints) >= 2, keys
    assert list((tmp_path / "work").iterdir()) == [], "the search wrote into its working directory"

    trials = _read_parquet(endpoint, f"{run_key}/trials.parquet")
    assert len(trials) == 2
    assert (trials["status"] == "TERMINATED").all(), trials[["trial_id", "status", "error"]]
    assert (trials["epochs_run"] == 1).all()
    epochs = _read_parquet(endpoint, f"{run_key}/epochs.parquet")
    assert len(epochs) == 2
    assert set(epochs["trial_id"]) == set(trials["trial_id"])
    manifest = _read_parquet(endpoint, f"{run_key}/manifest.parquet")
    assert len(manifest) == BENIGN_IMAGES + MELANOMA_IMAGES
    assert set(manifest["split"]) == {"train", "validation", "test"}

    with _s3(endpoint).open_input_stream(f"{run_key}/lesiontune_config.yaml") as stream:
        saved = yaml.safe_load(stream.readall())
    assert saved["search"]["storage_path"] == storage_uri
    with _s3(endpoint).open_input_stream(checkpoints[0]) as stream:
        state = json.loads(stream.readall())
    assert state["setup"]["manifest_path"] == _uri(endpoint, bucket, "runs/remote/manifest.parquet")
    assert "manifest_parquet" not in state["setup"]
    assert f"Results: {_uri(endpoint, bucket, 'runs/remote/trials.parquet')}" in completed.stdout
    assert f"Data: {BENIGN_IMAGES + MELANOMA_IMAGES} images, {MELANOMA_IMAGES} positive" in completed.stdout

    # The resume must export the tables again, so remove them first.
    _s3(endpoint).delete_file(f"{run_key}/trials.parquet")
    _s3(endpoint).delete_file(f"{run_key}/epochs.parquet")
    resumed = _lesiontune(tmp_path, "search", "--resume", run_uri, "--quiet")

    assert "Top 2 of 2 trials" in resumed.stdout
    resumed_trials = _read_parquet(endpoint, f"{run_key}/trials.parquet")
    assert sorted(resumed_trials["trial_id"]) == sorted(trials["trial_id"])
    assert (resumed_trials["status"] == "TERMINATED").all()
    assert f"{run_key}/epochs.parquet" in _keys(endpoint, run_key)
