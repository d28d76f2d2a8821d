"""QuorumASHA: trials wait at a rung until it has a quorum, waiting trials free their worker, rungs survive a resume."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from results.export import _trial_states
from search.asha import QuorumASHA, QuorumConcurrencyLimiter, resolve_quorum, rung_milestones

CONTINUE, PAUSE, STOP = TrialScheduler.CONTINUE, TrialScheduler.PAUSE, TrialScheduler.STOP


@dataclass
class FakeTrial:
    trial_id: str
    status: str = Trial.RUNNING

    def set_status(self, status):
        self.status = status


class CountingSearcher(Searcher):
    def __init__(self):
        super().__init__(metric="score", mode="max")

    def suggest(self, trial_id):
        return {"x": 1}

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass


class FakeGenerator:
    """Stand-in for Tune's SearchGenerator: ``searcher`` and ``is_finished``."""

    def __init__(self, limiter, total):
        self.searcher, self.total, self.created = limiter, total, 0

    def is_finished(self):
        return self.created >= self.total


class FakeController:
    def __init__(self, scheduler, *, total=100, max_concurrent=2):
        self.scheduler = scheduler
        self.limiter = QuorumConcurrencyLimiter(CountingSearcher(), max_concurrent=max_concurrent)
        self.search_alg = FakeGenerator(self.limiter, total)
        self.trials: dict[str, FakeTrial] = {}
        self.marked: list[str] = []

    def _mark_trial_to_checkpoint(self, trial):
        self.marked.append(trial.trial_id)

    def get_trials(self):
        return list(self.trials.values())

    def stop_trial(self, trial):
        assert trial.status == Trial.PAUSED, f"only paused trials are stopped here, not {trial}"
        trial.status = Trial.TERMINATED
        self.scheduler.on_trial_remove(self, trial)
        self.limiter.on_trial_complete(trial.trial_id)

    def add(self, trial_id):
        assert self.limiter.suggest(trial_id) is not None, f"the limiter refused {trial_id}"
        self.search_alg.created += 1
        trial = self.trials[trial_id] = FakeTrial(trial_id)
        self.scheduler.on_trial_add(self, trial)
        return trial

    def report(self, trial_id, epoch, score):
        trial = self.trials[trial_id]
        decision = self.scheduler.on_trial_result(self, trial, {"training_iteration": epoch, "score": score})
        if decision == PAUSE:
            trial.status = Trial.PAUSED
        elif decision == STOP:
            trial.status = Trial.TERMINATED
            self.scheduler.on_trial_complete(self, trial, {})
            self.limiter.on_trial_complete(trial_id)
        return decision


def new_scheduler(**options):
    options = {"max_t": 8, "grace_period": 1, "reduction_factor": 4, "max_concurrent": 2, **options}
    return QuorumASHA(metric="score", mode="max", **options)


def test_rung_milestones():
    assert rung_milestones(grace_period=1, max_t=8, reduction_factor=4) == [1, 4]
    assert rung_milestones(grace_period=1, max_t=16, reduction_factor=4) == [1, 4]
    assert rung_milestones(grace_period=1, max_t=17, reduction_factor=4) == [1, 4, 16]
    assert rung_milestones(grace_period=2, max_t=8, reduction_factor=2) == [2, 4]
    assert rung_milestones(grace_period=3, max_t=3, reduction_factor=2) == []
    assert rung_milestones(grace_period=1, max_t=8, reduction_factor=1.5) == [1, 2, 3, 5]


def test_rung_waits_for_quorum():
    scheduler = new_scheduler()
    controller = FakeController(scheduler)
    assert scheduler.quorum == 4
    for index, score in enumerate([0.5, 0.9, 0.1]):
        controller.add(f"t{index}")
        assert controller.report(f"t{index}", 1, score) == PAUSE
    # The waiting trials hold no worker, so the limiter lets new trials start.
    assert controller.limiter.waiting_trials == {"t0", "t1", "t2"}
    controller.add("t3")
    assert controller.report("t3", 1, 0.3) == STOP

    # t1 (0.9) passed. t0 and t2 stop at Tune's next call to choose_trial_to_run, which resumes t1.
    chosen = scheduler.choose_trial_to_run(controller)
    assert chosen.trial_id == "t1"
    assert controller.trials["t0"].status == Trial.TERMINATED
    assert controller.trials["t2"].status == Trial.TERMINATED
    # Tune's experiment state must show them stopped, or a resumed search would run them again.
    assert sorted(controller.marked) == ["t0", "t2"]
    chosen.status = Trial.RUNNING
    assert controller.report("t1", 2, 0.91) == CONTINUE
    assert controller.limiter.waiting_trials == set()
    assert controller.limiter.live_trials == {"t1"}


