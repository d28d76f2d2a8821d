"""Integration test of the cluster path: ``python -m search`` submitted with ``lesiontune submit``.

``lesiontune submit`` measures the upload and then runs ``ray job submit``, so the test covers both.

The module starts its own single-node Ray head with token authentication, listening on 127.0.0.1 only.
The head gets a temporary HOME, so ``ray get-auth-token --generate`` writes the token to a temporary
``~/.ray/auth_token``, and a temporary Ray temp folder, so it never becomes the cluster that a plain
``ray.init()`` elsewhere on the machine connects to. Teardown stops the head and deletes both folders.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from search.submit import measure_upload, read_runtime_env_excludes

REPO = Path(__file__).resolve().parents[2]
ISIC_CC0 = REPO.parent / "shared" / "data" / "isic-cc0-550"
BIN_DIR = Path(sys.executable).parent
RAY_CLI = shutil.which("ray", path=str(BIN_DIR))

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not ISIC_CC0.is_dir(), reason="../shared/data/isic-cc0-550 (real ISIC images) is absent"),
    pytest.mark.skipif(RAY_CLI is None, reason=f"the ray command line is not installed in {BIN_DIR}"),
]

HEAD_START_TIMEOUT_S = 180
HEAD_STOP_TIMEOUT_S = 60
CLI_TIMEOUT_S = 120
# The job took about 60 to 70 s on 2 CPU cores shared with other work, so this leaves room for slower machines.
JOB_TIMEOUT_S = 480
POLL_INTERVAL_S = 3
UPLOAD_PROBE_BYTES = 50 * 1024 * 1024
# The repository's code is under 1 MiB, so a package over a tenth of the probe means something large got in.
MAX_PACKAGE_BYTES = UPLOAD_PROBE_BYTES // 10
LOG_TAIL_CHARS = 6000
TERMINAL_JOB_STATUSES = {"SUCCEEDED", "FAILED", "STOPPED"}
# Variables from the developer's shell that would change the cluster, the token or the upload rules the test uses.
INHERITED_RAY_VARIABLES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                           "RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES")


@dataclass(frozen=True)
class RayHead:
    """A running head started by this module, and what a client needs to reach it."""

    root: Path
    env: dict[str, str]
    gcs_port: int
    dashboard_url: str
    process: subprocess.Popen

    @property
    def token(self) -> str:
        return (self.root / "home" / ".ray" / "auth_token").read_text(encoding="utf-8").strip()


def _free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _ray_environment(home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in INHERITED_RAY_VARIABLES}
    env.update({
        "HOME": str(home),
        "PATH": f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        # NOTE: an internal switch of Ray 2.60 (ray/_private/ray_constants.py), not a documented option.
        # On Linux, Ray replaces --node-ip-address 127.0.0.1 by the machine's routable address and listens
        # there. With this set to 0 it keeps 127.0.0.1, so the test cluster listens on loopback only.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    })
    return env


def _ray(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([RAY_CLI, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, check=False)


def _lesiontune(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the ``lesiontune`` command line of this checkout with the Python that runs the tests."""
    command = [sys.executable, "-c", "import sys; from search.cli import main; sys.exit(main())", *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                          check=False)


def _tail(text: str) -> str:
    return text[-LOG_TAIL_CHARS:]


def _start_head(root: Path, env: dict[str, str], ports: list[int], log_path: Path) -> subprocess.Popen:
    """Start ``ray start --head --block`` in a new session, so that teardown can find all its processes."""
    gcs_port, dashboard_port, client_port, agent_port = ports
    command = [
        RAY_CLI, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--include-dashboard=true",
        "--num-cpus", "2", "--temp-dir", str(root / "ray"), "--disable-usage-stats",
        # These two default to fixed ports (10001 and 52365), which another Ray on the machine may hold.
        "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(agent_port),
    ]
    with log_path.open("w", encoding="utf-8") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_job_server(process: subprocess.Popen, env: dict[str, str], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"ray start --head exited with status {process.returncode}:\n"
                        f"{_tail(log_path.read_text(encoding='utf-8'))}")
        if _ray(env, "job", "list", "--address", url).returncode == 0:
            return
        time.sleep(POLL_INTERVAL_S)
    pytest.fail(f"The job server at {url} did not answer within {HEAD_START_TIMEOUT_S} s:\n"
                f"{_tail(log_path.read_text(encoding='utf-8'))}")


