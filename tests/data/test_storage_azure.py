"""``data.storage`` with abfs:// URIs against Azurite, Microsoft's Blob storage emulator, on 127.0.0.1.

Azurite is a Node.js program that CI does not install, so these tests skip without it. To run them:

    npm install --prefix /tmp/azurite azurite
    AZURITE_BLOB=/tmp/azurite/node_modules/.bin/azurite-blob python -m pytest tests/data/test_storage_azure.py

``AZURITE_BLOB`` may be left unset when ``azurite-blob`` is on ``PATH``. Azurite runs with telemetry off and
with ``--skipApiVersionCheck``, because the Azure SDK in pyarrow 26.0.1 sends API version 2026-10-06, newer
than Azurite 3.35 accepts. The account and key are Azurite's published development account.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import uuid

import pyarrow.fs as pafs
import pytest

from data.storage import (StorageError, check_storage_reachable, download_run_files, list_names, path_exists,
                          read_bytes, read_text, resolve_storage_path, write_bytes, write_text)

AZURITE_PROGRAM = os.environ.get("AZURITE_BLOB") or shutil.which("azurite-blob")
pytestmark = pytest.mark.skipif(
    not AZURITE_PROGRAM or not os.access(AZURITE_PROGRAM, os.X_OK),
    reason="Azurite is not installed: npm install --prefix /tmp/azurite azurite, then set "
           "AZURITE_BLOB=/tmp/azurite/node_modules/.bin/azurite-blob")

ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
CLOSED_PORT_ENDPOINT = "127.0.0.1:1"
STARTUP_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Azurite exited with status {process.returncode}: {process.stderr.read()[-2000:]}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"Azurite did not listen on 127.0.0.1:{port} within {STARTUP_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    """Start Azurite's Blob service on 127.0.0.1, keeping blobs in memory, and return ``HOST:PORT``."""
    port = _free_port()
    command = [AZURITE_PROGRAM, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
               "--disableTelemetry", "--skipApiVersionCheck", "--silent"]
    # The working directory is where Azurite would put any file it writes.
    process = subprocess.Popen(command, cwd=tmp_path_factory.mktemp("azurite"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_port(port, process)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(autouse=True)
def azure_environment(monkeypatch):
    monkeypatch.delenv("AZURE_STORAGE_KEY", raising=False)


def _azure(endpoint: str) -> pafs.AzureFileSystem:
    return pafs.AzureFileSystem(account_name=ACCOUNT, account_key=ACCOUNT_KEY, blob_storage_authority=endpoint,
                                dfs_storage_authority=endpoint, blob_storage_scheme="http", dfs_storage_scheme="http")


@pytest.fixture
def container(endpoint) -> str:
    """Create a new, empty container and return its name."""
    name = f"runs-{uuid.uuid4().hex[:12]}"
    _azure(endpoint).create_dir(name)
    return name


def _uri(endpoint: str, container: str, prefix: str = "runs", *, key: str | None = ACCOUNT_KEY) -> str:
    user = f"{ACCOUNT}:{urllib.parse.quote(key, safe='')}" if key else ACCOUNT
    return f"abfs://{user}@{endpoint}/{container}/{prefix}?enable_tls=false"


def test_abfs_uri_key_masked(endpoint):
    location = resolve_storage_path(_uri(endpoint, "ctr"))

    assert location.filesystem.type_name == "abfs"
    assert location.path == "ctr/runs"
    assert str(location / "x") == f"abfs://***@{endpoint}/ctr/runs/x?enable_tls=false"
    assert "K1SZFPTOtr" not in repr(location)


def test_abfs_http_without_key_rejected(endpoint):
    with pytest.raises(ValueError, match=rf"Storage path abfs://\*\*\*@{endpoint}/ctr/runs\?enable_tls=false: "
                                         r"enable_tls=false needs an account key .* or set AZURE_STORAGE_KEY\."):
        resolve_storage_path(_uri(endpoint, "ctr", key=None))


def test_abfs_key_and_credential_kind_rejected(endpoint):
    with pytest.raises(ValueError, match=r"gives an account key and also selects another credential"):
        resolve_storage_path(_uri(endpoint, "ctr") + "&credential_kind=anonymous")


def test_abfs_without_account_rejected():
    with pytest.raises(ValueError, match=r"Invalid storage path abfs://ctr/runs: .*account name.*"
                                         r"abfs://ACCOUNT@CONTAINER/PREFIX"):
        resolve_storage_path("abfs://ctr/runs")


def test_write_read_list_azure(endpoint, container):
    run = resolve_storage_path(_uri(endpoint, container)) / "run1"
    write_text(run / "config.yaml", "a: 1\n")
    write_bytes(run / "trial_1" / "result.json", b"{}\n")
    write_bytes(run / "trial_1" / "result.json", b"{\"epoch\": 2}\n")

    assert read_text(run / "config.yaml") == "a: 1\n"
    assert read_bytes(run / "trial_1" / "result.json") == b"{\"epoch\": 2}\n"
    assert list_names(run) == ["config.yaml", "trial_1"]
    assert path_exists(run / "trial_1")
    assert not path_exists(run / "absent.yaml")
    assert list_names(run / "absent") == []


def test_azure_key_from_environment(endpoint, container, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_KEY", ACCOUNT_KEY)
    location = resolve_storage_path(_uri(endpoint, container, key=None)) / "a.txt"

    write_text(location, "written with the key from AZURE_STORAGE_KEY")

    assert read_text(location) == "written with the key from AZURE_STORAGE_KEY"


def test_read_missing_file_azure(endpoint, container):
    missing = resolve_storage_path(_uri(endpoint, container)) / "absent.json"

    with pytest.raises(FileNotFoundError, match=rf"Storage path abfs://\*\*\*@{endpoint}/{container}/runs/absent\.json"
                                                r"\?enable_tls=false: not found while reading the file"):
        read_bytes(missing)


def test_download_run_files_azure_skips_checkpoints(endpoint, container, tmp_path):
    run = resolve_storage_path(_uri(endpoint, container)) / "run1"
    for relative in ("lesiontune_config.yaml", "trial_a/result.json", "trial_a/checkpoint_000000/model.keras"):
        write_bytes(run / relative, relative.encode())

    copied = download_run_files(run, tmp_path / "copy")

    assert copied == ["lesiontune_config.yaml", "trial_a/result.json"]
    assert (tmp_path / "copy" / "trial_a" / "result.json").read_bytes() == b"trial_a/result.json"


def test_check_storage_reachable_azure_missing_container(endpoint):
    location = resolve_storage_path(_uri(endpoint, "no-such-container"))

    with pytest.raises(FileNotFoundError, match=r"container 'no-such-container' does not exist\. Create it first, "
                                                r"or correct the container name\."):
        check_storage_reachable(location)


def test_write_azure_missing_container(endpoint):
    location = resolve_storage_path(_uri(endpoint, "no-such-container")) / "a.json"

    with pytest.raises(FileNotFoundError, match=r"container 'no-such-container' does not exist \(.*ContainerNotFound"):
        write_bytes(location, b"{}")


def test_check_storage_reachable_azure_rejected_key(endpoint, container):
    wrong_key = "AAAA" + ACCOUNT_KEY[4:]
    location = resolve_storage_path(_uri(endpoint, container, key=wrong_key))

    with pytest.raises(PermissionError, match=r"access denied while checking container .*AuthorizationFailure.*"
                                              r"AZURE_STORAGE_KEY") as raised:
        check_storage_reachable(location)
    assert "K1SZFPTOtr" not in str(raised.value)


def test_check_storage_reachable_azure_closed_port():
    # The Azure SDK retries a refused connection, so this test takes about 6 s.
    location = resolve_storage_path(_uri(CLOSED_PORT_ENDPOINT, "ctr"))

    with pytest.raises(StorageError, match=r"cannot connect to the storage endpoint while checking container 'ctr' "
                                           r"\(.*Could not connect.*\)\. Check the host and port"):
        check_storage_reachable(location)
