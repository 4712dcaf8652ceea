"""Per-loss search spaces: each loss samples β and λ from its own ranges, under its own names."""
import optuna
import pytest

from po_cluster.config import ConfigError, SweepConfig, load_config
from po_cluster.sweep.searcher import ResumableOptunaSearch
from po_cluster.sweep.space import define_by_run, distributions, loss_ranges, starting_points
from po_cluster.sweep.trial import trial_run_config


def _sweep(**space) -> SweepConfig:
    return SweepConfig.model_validate({"space": {"beta": {"low": 0.05, "high": 2.0}, **space}})


def test_ipo_has_its_own_beta_range_by_default_and_a_config_overrides_it_loss_by_loss():
    ranges = loss_ranges(_sweep())
    assert (ranges["ipo"][0].low, ranges["ipo"][0].high) == (0.014, 0.019)
    assert (ranges["ipo"][1].low, ranges["ipo"][1].high) == (100.0, 250.0)
    assert (ranges["dpo"][0].low, ranges["dpo"][0].high) == (0.05, 2.0)
    tuned = loss_ranges(_sweep(per_loss={"kto": {"kl_weight": {"low": 1, "high": 4}}}))
    assert tuned["ipo"][0].high == 0.019 and (tuned["kto"][1].low, tuned["kto"][1].high) == (1, 4)
    assert loss_ranges(_sweep(per_loss={"ipo": {}}))["ipo"][0].high == 2.0, "{} restores the shared range"


def test_a_per_loss_entry_for_a_loss_not_searched_is_refused(tmp_path):
    bad = tmp_path / "sweep.yaml"
    bad.write_text("space:\n  loss_type: [dpo]\n  per_loss:\n    ipo: {beta: {low: 0.01, high: 0.1}}\n")
    with pytest.raises(ConfigError, match="per_loss names \\['ipo'\\]"):
        load_config(bad, SweepConfig)


def test_every_sampled_trial_uses_its_losss_ranges_and_names():
    cfg = _sweep(lr={"low": 1e-4, "high": 1e-3})
    space, dists = define_by_run(cfg), distributions(cfg)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        chosen = space(trial)
        loss = trial.params["loss_type"]
        seen.add(loss)
        beta = dists[f"beta_{loss}"]
        assert beta.low <= chosen["beta"] <= beta.high and chosen["beta"] == trial.params[f"beta_{loss}"]
        assert set(trial.params) == {"loss_type", f"beta_{loss}", f"kl_weight_{loss}", "lr"}
        run = trial_run_config(cfg, {**trial.params, **chosen}, "t")
        assert (run.loss.loss_type, run.loss.beta, run.loss.kl_weight) == (loss, chosen["beta"], chosen["kl_weight"])
        study.tell(trial, 0.0)
    assert seen == {"dpo", "ipo", "kto"}


def test_the_starting_points_sit_in_the_middle_of_each_losss_ranges():
    points = {p["loss_type"]: p for p in starting_points(_sweep())}
    assert points["ipo"]["beta_ipo"] == pytest.approx((0.014 * 0.019) ** 0.5)
    assert points["dpo"]["beta_dpo"] == pytest.approx((0.05 * 2.0) ** 0.5)
    assert "beta" not in points["dpo"], "the plain names are returned by the space, not sampled"


def test_the_searcher_suggests_the_starting_points_then_samples_and_adopts_define_by_run_trials():
    cfg = _sweep()
    searcher = ResumableOptunaSearch(space=define_by_run(cfg), distributions=distributions(cfg),
                                     points_to_evaluate=starting_points(cfg), metric="objective", mode="max",
                                     sampler=optuna.samplers.TPESampler(seed=0), seed=0)
    first = [searcher.suggest(f"t{i}") for i in range(3)]
    assert [c["loss_type"] for c in first] == ["dpo", "ipo", "kto"]
    assert first[1]["beta"] == first[1]["beta_ipo"] == pytest.approx((0.014 * 0.019) ** 0.5)
    searcher.adopt("stray", {"loss_type": "ipo", "beta_ipo": 0.017, "kl_weight_ipo": 150.0, "beta": 0.017,
                             "kl_weight": 150.0})
    searcher.on_trial_complete("stray", {"objective": 0.9})
    best = searcher._ot_study.best_trial
    assert best.params == {"loss_type": "ipo", "beta_ipo": 0.017, "kl_weight_ipo": 150.0}


def test_a_define_by_run_searcher_saves_and_restores_with_the_standard_pickle(tmp_path):
    cfg = _sweep()

    def make():
        return ResumableOptunaSearch(space=define_by_run(cfg), distributions=distributions(cfg),
                                     metric="objective", mode="max", seed=0)

    searcher = make()
    searcher.suggest("t0")
    searcher.save_to_dir(str(tmp_path))  # Tune's searcher-state file: pickle.dump of the searcher's dict
    restored = make()
    restored.restore_from_dir(str(tmp_path))
    assert restored.knows("t0") and restored.suggest("t1")["loss_type"] in cfg.space.loss_type
