"""ASHA that waits for a quorum at each rung, and keeps its rungs when a search resumes.

Ray Tune's ``AsyncHyperBandScheduler`` decides on a trial the moment it reaches a rung, against the
trials that reached that rung before it. The first trials of a search are compared with few others or
none, so they go on to the next rung, and with a few dozen trials those early promotions take a large
share of the epochs. It also keeps its rungs only in memory: Ray 2.60 does not save schedulers with the
experiment, so after ``--resume`` every rung starts empty.

:class:`QuorumASHA` pauses a trial that reaches a rung where fewer than ``quorum`` trials have reported.
The trial keeps the checkpoint of that epoch. Once the rung has ``quorum`` results, the trial goes on if its
objective is in the top ``1 / reduction_factor`` of the rung, and stops otherwise. Later trials at that rung
are decided as soon as they report. While a trial waits, its worker is free for a
new trial. When no new trial can start and every other trial has finished, waiting trials are decided
with the results their rungs have, so the best of them goes on.

:class:`QuorumConcurrencyLimiter` is the ``ConcurrencyLimiter`` that goes with it: waiting trials do not
count against ``max_concurrent``, and the scheduler's state travels in the limiter's saved state, which
Tune writes with every experiment checkpoint and reads back on resume. The two find each other at run
time through the controller's ``search_alg``, never through a reference that pickling would copy.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import ray
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

__all__ = ["QuorumASHA", "QuorumConcurrencyLimiter", "resolve_quorum", "rung_milestones"]

logger = logging.getLogger(__name__)


def rung_milestones(*, grace_period: int, max_t: int, reduction_factor: float) -> list[int]:
    """Return the epochs at which ASHA compares trials: ``grace_period * reduction_factor ** k`` below ``max_t``."""
    milestones = []
    k = 0
    while True:
        milestone = int(round(grace_period * reduction_factor**k))
        if milestone >= max_t:
            return milestones
        if not milestones or milestone > milestones[-1]:
            milestones.append(milestone)
        k += 1


def resolve_quorum(quorum: int | None, reduction_factor: float) -> int:
    """Return the rung quorum: ``quorum`` when set, else the reduction factor rounded up."""
    return math.ceil(reduction_factor) if quorum is None else int(quorum)


class QuorumASHA(FIFOScheduler):
    """Asynchronous successive halving with a quorum per rung.

    Args:
        max_t: epochs (``time_attr`` units) of a trial that is never stopped.
        grace_period: the first rung.
        reduction_factor: a trial passes a rung when its objective is in the top ``1 / reduction_factor``
            of the results recorded there.
        quorum: results a rung needs before any trial passes it; ``None`` takes ``ceil(reduction_factor)``,
            and 1 decides every trial when it arrives, as Ray's ASHA does.
        max_concurrent: trials that may run at once; a paused trial that passes its rung resumes only
            when fewer than this many run.
        time_attr, metric, mode: as in Ray Tune's schedulers.
    """

    def __init__(self, *, max_t: int, grace_period: int = 1, reduction_factor: float = 4, quorum: int | None = None,
                 max_concurrent: int = 1, time_attr: str = "training_iteration", metric: str | None = None,
                 mode: str | None = None):
        if reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1, got {reduction_factor}.")
        if grace_period < 1 or grace_period > max_t:
            raise ValueError(f"grace_period must be in [1, max_t={max_t}], got {grace_period}.")
        quorum = resolve_quorum(quorum, reduction_factor)
        if quorum < 1:
            raise ValueError(f"quorum must be at least 1, got {quorum}.")
        super().__init__()
        self._metric, self._mode = metric, mode
        self._time_attr = time_attr
        self._max_t = max_t
        self._reduction_factor = float(reduction_factor)
        self._quorum = quorum
        self._max_concurrent = int(max_concurrent)
        self._milestones = rung_milestones(grace_period=grace_period, max_t=max_t, reduction_factor=reduction_factor)
        self._recorded: dict[int, dict[str, float]] = {m: {} for m in self._milestones}
        # Paused trials without a decision, by rung, and paused trials already decided.
        self._waiting: dict[int, set[str]] = {m: set() for m in self._milestones}
        self._passed: set[str] = set()
        self._failed: set[str] = set()
        self._num_stopped = 0
        self._state_loaded = False

    @property
    def milestones(self) -> list[int]:
        return list(self._milestones)

    @property
    def quorum(self) -> int:
        return self._quorum

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    # -- state ---------------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """Return the rungs and the waiting and decided trials, as plain data."""
        return {"milestones": list(self._milestones),
                "recorded": {m: dict(values) for m, values in self._recorded.items()},
                "waiting": {m: sorted(ids) for m, ids in self._waiting.items()},
                "passed": sorted(self._passed), "failed": sorted(self._failed), "num_stopped": self._num_stopped}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_state` returned; rungs that no longer exist are dropped."""
        for milestone in self._milestones:
            self._recorded[milestone] = dict(state["recorded"].get(milestone, {}))
            self._waiting[milestone] = set(state["waiting"].get(milestone, ()))
        self._passed, self._failed = set(state["passed"]), set(state["failed"])
        self._num_stopped = int(state["num_stopped"])

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.get_state(), file)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as file:
            self.set_state(pickle.load(file))

    def waiting_trial_ids(self) -> set[str]:
        """Return the trials paused at a rung that hold no worker: undecided, or decided to stop."""
        undecided = set().union(*self._waiting.values()) if self._waiting else set()
        return undecided | self._failed

    # -- Tune callbacks --------------------------------------------------------------------------------

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        if not self._metric or not self._mode:
            raise ValueError(f"{type(self).__name__} has no metric or mode: pass metric and mode to tune.TuneConfig.")
        self._load_state(tune_controller)
        if trial.status == Trial.PENDING and (self._is_waiting(trial.trial_id) or trial.trial_id in self._failed
                                              or trial.trial_id in self._passed):
            # A resumed search re-adds paused trials as pending, and Tune starts every pending trial. Tune adds the
            # trial to its status sets after this call, so marking it paused here keeps it at its rung's checkpoint.
            trial.set_status(Trial.PAUSED)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        self._load_state(tune_controller)
        if self._time_attr not in result or result.get(self._metric) is None:
            return TrialScheduler.CONTINUE
        trial_id, epoch = trial.trial_id, result[self._time_attr]
        if trial_id in self._failed:
            # The trial failed its rung while a crash or a resume restarted it, so it stops now.
            return self._stop(tune_controller)
        if self._is_waiting(trial_id):
            # A waiting trial that Tune restarted anyway pauses again at its next result.
            return TrialScheduler.PAUSE
        self._passed.discard(trial_id)
        if epoch >= self._max_t:
            return self._stop(tune_controller)

        value = float(result[self._metric]) * (1.0 if self._mode == "max" else -1.0)
        milestone = next((m for m in reversed(self._milestones) if epoch >= m and trial_id not in self._recorded[m]),
                         None)
        if milestone is None:
            return TrialScheduler.CONTINUE
        recorded = self._recorded[milestone]
        recorded[trial_id] = value
        if len(recorded) < self._quorum:
            self._waiting[milestone].add(trial_id)
            logger.debug("Trial %s waits at epoch %s: %d of %d results at this rung", trial_id, epoch,
                         len(recorded), self._quorum)
            self._publish(tune_controller)
            return TrialScheduler.PAUSE
        self._decide_waiting(milestone)
        if value >= self._cutoff(milestone):
            self._publish(tune_controller)
            return TrialScheduler.CONTINUE
        return self._stop(tune_controller)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._forget(tune_controller, trial.trial_id)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._forget(tune_controller, trial.trial_id)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._forget(tune_controller, trial.trial_id)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        self._load_state(tune_controller)
        trials = tune_controller.get_trials()
        self._stop_failed(tune_controller, trials)
        if self._is_idle(tune_controller, trials):
            for milestone in self._milestones:
                if self._waiting[milestone]:
                    logger.debug("No trial is left to fill the rung at epoch %s; deciding with %d results",
                                 milestone, len(self._recorded[milestone]))
                    self._decide_waiting(milestone)
            self._publish(tune_controller)
            self._stop_failed(tune_controller, trials)

        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        running = sum(trial.status == Trial.RUNNING for trial in trials)
        if running < self._max_concurrent:
            for trial in trials:
                if trial.status == Trial.PAUSED and trial.trial_id in self._passed:
                    return trial
        return None

    def debug_string(self) -> str:
        rungs = ", ".join(f"epoch {m}: {len(self._recorded[m])} results, {len(self._waiting[m])} waiting"
                          for m in self._milestones)
        return f"Using ASHA with a quorum of {self._quorum}: {self._num_stopped} stopped; {rungs}"

    # -- helpers ---------------------------------------------------------------------------------------

    def _cutoff(self, milestone: int) -> float:
        values = list(self._recorded[milestone].values())
        return float(np.nanpercentile(values, (1.0 - 1.0 / self._reduction_factor) * 100.0))

    def _decide_waiting(self, milestone: int) -> None:
        cutoff = self._cutoff(milestone)
        for trial_id in sorted(self._waiting[milestone]):
            passed = self._recorded[milestone][trial_id] >= cutoff
            (self._passed if passed else self._failed).add(trial_id)
            logger.debug("Waiting trial %s %s the rung at epoch %s", trial_id, "passed" if passed else "failed",
                         milestone)
        self._waiting[milestone].clear()

    def _stop_failed(self, tune_controller, trials: list[Trial]) -> None:
        """Stop the paused trials that did not pass their rung."""
        controller = getattr(tune_controller, "_tune_controller", tune_controller)
        for trial in trials:
            if trial.status == Trial.PAUSED and trial.trial_id in self._failed:
                logger.debug("Stopping trial %s, which did not pass its rung", trial)
                tune_controller.stop_trial(trial)
                # NOTE: Ray 2.60's stop_trial does not mark a paused trial for the next experiment state, which
                # would then keep it PAUSED, and a resumed search would run it again. This marks it by hand.
                mark = getattr(controller, "_mark_trial_to_checkpoint", None)
                if mark is not None:
                    mark(trial)
                else:
                    logger.warning("Cannot mark stopped trial %s for Tune's experiment state (Ray %s); it may show "
                                   "as PAUSED there.", trial, ray.__version__)

    def _is_waiting(self, trial_id: str) -> bool:
        return any(trial_id in ids for ids in self._waiting.values())

    def _is_idle(self, tune_controller, trials: list[Trial]) -> bool:
        """Return whether no trial can join the waiting ones: none runs or is pending, and the searcher is done."""
        if not any(self._waiting.values()):
            return False
        if any(trial.status in (Trial.RUNNING, Trial.PENDING) for trial in trials):
            return False
        if any(trial.status == Trial.PAUSED and trial.trial_id in self._passed for trial in trials):
            return False
        return tune_controller.search_alg.is_finished()

    def _stop(self, tune_controller) -> str:
        self._num_stopped += 1
        self._publish(tune_controller)
        return TrialScheduler.STOP

    def _forget(self, tune_controller, trial_id: str) -> None:
        for ids in self._waiting.values():
            ids.discard(trial_id)
        self._passed.discard(trial_id)
        self._failed.discard(trial_id)
        self._publish(tune_controller)

    def _limiter(self, tune_controller) -> QuorumConcurrencyLimiter | None:
        searcher = getattr(tune_controller.search_alg, "searcher", None)
        while searcher is not None and not isinstance(searcher, QuorumConcurrencyLimiter):
            searcher = getattr(searcher, "searcher", None)
        return searcher

    def _publish(self, tune_controller) -> None:
        """Hand the limiter the trials that hold no worker, and this scheduler's state for the next checkpoint."""
        limiter = self._limiter(tune_controller)
        if limiter is not None:
            limiter.scheduler_state = self.get_state()
            limiter.waiting_trials = self.waiting_trial_ids()

    def _load_state(self, tune_controller) -> None:
        """On the first call, take back the state that a resumed search's limiter restored."""
        if self._state_loaded:
            return
        self._state_loaded = True
        limiter = self._limiter(tune_controller)
        saved = limiter.scheduler_state if limiter is not None else None
        if saved and saved["milestones"] == self._milestones:
            self.set_state(saved)
            logger.info("Restored ASHA's rungs: %s", self.debug_string())
        elif saved:
            logger.warning("The saved ASHA rungs (epochs %s) do not match this search's (epochs %s); starting "
                           "with empty rungs.", saved["milestones"], self._milestones)


class QuorumConcurrencyLimiter(ConcurrencyLimiter):
    """A ``ConcurrencyLimiter`` that does not count trials waiting at a :class:`QuorumASHA` rung.

    It also carries the scheduler's state, so that Tune saves it with the searcher's state.
    """

    def __init__(self, searcher, max_concurrent: int):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.waiting_trials: set[str] = set()
        self.scheduler_state: dict[str, Any] | None = None

    def suggest(self, trial_id: str) -> dict | None:
        if not self._limit_concurrency:
            return self.searcher.suggest(trial_id)
        active = self.live_trials - self.waiting_trials
        if len(active) >= self.max_concurrent:
            logger.debug("No suggestion for %s: %d of %d trials active, %d waiting at a rung", trial_id, len(active),
                         self.max_concurrent, len(self.live_trials) - len(active))
            return None
        suggestion = self.searcher.suggest(trial_id)
        if suggestion not in (None, Searcher.FINISHED):
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1
        return suggestion