def test_rung_with_quorum_decides_at_once():
    scheduler = new_scheduler(max_concurrent=8)
    controller = FakeController(scheduler, max_concurrent=8)
    for index, score in enumerate([0.2, 0.4, 0.6, 0.8]):
        controller.add(f"t{index}")
        controller.report(f"t{index}", 1, score)
    controller.add("late-good")
    assert controller.report("late-good", 1, 0.95) == CONTINUE
    controller.add("late-poor")
    assert controller.report("late-poor", 1, 0.5) == STOP


def test_quorum_one_decides_on_arrival():
    scheduler = new_scheduler(quorum=1)
    controller = FakeController(scheduler)
    controller.add("first")
    assert controller.report("first", 1, 0.5) == CONTINUE
    controller.add("worse")
    assert controller.report("worse", 1, 0.4) == STOP


def test_mode_min_keeps_lowest():
    scheduler = QuorumASHA(metric="score", mode="min", max_t=8, reduction_factor=2, quorum=2, max_concurrent=2)
    controller = FakeController(scheduler)
    controller.add("high")
    assert controller.report("high", 1, 0.9) == PAUSE
    controller.add("low")
    assert controller.report("low", 1, 0.1) == CONTINUE
    scheduler.choose_trial_to_run(controller)
    assert controller.trials["high"].status == Trial.TERMINATED


def test_last_epoch_stops():
    scheduler = new_scheduler(quorum=1)
    controller = FakeController(scheduler)
    controller.add("t")
    assert controller.report("t", 1, 0.5) == CONTINUE
    assert controller.report("t", 2, 0.5) == CONTINUE
    assert controller.report("t", 4, 0.5) == CONTINUE
    assert controller.report("t", 8, 0.5) == STOP


def test_passed_trial_waits_for_free_worker():
    scheduler = new_scheduler(reduction_factor=2, quorum=2)
    controller = FakeController(scheduler, max_concurrent=2)
    controller.add("waits")
    assert controller.report("waits", 1, 0.9) == PAUSE
    controller.add("ties")
    controller.add("busy")
    # A tie at the cutoff: both go on, and the worker of the one that waited is taken.
    assert controller.report("ties", 1, 0.9) == CONTINUE
    assert scheduler.choose_trial_to_run(controller) is None
    assert controller.trials["waits"].status == Trial.PAUSED
    # The limiter counts the passed trial again, so no further trial starts meanwhile.
    assert controller.limiter.suggest("another") is None
    controller.trials["busy"].status = Trial.TERMINATED
    scheduler.on_trial_complete(controller, controller.trials["busy"], {})
    controller.limiter.on_trial_complete("busy")
    assert scheduler.choose_trial_to_run(controller).trial_id == "waits"


def test_waiting_decided_when_search_idle():
    scheduler = new_scheduler()
    controller = FakeController(scheduler, total=3)
    for index, score in enumerate([0.5, 0.9, 0.1]):
        controller.add(f"t{index}")
        assert controller.report(f"t{index}", 1, score) == PAUSE
    # Three trials in all: the rung never reaches 4, so once nothing runs the best one goes on.
    chosen = scheduler.choose_trial_to_run(controller)
    assert chosen.trial_id == "t1"
    assert {t: trial.status for t, trial in controller.trials.items()} == {
        "t0": Trial.TERMINATED, "t1": Trial.PAUSED, "t2": Trial.TERMINATED}


def test_no_decision_while_trial_runs():
    scheduler = new_scheduler()
    controller = FakeController(scheduler, total=2)
    controller.add("waits")
    controller.report("waits", 1, 0.5)
    controller.add("runs")
    assert scheduler.choose_trial_to_run(controller) is None
    assert controller.trials["waits"].status == Trial.PAUSED
    assert controller.limiter.waiting_trials == {"waits"}