def _live_processes_in_session(session_id: int) -> list[int]:
    """Return the ids of the processes of a Linux session that are not zombies."""
    members = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name may contain spaces and brackets, so the fields are read after the last ")".
            fields = stat_file.read_text(encoding="utf-8").rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, session = fields[0], int(fields[3])
        if session == session_id and state != "Z":
            members.append(int(stat_file.parent.name))
    return members


def _stop_head(process: subprocess.Popen) -> None:
    """Stop the head and every process it started, by process id.

    The test does not call ``ray stop --force``, because that kills every Ray process on the machine by
    name, including the clusters of other users and other test runs. SIGTERM makes ``ray start --block``
    drain and stop its node, and whatever is still alive in its session afterwards gets SIGKILL.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=HEAD_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=HEAD_STOP_TIMEOUT_S)
    for pid in _live_processes_in_session(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    # A short path, because Ray puts Unix sockets inside it and Linux limits their paths to 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="lt-ray-"))
    (root / "home").mkdir()
    env = _ray_environment(root / "home")
    process = None
    try:
        generated = _ray(env, "get-auth-token", "--generate")
        assert generated.returncode == 0, f"ray get-auth-token --generate failed:\n{generated.stderr}"

        ports = _free_ports(4)
        log_path = root / "head.log"
        process = _start_head(root, env, ports, log_path)
        dashboard_url = f"http://127.0.0.1:{ports[1]}"
        _wait_for_job_server(process, env, dashboard_url, log_path)
        yield RayHead(root=root, env=env, gcs_port=ports[0], dashboard_url=dashboard_url, process=process)
    finally:
        if process is not None:
            _stop_head(process)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def upload_probe() -> Iterator[Path]:
    """Write 50 MiB of incompressible bytes under lesiontune_runs/, which runtime_env.yaml must exclude."""
    runs_dir = REPO / "lesiontune_runs"
    created_dir = not runs_dir.exists()
    probe = runs_dir / f"ray-job-upload-probe-{uuid.uuid4().hex[:8]}.bin"
    runs_dir.mkdir(exist_ok=True)
    try:
        probe.write_bytes(os.urandom(UPLOAD_PROBE_BYTES))
        yield probe
    finally:
        probe.unlink(missing_ok=True)
        if created_dir and not any(runs_dir.iterdir()):
            runs_dir.rmdir()


def _job_runtime_env(head: RayHead) -> Path:
    """Write the repository's runtime_env.yaml plus LESIONTUNE_CACHE into the head's temp folder."""
    runtime_env = yaml.safe_load((REPO / "runtime_env.yaml").read_text(encoding="utf-8"))
    runtime_env.setdefault("env_vars", {})["LESIONTUNE_CACHE"] = str(head.root / "cache")
    path = head.root / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(runtime_env), encoding="utf-8")
    return path


def _request_job_api(head: RayHead, path: str, token: str | None) -> dict:
    """Send a GET to the Ray Jobs REST API and return the decoded JSON body."""
    request = urllib.request.Request(f"{head.dashboard_url}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=CLI_TIMEOUT_S) as response:
        return json.load(response)


def _job_logs(head: RayHead, submission_id: str) -> str:
    logs = _ray(head.env, "job", "logs", "--address", head.dashboard_url, submission_id)
    return logs.stdout + logs.stderr


def _wait_for_job(head: RayHead, submission_id: str) -> dict:
    """Poll the job until it ends, and return its details from the Ray Jobs REST API.

    A job still running after JOB_TIMEOUT_S seconds is stopped, and the test fails with its log tail.
    """
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = _request_job_api(head, f"/api/jobs/{submission_id}", head.token)
        if job["status"] in TERMINAL_JOB_STATUSES:
            return job
        time.sleep(POLL_INTERVAL_S)
    _ray(head.env, "job", "stop", "--no-wait", "--address", head.dashboard_url, submission_id)
    pytest.fail(f"Job {submission_id} did not finish within {JOB_TIMEOUT_S} s. Log tail:\n"
                f"{_tail(_job_logs(head, submission_id))}")


def _extracted_package(head: RayHead, working_dir_uri: str) -> Path:
    """Return the folder where the head unpacked the uploaded working directory (gcs://_ray_pkg_<hash>.zip)."""
    name = working_dir_uri.rsplit("/", 1)[-1].removesuffix(".zip")
    matches = sorted((head.root / "ray").glob(f"session_*/runtime_resources/working_dir_files/{name}"))
    assert matches, f"No unpacked package {name} under {head.root / 'ray'}"
    return matches[0]


def test_job_submit_search_writes_trials(ray_head, upload_probe):
    submission_id = f"lesiontune-test-{uuid.uuid4().hex[:8]}"
    storage = ray_head.root / "runs"
    # Without .gitignore, which already lists lesiontune_runs/, only runtime_env.yaml keeps the probe out.
    submit_env = {**ray_head.env, "RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1"}
    runtime_env = _job_runtime_env(ray_head)
    measured = measure_upload(REPO, excludes=read_runtime_env_excludes(runtime_env), include_gitignore=False)
    started = time.monotonic()
    submitted = _lesiontune(
        submit_env, "submit", "--address", ray_head.dashboard_url, "--submission-id", submission_id,
        "--no-wait", "--working-dir", ".", "--runtime-env", str(runtime_env), "--",
        "--data", str(ISIC_CC0), "--backbones", "MobileNetV2", "--image-size", "32",
        "--weights", "none", "--num-samples", "2", "--max-epochs", "1", "--storage-path", str(storage), "--name", "job",
        # Inside a job, "auto" makes ray.init() read RAY_ADDRESS, which Ray sets to the job's cluster.
        "--address", "auto",
        cwd=REPO,
    )
    assert submitted.returncode == 0, f"lesiontune submit failed:\n{_tail(submitted.stdout + submitted.stderr)}"
    assert "Upload: " in submitted.stdout

    job = _wait_for_job(ray_head, submission_id)
    print(f"Job {submission_id} ended {job['status']} after {time.monotonic() - started:.0f} s")
    assert job["status"] == "SUCCEEDED", (f"Job {submission_id} ended {job['status']}: {job.get('message')}\n"
                                          f"{_tail(_job_logs(ray_head, submission_id))}")

    # Without this check, a driver that starts its own local Ray inside the job would pass every other one.
    logs = _job_logs(ray_head, submission_id)
    assert f"Connecting to existing Ray cluster at address: 127.0.0.1:{ray_head.gcs_port}" in logs, _tail(logs)

    trials = pd.read_parquet(storage / "job" / "trials.parquet")
    assert len(trials) == 2
    assert set(trials["backbone"]) == {"MobileNetV2"}
    assert (trials["status"] == "TERMINATED").all(), trials[["trial_id", "status"]]

    package = _extracted_package(ray_head, job["runtime_env"]["working_dir"])
    files = [path for path in package.rglob("*") if path.is_file()]
    leaked = sorted(path.relative_to(package).as_posix() for path in files
                    if path.relative_to(package).parts[0] == "lesiontune_runs")
    assert (package / "search" / "driver.py").is_file()
    assert not leaked, f"runtime_env.yaml did not keep these files out of the upload: {leaked}"
    assert sum(path.stat().st_size for path in files) < MAX_PACKAGE_BYTES
    # The job's Python writes __pycache__ folders into the unpacked package, which runs as its working directory.
    # NOTE: a file that another process creates or deletes in the checkout between the two walks fails this check.
    unpacked = {path.relative_to(package).as_posix() for path in files
                if "__pycache__" not in path.relative_to(package).parts}
    assert unpacked == {entry.path for entry in measured.files}, "measure_upload differs from the files Ray uploaded"


def test_job_server_requires_cluster_token(ray_head):
    with pytest.raises(urllib.error.HTTPError) as missing:
        _request_job_api(ray_head, "/api/jobs/", token=None)
    with pytest.raises(urllib.error.HTTPError) as wrong:
        _request_job_api(ray_head, "/api/jobs/", token="not-the-cluster-token")

    assert missing.value.code == 401
    assert wrong.value.code == 403
    assert isinstance(_request_job_api(ray_head, "/api/jobs/", token=ray_head.token), list)
