"""The sweep's search algorithm: Optuna's TPE behind a concurrency limit, safe to resume.

Tune writes the experiment state (the trials) and the searcher state at the same moment, but uploads
them to the storage path as separate files, in parallel. A driver killed during an upload leaves a
pair from two moments, and a resumed sweep then holds trials its searcher never suggested (Ray's
OptunaSearch fails on their first result with a KeyError) or a searcher waiting on trials that no
longer exist (ConcurrencyLimiter counts them as running forever, which can stall the sweep). So the
searcher is reconciled with the trials Tune restored, once, before the first step of each driver:
unknown trials are adopted with their own parameters, trials that ended are told, and vanished ones
are dropped.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import optuna
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.search_generator import SearchGenerator
from ray.tune.utils import flatten_dict

log = logging.getLogger(__name__)


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch that can take over trials a restored state does not know.

    An adopted trial has no Optuna trial while it runs (the study's pruner is a no-op: ASHA prunes,
    so intermediate values change nothing); when it ends, it is added to the study as a finished
    trial with its own parameters, so the sampler still learns from it."""

    def __init__(self, *args, distributions: dict[str, optuna.distributions.BaseDistribution] | None = None,
                 **kwargs) -> None:
        """`distributions`: every parameter a trial may have, needed to adopt trials when `space` is
        a define-by-run function (a dict space is its own)."""
        super().__init__(*args, **kwargs)
        self._distributions = distributions
        self._adopted: dict[str, dict] = {}

    @property
    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        if self._distributions is not None:
            return self._distributions
        if not isinstance(self._space, dict):
            raise TypeError("a define-by-run space needs `distributions` to adopt trials")
        return self._space

    def knows(self, trial_id: str) -> bool:
        return trial_id in self._ot_trials or trial_id in self._adopted or trial_id in self._completed_trials

    def has_completed(self, trial_id: str) -> bool:
        return trial_id in self._completed_trials

    def adopt(self, trial_id: str, config: dict) -> None:
        """Take over a Tune trial from its config (the parameters Optuna sampled for it)."""
        flat = flatten_dict(config)
        self._adopted[trial_id] = {name: flat[name] for name in self.distributions if name in flat}
        log.warning("the searcher adopts trial %s (begun after its last saved state)", trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._adopted:  # reconcile adopted every trial this state did not know
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        params = self._adopted.pop(trial_id, None)
        if params is None or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        value = (result or {}).get(self.metric)
        state = optuna.trial.TrialState.COMPLETE if value is not None else \
            optuna.trial.TrialState.FAIL if error else optuna.trial.TrialState.PRUNED
        if self._ot_study is None:
            raise RuntimeError("the searcher has no study: it was never given its metric and mode")
        try:
            self._ot_study.add_trial(optuna.trial.create_trial(
                state=state, value=value if state == optuna.trial.TrialState.COMPLETE else None,
                params=params, distributions={name: self.distributions[name] for name in params}))
        except ValueError as exc:  # e.g. parameters outside a space the config changed since
            log.warning("trial %s not added to the study: %s", trial_id, exc)
        self._completed_trials.add(trial_id)


def search_algorithm(searcher: ResumableOptunaSearch, max_concurrent: int) -> SearchGenerator:
    """The searcher behind a concurrency limit, wrapped as Tune would wrap it; built here so that
    ReconcileOnRestore can hold the same objects Tune restores state into."""
    return SearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=max_concurrent))


def _result(trial: Trial) -> dict | None:
    return flatten_dict(trial.last_result) if trial.last_result else None


def reconcile(search_alg: SearchGenerator, trials: Sequence[Trial]) -> None:
    """Make the searcher's view agree with the trials Tune holds (see the module docstring)."""
    limiter = search_alg.searcher
    base = getattr(limiter, "searcher", None)
    if not isinstance(limiter, ConcurrencyLimiter) or not isinstance(base, ResumableOptunaSearch):
        raise TypeError(f"reconcile expects SearchGenerator(ConcurrencyLimiter(ResumableOptunaSearch)), "
                        f"not {type(limiter).__name__}({type(base).__name__})")
    by_id = {trial.trial_id: trial for trial in trials}
    for trial_id, trial in by_id.items():
        if not trial.is_finished():
            if not base.knows(trial_id):
                base.adopt(trial_id, trial.config)
            if trial_id not in limiter.live_trials:
                limiter.live_trials.add(trial_id)
                limiter.num_unfinished_live_trials += 1
            continue
        error = trial.status == Trial.ERROR
        if trial_id in limiter.live_trials:
            limiter.on_trial_complete(trial_id, result=_result(trial), error=error)
        elif not base.has_completed(trial_id):
            if not base.knows(trial_id):
                base.adopt(trial_id, trial.config)
            base.on_trial_complete(trial_id, result=_result(trial), error=error)
    for trial_id in sorted(limiter.live_trials - by_id.keys()):  # suggested, but never saved as a trial
        log.warning("trial %s is in the searcher's state but not the experiment's: dropped", trial_id)
        limiter.on_trial_complete(trial_id)
    state = search_alg.get_state()
    state["counter"] = len(by_id)  # trials made, so the sweep still runs num_samples in all
    search_alg.set_state(state)


class ReconcileOnRestore(Callback):
    """Runs `reconcile` before the first step of a driver; Tune pickles this callback with the
    search algorithm (one tuner.pkl), so a restored sweep holds the very objects it restores into."""

    def __init__(self, search_alg: SearchGenerator) -> None:
        self.search_alg = search_alg
        self._done = False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_done": False}  # a restored driver reconciles again

    def on_step_begin(self, iteration: int, trials: list[Trial], **info) -> None:
        if not self._done:
            reconcile(self.search_alg, trials)
            self._done = True
