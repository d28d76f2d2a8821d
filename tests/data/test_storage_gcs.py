"""``data.storage`` with gs:// URIs against gcp-storage-emulator, a GCS JSON API server started on 127.0.0.1.

The emulator accepts requests without credentials, so the URIs carry ``anonymous=true``. Every test points the
Google metadata server lookup at a closed local port, so that a test without credentials sends nothing off
the machine. The emulator does not serve ``pyarrow.fs.GcsFileSystem.open_input_file`` (ranged reads): with
gcp-storage-emulator 2026.7.19 and pyarrow 26.0.1 that call waits about 120 s and then fails, so nothing here
or in ``data.storage`` uses it.
"""

from __future__ import annotations

import socket
import uuid

import pyarrow.fs as pafs
import pytest

from data.storage import (StorageError, check_storage_reachable, download_run_files, list_names, path_exists,
                          read_bytes, read_text, resolve_storage_path, write_bytes, write_text)

emulator_server = pytest.importorskip("gcp_storage_emulator.server",
                                      reason="gcp-storage-emulator is not installed (pip install -e '.[test]')")

CLOSED_PORT_ENDPOINT = "127.0.0.1:1"
# Seconds pyarrow's GCS client retries a failed request; without it a closed port is retried for minutes.
RETRY_LIMIT_S = 2
INHERITED_GOOGLE_VARIABLES = ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUD_STORAGE_EMULATOR_ENDPOINT",
                              "STORAGE_EMULATOR_HOST")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint():
    """Start gcp-storage-emulator on 127.0.0.1, keeping its objects in memory, and return ``HOST:PORT``."""
    port = _free_port()
    server = emulator_server.create_server("127.0.0.1", port, in_memory=True)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def google_environment(monkeypatch, tmp_path):
    for name in INHERITED_GOOGLE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GCE_METADATA_ROOT", CLOSED_PORT_ENDPOINT)
    monkeypatch.setenv("HOME", str(tmp_path))  # hides gcloud's application default credentials


def _gcs(endpoint: str) -> pafs.GcsFileSystem:
    return pafs.GcsFileSystem(anonymous=True, endpoint_override=endpoint, scheme="http", project_id="test-project")


@pytest.fixture
def bucket(endpoint) -> str:
    """Create a new, empty bucket and return its name."""
    name = f"runs-{uuid.uuid4().hex[:12]}"
    _gcs(endpoint).create_dir(name)
    return name


def _uri(endpoint: str, bucket: str, prefix: str = "runs", *, anonymous: bool = True) -> str:
    anonymous_query = "&anonymous=true" if anonymous else ""
    return (f"gs://{bucket}/{prefix}?endpoint_override={endpoint}&scheme=http"
            f"&retry_limit_seconds={RETRY_LIMIT_S}{anonymous_query}")


def test_gcs_uri_anonymous_filesystem(endpoint):
    location = resolve_storage_path(_uri(endpoint, "bucket"))

    assert location.filesystem.type_name == "gcs"
    assert location.path == "bucket/runs"
    assert location.filesystem.__reduce__()[1][0]["anonymous"] is True
    assert str(location / "NAME") == (f"gs://bucket/runs/NAME?endpoint_override={endpoint}&scheme=http"
                                      f"&retry_limit_seconds={RETRY_LIMIT_S}&anonymous=true")


def test_gcs_uri_anonymous_false_keeps_credentials(endpoint):
    location = resolve_storage_path(f"gs://bucket/runs?endpoint_override={endpoint}&anonymous=false")

    assert location.filesystem.__reduce__()[1][0]["anonymous"] is False


def test_gcs_uri_anonymous_not_boolean(endpoint):
    with pytest.raises(ValueError, match=r"Invalid storage path gs://bucket/runs\?.*: anonymous='maybe' is not a "
                                         r"boolean\. Write anonymous=true or anonymous=false\."):
        resolve_storage_path(f"gs://bucket/runs?endpoint_override={endpoint}&anonymous=maybe")


def test_gcs_uri_unknown_query_key(endpoint):
    with pytest.raises(ValueError, match="Unexpected query parameter in GCS URI: 'region'"):
        resolve_storage_path(f"gs://bucket/runs?endpoint_override={endpoint}&anonymous=true&region=eu")


def test_gcs_uri_without_bucket(endpoint):
    with pytest.raises(ValueError, match=r"it names no bucket\. Write it as gs://BUCKET/PREFIX"):
        resolve_storage_path(f"gs://?endpoint_override={endpoint}&anonymous=true")