def test_state_restored_from_limiter():
    scheduler = new_scheduler()
    controller = FakeController(scheduler)
    for index, score in enumerate([0.5, 0.9, 0.1, 0.3, 0.7]):
        controller.add(f"t{index}")
        controller.report(f"t{index}", 1, score)
    # Tune's SearchGenerator saves each wrapper's get_state() with cloudpickle, so pickle it here too.
    saved = pickle.loads(pickle.dumps(controller.limiter.get_state()))

    restored = new_scheduler()
    restored_controller = FakeController(restored)
    restored_controller.limiter.set_state(saved)
    restored.on_trial_add(restored_controller, FakeTrial("t1", Trial.PENDING))
    assert restored.get_state()["recorded"] == scheduler.get_state()["recorded"]
    assert restored.get_state()["recorded"][1] == {"t0": 0.5, "t1": 0.9, "t2": 0.1, "t3": 0.3, "t4": 0.7}
    # The restored rung already has its quorum, so a new trial is decided at once.
    restored_controller.trials["new"] = FakeTrial("new")
    assert restored.on_trial_result(restored_controller, restored_controller.trials["new"],
                                    {"training_iteration": 1, "score": 0.2}) == STOP


def test_resumed_waiting_trial_stays_paused():
    scheduler = new_scheduler()
    controller = FakeController(scheduler)
    for index, score in enumerate([0.5, 0.9]):
        controller.add(f"t{index}")
        controller.report(f"t{index}", 1, score)
    saved = pickle.loads(pickle.dumps(controller.limiter.get_state()))

    restored = new_scheduler()
    restored_controller = FakeController(restored)
    restored_controller.limiter.set_state(saved)
    # A resumed search re-adds unfinished trials as pending; a new trial stays pending.
    waiting = FakeTrial("t0", Trial.PENDING)
    new = FakeTrial("new", Trial.PENDING)
    restored.on_trial_add(restored_controller, waiting)
    restored.on_trial_add(restored_controller, new)
    assert waiting.status == Trial.PAUSED
    assert new.status == Trial.PENDING


def test_restarted_waiting_trial_pauses():
    scheduler = new_scheduler()
    controller = FakeController(scheduler)
    controller.add("t0")
    controller.report("t0", 1, 0.5)
    # A resumed search starts unfinished trials, paused ones included, from their checkpoint.
    controller.trials["t0"].status = Trial.RUNNING
    assert controller.report("t0", 2, 0.55) == PAUSE


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match=r"reduction_factor must be > 1, got 1\."):
        QuorumASHA(max_t=8, reduction_factor=1)
    with pytest.raises(ValueError, match=r"grace_period must be in \[1, max_t=4\], got 5\."):
        QuorumASHA(max_t=4, grace_period=5)
    with pytest.raises(ValueError, match=r"quorum must be at least 1, got 0\."):
        QuorumASHA(max_t=8, quorum=0)


def test_missing_metric_raises():
    scheduler = QuorumASHA(max_t=8)
    with pytest.raises(ValueError, match="QuorumASHA has no metric or mode: pass metric and mode to tune.TuneConfig"):
        scheduler.on_trial_add(FakeController(scheduler), FakeTrial("t0", Trial.PENDING))


def test_resolve_quorum_default():
    assert resolve_quorum(None, 4) == 4
    assert resolve_quorum(None, 2.5) == 3
    assert resolve_quorum(1, 4) == 1


# A cheap Tune trainable: a fixed learning curve per trial, one checkpoint per epoch, so that pausing and
# resuming are real. It records every epoch it runs in a log file, which shows any epoch run twice.
TRAINABLE = textwrap.dedent("""
    import json, os, tempfile, time
    from ray import tune

    def curve(config):
        log = os.environ["ASHA_TEST_LOG"]
        start = 0
        checkpoint = tune.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as folder:
                start = json.load(open(os.path.join(folder, "state.json")))["epoch"]
        for epoch in range(start + 1, 9):
            time.sleep(0.05)
            score = config["quality"] * (1 - 0.5 ** epoch)
            with open(log, "a") as file:
                file.write(json.dumps({"trial": tune.get_context().get_trial_id(), "epoch": epoch}) + "\\n")
            with tempfile.TemporaryDirectory() as folder:
                json.dump({"epoch": epoch}, open(os.path.join(folder, "state.json"), "w"))
                tune.report({"score": score}, checkpoint=tune.Checkpoint.from_directory(folder))
""")

