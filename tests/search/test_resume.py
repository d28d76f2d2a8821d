"""Kill a trial's worker and the driver in the middle of a search, then check nothing is lost or rerun."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (real ISIC images) is absent"),
    pytest.mark.skipif(sys.platform != "linux", reason="finds trial processes through /proc"),
]


def _start(tmp_path: Path, *options: str) -> subprocess.Popen:
    env = {**os.environ, "LESIONTUNE_CACHE": os.environ.get("LESIONTUNE_CACHE", str(tmp_path / "cache"))}
    command = [sys.executable, "-m", "search", "--quiet", "--storage-path", str(tmp_path / "runs"), *options]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _epochs_by_trial(run: Path) -> dict[str, list[int]]:
    found = {}
    for result in run.glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines:
            found[lines[0]["trial_id"]] = [line["epoch"] for line in lines]
    return found


def _wait_for(condition, *, timeout: float, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            pytest.fail(f"search exited with {process.returncode} before {what}:\n{process.stdout.read()[-3000:]}")
        time.sleep(1)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _trial_worker_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if command.startswith("ray::ImplicitFunc") or command.startswith("ray::train_classifier"):
                pids.append(int(entry.name))
    return pids


def _common_options(name: str) -> list[str]:
    return ["--data", str(SHARED_DATA / "isic-cc0-550"), "--backbones", "MobileNetV2", "--image-size", "32",
            "--weights", "none", "--num-samples", "4", "--max-epochs", "3", "--grace-period", "3",
            "--max-concurrent-trials", "1", "--name", name]


def test_killed_trial_resumes_from_checkpoint(tmp_path):
    process = _start(tmp_path, *_common_options("trialkill"))
    run = tmp_path / "runs" / "trialkill"
    _wait_for(lambda: any(len(e) >= 1 for e in _epochs_by_trial(run).values()) and _trial_worker_pids(),
              timeout=600, process=process, what="the first epoch")
    first_trial = next(t for t, e in _epochs_by_trial(run).items() if len(e) >= 1)
    for pid in _trial_worker_pids():
        os.kill(pid, signal.SIGKILL)

    output, _ = process.communicate(timeout=1200)
    assert process.returncode == 0, output[-3000:]
    epochs = _epochs_by_trial(run)
    # A retry that started from zero would report epoch 1 twice.
    assert epochs[first_trial] == sorted(set(epochs[first_trial])), epochs[first_trial]
    assert epochs[first_trial][-1] == 3
    trials = pd.read_parquet(run / "trials.parquet")
    assert len(trials) == 4
    assert (trials["status"] == "TERMINATED").all()


def test_killed_driver_resumes_without_loss(tmp_path):
    process = _start(tmp_path, *_common_options("driverkill"))
    run = tmp_path / "runs" / "driverkill"
    _wait_for(lambda: sum(len(e) == 3 for e in _epochs_by_trial(run).values()) >= 1
              and len(_epochs_by_trial(run)) >= 2, timeout=900, process=process, what="one finished trial")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    finished_before = {t: e for t, e in _epochs_by_trial(run).items() if len(e) == 3}

    resumed = _start(tmp_path, "--resume", str(run))
    output, _ = resumed.communicate(timeout=1500)
    assert resumed.returncode == 0, output[-3000:]
    epochs = _epochs_by_trial(run)
    trials = pd.read_parquet(run / "trials.parquet")
    assert len(trials) == 4
    assert (trials["status"] == "TERMINATED").all(), trials[["trial_id", "status", "error"]]
    for trial_id, before in finished_before.items():
        assert epochs[trial_id] == before, f"finished trial {trial_id} was rerun"
    for trial_id, trial_epochs in epochs.items():
        assert trial_epochs == sorted(set(trial_epochs)), f"trial {trial_id} repeated epochs {trial_epochs}"
    # The resumed search kept TPE over the conditional space, with the results of the trials before the kill.
    searcher = pickle.loads(max(run.glob("searcher-state-*.pkl")).read_bytes())
    assert type(searcher["_sampler"]).__name__ == "TPESampler"
    assert type(searcher["_space"]).__name__ == "ConditionalSpace"
    assert len(searcher["_ot_study"].trials) == 4