def test_write_read_list_gcs(endpoint, bucket):
    run = resolve_storage_path(_uri(endpoint, bucket)) / "run1"
    write_text(run / "config.yaml", "a: 1\n")
    write_bytes(run / "trial_1" / "result.json", b"{}\n")
    write_bytes(run / "trial_1" / "result.json", b"{\"epoch\": 2}\n")

    assert read_text(run / "config.yaml") == "a: 1\n"
    assert read_bytes(run / "trial_1" / "result.json") == b"{\"epoch\": 2}\n"
    assert list_names(run) == ["config.yaml", "trial_1"]
    assert list_names(run / "trial_1") == ["result.json"]
    assert path_exists(run / "config.yaml")
    assert path_exists(run / "trial_1")
    assert not path_exists(run / "absent.yaml")
    assert list_names(run / "absent") == []


def test_read_missing_file_gcs(endpoint, bucket):
    missing = resolve_storage_path(_uri(endpoint, bucket)) / "absent.json"

    with pytest.raises(FileNotFoundError, match=rf"Storage path gs://{bucket}/runs/absent\.json\?endpoint_override="
                                                r".*: not found while reading the file"):
        read_bytes(missing)


def test_download_run_files_gcs_skips_checkpoints(endpoint, bucket, tmp_path):
    run = resolve_storage_path(_uri(endpoint, bucket)) / "run1"
    for relative in ("lesiontune_config.yaml", "trial_a/params.json", "trial_a/result.json",
                     "trial_a/checkpoint_000000/model.keras", "trial_a/checkpoint_000000/state.json"):
        write_bytes(run / relative, relative.encode())

    copied = download_run_files(run, tmp_path / "copy")

    assert copied == ["lesiontune_config.yaml", "trial_a/params.json", "trial_a/result.json"]
    assert (tmp_path / "copy" / "trial_a" / "result.json").read_bytes() == b"trial_a/result.json"
    assert not (tmp_path / "copy" / "trial_a" / "checkpoint_000000").exists()


def test_download_run_files_gcs_include(endpoint, bucket, tmp_path):
    run = resolve_storage_path(_uri(endpoint, bucket)) / "run1"
    for relative in ("lesiontune_config.yaml", "trial_a/checkpoint_000000/model.keras",
                     "trial_a/checkpoint_000000/state.json"):
        write_bytes(run / relative, relative.encode())

    copied = download_run_files(run, tmp_path / "copy", include=lambda relative: relative.endswith("state.json"))

    assert copied == ["trial_a/checkpoint_000000/state.json"]
    assert not (tmp_path / "copy" / "lesiontune_config.yaml").exists()


def test_check_storage_reachable_gcs_bucket_exists(endpoint, bucket):
    check_storage_reachable(resolve_storage_path(_uri(endpoint, bucket)))


def test_check_storage_reachable_gcs_missing_bucket(endpoint):
    location = resolve_storage_path(_uri(endpoint, "no-such-bucket"))

    with pytest.raises(FileNotFoundError, match=r"Storage path gs://no-such-bucket/runs\?endpoint_override=.*: "
                                                r"bucket 'no-such-bucket' does not exist\. Create it first"):
        check_storage_reachable(location)


def test_write_gcs_missing_bucket_names_path(endpoint):
    location = resolve_storage_path(_uri(endpoint, "no-such-bucket")) / "a.json"

    with pytest.raises(FileNotFoundError, match=r"Storage path gs://no-such-bucket/runs/a\.json\?.*: not found while "
                                                r"writing the file \(.*NOT_FOUND"):
        write_bytes(location, b"{}")


def test_check_storage_reachable_gcs_closed_port():
    # pyarrow retries for RETRY_LIMIT_S and then some, so this test takes about 6 s.
    location = resolve_storage_path(_uri(CLOSED_PORT_ENDPOINT, "bucket"))

    with pytest.raises(StorageError, match=r"cannot connect to the storage endpoint while checking bucket 'bucket' "
                                           r"\(.*Could not connect.*\)\. Check the host and port in endpoint_override"):
        check_storage_reachable(location)


def test_check_storage_reachable_gcs_without_credentials(endpoint, bucket):
    # Without anonymous=true the client needs an OAuth2 token, and no source of one is reachable.
    location = resolve_storage_path(_uri(endpoint, bucket, anonymous=False))

    with pytest.raises(PermissionError, match=r"Storage path gs://.*: access denied while checking bucket .*"
                                              r"OAuth2 access token.*GOOGLE_APPLICATION_CREDENTIALS.*anonymous=true"):
        check_storage_reachable(location)