EXPERIMENT = textwrap.dedent("""
    import sys, ray, optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch
    from search.asha import QuorumASHA, QuorumConcurrencyLimiter
    from curve_trainable import curve

    storage, resume = sys.argv[1], sys.argv[2] == "resume"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    if resume:
        tuner = tune.Tuner.restore(storage + "/asha", trainable=curve, resume_unfinished=True)
    else:
        searcher = OptunaSearch(space={"quality": optuna.distributions.FloatDistribution(0.0, 1.0)}, metric="score",
                                mode="max", sampler=optuna.samplers.RandomSampler(seed=0))
        tuner = tune.Tuner(curve, tune_config=tune.TuneConfig(
            metric="score", mode="max", num_samples=12, reuse_actors=True,
            search_alg=QuorumConcurrencyLimiter(searcher, max_concurrent=2),
            scheduler=QuorumASHA(max_t=8, grace_period=1, reduction_factor=4, max_concurrent=2)),
            run_config=tune.RunConfig(name="asha", storage_path=storage, verbose=0))
    tuner.fit()
""")


def _run_experiment(tmp_path: Path, mode: str) -> subprocess.Popen:
    (tmp_path / "curve_trainable.py").write_text(TRAINABLE)
    (tmp_path / "experiment.py").write_text(EXPERIMENT)
    repository = Path(__file__).resolve().parents[2]
    env = {**os.environ, "ASHA_TEST_LOG": str(tmp_path / "epochs.jsonl"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(repository), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(tmp_path / "experiment.py"), str(tmp_path / "runs"), mode],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _epochs_run(tmp_path: Path) -> dict[str, list[int]]:
    epochs: dict[str, list[int]] = {}
    log = tmp_path / "epochs.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        entry = json.loads(line)
        epochs.setdefault(entry["trial"], []).append(entry["epoch"])
    return epochs


def _saved_scheduler_state(tmp_path: Path) -> dict:
    state_file = max((tmp_path / "runs" / "asha").glob("search_gen_state-*.json"), key=os.path.getmtime)
    # Tune writes this file with cloudpickle, whatever its suffix.
    return pickle.loads(state_file.read_bytes())["name:QuorumConcurrencyLimiter"]["scheduler_state"]


@pytest.mark.integration
def test_real_search_pauses_from_checkpoints(tmp_path):
    process = _run_experiment(tmp_path, "start")
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    epochs = _epochs_run(tmp_path)
    assert len(epochs) == 12
    # Every trial ran its epochs once each, in order, although most of them were paused at epoch 1.
    for trial_id, trial_epochs in epochs.items():
        assert trial_epochs == list(range(1, len(trial_epochs) + 1)), (trial_id, trial_epochs)
    # No trial went past a rung before 4 trials had reported there (the log is in the order epochs ran).
    order = [json.loads(line)["epoch"] for line in (tmp_path / "epochs.jsonl").read_text().splitlines()]
    assert order[:order.index(2)].count(1) >= 4, order
    reached_rung_4 = sum(len(e) >= 4 for e in epochs.values())
    assert order[:order.index(5)].count(4) >= min(4, reached_rung_4), order
    # Scores grow with the trial's quality at every epoch, so the best trial at epoch 1 is the best at every
    # rung and must run all 8 epochs; most trials stop at epoch 1.
    # Tune's experiment state shows every trial as finished, those stopped while paused included; a trial left
    # PAUSED there would run again after --resume.
    statuses = {trial_id: state["status"] for trial_id, state in _trial_states(tmp_path / "runs" / "asha").items()}
    assert len(statuses) == 12
    assert set(statuses.values()) == {"TERMINATED"}, statuses
    state = _saved_scheduler_state(tmp_path)
    assert len(state["recorded"][1]) == 12
    best = max(state["recorded"][1], key=state["recorded"][1].get)
    assert len(epochs[best]) == 8
    assert sum(len(e) > 1 for e in epochs.values()) <= 6, epochs


@pytest.mark.integration
def test_rungs_survive_killed_driver(tmp_path):
    process = _run_experiment(tmp_path, "start")
    deadline = time.monotonic() + 600
    while sum(1 for e in _epochs_run(tmp_path).values() if e) < 6:
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"the search ended before 6 trials started:\n{process.stdout.read()[-3000:]}")
        time.sleep(0.2)
    # Tune saves the experiment state at most every few seconds; let one save happen, then kill.
    time.sleep(12)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    recorded_before = _saved_scheduler_state(tmp_path)["recorded"]
    assert recorded_before[1], "no rung result was saved before the kill"

    resumed = _run_experiment(tmp_path, "resume")
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-3000:]
    recorded_after = _saved_scheduler_state(tmp_path)["recorded"]
    # Results recorded before the kill are still there, alongside those of the trials after it.
    assert recorded_before[1].items() <= recorded_after[1].items()
    assert len(recorded_after[1]) == 12
