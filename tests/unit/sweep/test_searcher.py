"""The sweep's searcher reconciled with the trials Tune restored, when the experiment state and the
searcher state on storage are from two moments (a driver killed between their uploads)."""
import optuna
import pytest
from ray.tune.experiment import Trial

from po_cluster.sweep.searcher import ReconcileOnRestore, ResumableOptunaSearch, reconcile, search_algorithm

SPACE = {"beta": optuna.distributions.FloatDistribution(0.01, 1.0, log=True),
         "loss_type": optuna.distributions.CategoricalDistribution(["dpo", "ipo"])}


def _search_alg(max_concurrent: int = 2):
    searcher = ResumableOptunaSearch(space=SPACE, metric="objective", mode="max",
                                     sampler=optuna.samplers.TPESampler(seed=0), seed=0)
    return search_algorithm(searcher, max_concurrent)


def _trial(trial_id: str, config: dict, status: str = Trial.RUNNING, objective: float | None = None) -> Trial:
    trial = Trial("trainable", config=config, trial_id=trial_id, stub=True)
    trial.set_status(status)
    if objective is not None:
        trial.update_last_result({"objective": objective, "training_iteration": 3})
    return trial


def _suggest(search_alg, trial_id: str) -> dict:
    config = search_alg.searcher.suggest(trial_id)
    assert config, f"no suggestion for {trial_id}"
    state = search_alg.get_state()
    search_alg.set_state({**state, "counter": state["counter"] + 1})  # as create_trial_if_possible does
    return config


def _restored(saved_from, tmp_path):
    saved_from.save_to_dir(str(tmp_path), session_str="s")
    fresh = _search_alg()
    fresh.restore_from_dir(str(tmp_path))
    return fresh


def _study(search_alg):
    return search_alg.searcher.searcher._ot_study


def test_trials_begun_after_the_saved_searcher_state_are_adopted_and_learnt(tmp_path):
    running = _search_alg()
    config_a, config_b = _suggest(running, "a"), _suggest(running, "b")
    restored = _restored(running, tmp_path)  # the searcher as saved: a and b running
    running.searcher.on_trial_complete("a", {"objective": 0.5})
    config_c = _suggest(running, "c")  # the experiment as saved later: a done, b and c running
    trials = [_trial("a", config_a, Trial.TERMINATED, 0.5), _trial("b", config_b), _trial("c", config_c)]

    reconcile(restored, trials)
    limiter = restored.searcher
    assert limiter.live_trials == {"b", "c"}
    assert restored.get_state()["counter"] == 3
    limiter.on_trial_result("c", {"objective": 0.2, "training_iteration": 1})  # Ray's OptunaSearch: KeyError
    limiter.on_trial_complete("c", {"objective": 0.7})
    finished = {t.value: t.params for t in _study(restored).get_trials()
                if t.state == optuna.trial.TrialState.COMPLETE}
    assert finished == {0.5: config_a, 0.7: config_c}, "both ends reach the study, c with its own parameters"


def test_trials_missing_from_the_experiment_state_free_their_place(tmp_path):
    running = _search_alg(max_concurrent=2)
    config_a = _suggest(running, "a")
    _suggest(running, "b")
    trials = [_trial("a", config_a)]  # the experiment as saved: only a had been made
    restored = _restored(running, tmp_path)  # the searcher as saved later: a and b running

    reconcile(restored, trials)
    limiter = restored.searcher
    assert limiter.live_trials == {"a"}
    assert restored.get_state()["counter"] == 1, "b will be made again, so num_samples still run"
    assert limiter.suggest("d"), "b's place is free: the limiter suggests again"
    states = {t.number: t.state for t in _study(restored).get_trials()}
    assert states[1] == optuna.trial.TrialState.PRUNED, "b's Optuna trial is closed, not left running"


def test_trials_the_restored_searcher_saw_end_run_again(tmp_path):
    running = _search_alg()
    config_a = _suggest(running, "a")
    running.searcher.on_trial_complete("a", {"objective": 0.4})
    restored = _restored(running, tmp_path)  # a ended, but the experiment saved it running: Tune reruns it

    reconcile(restored, [_trial("a", config_a)])
    assert restored.searcher.live_trials == {"a"}, "it runs, so it holds a place"
    restored.searcher.on_trial_complete("a", {"objective": 0.6})
    assert restored.searcher.live_trials == set()
    values = [t.value for t in _study(restored).get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert values == [0.4], "told once"


def test_the_callback_reconciles_once_per_driver_and_again_after_unpickling():
    import ray.cloudpickle as pickle  # how Tune writes tuner.pkl

    search_alg = _search_alg()
    callback = ReconcileOnRestore(search_alg)
    callback.on_step_begin(1, [])
    config = _suggest(search_alg, "a")
    callback.on_step_begin(2, [])  # a second step does not drop a (not yet in Tune's list)
    assert search_alg.searcher.live_trials == {"a"}
    restored = pickle.loads(pickle.dumps(callback))
    assert restored.search_alg is not search_alg
    restored.on_step_begin(1, [_trial("a", config)])
    assert restored.search_alg.searcher.live_trials == {"a"}


def test_a_search_algorithm_of_another_shape_is_refused():
    from ray.tune.search.search_generator import SearchGenerator

    with pytest.raises(TypeError, match="ConcurrencyLimiter"):
        reconcile(SearchGenerator(_search_alg().searcher.searcher), [])
