"""Training on the shipped base model: small, fast runs that must move the right way."""
from pathlib import Path

import numpy as np
import pytest
import torch

from po_cluster.config import LossConfig, load_config, parse_config
from po_cluster.data import world
from po_cluster.data.selection import build_records, prompt_template
from po_cluster.evaluate.metrics import Evaluator
from po_cluster.losses import LossWeights, kl_ref_policy
from po_cluster.train.callbacks import Callback, ProgressCallback
from po_cluster.train.loop import (
    MemorySource,
    TrainState,
    batch_indices,
    build_model,
    fit,
    load_average,
    memory_batch,
    prepare_data,
    train_step,
)
from po_cluster.train.state import load_train_state, save_train_state


def _cfg(**overrides):
    base = {"data": {"n_pairs": 1024, "n_reg": 512},
            "model": {"image_tower": "frozen"},
            "loss": {"beta": 0.1, "kl_weight": 0.1},
            "optimizer": {"lr": 5e-2, "spectral_lr": 5e-2, "warmup_steps": 5},
            "training": {"steps": 200, "batch_size": 128, "reg_batch_size": 128}}
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    return parse_config(base)


def test_reference_logprobs_are_the_policy_at_step_zero():
    cfg = _cfg(model={"image_tower": "full"})
    model = build_model(cfg, torch.device("cpu"))
    data = prepare_data(model, *build_records(cfg.data))
    assert data.pref_emb is None  # a trainable tower is not cached
    idx = np.arange(16)
    _, metrics = train_step(model, data, idx, idx, "dpo", LossConfig(beta=1.0, kl_weight=0.3))
    assert metrics["loss"] == pytest.approx(np.log(2), abs=1e-5)  # h = 0 → −log σ(0)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)


def test_spectral_only_training_keeps_t0_and_moves_away_from_reading(small_sets):
    cfg = _cfg()
    model = build_model(cfg, torch.device("cpu"))
    data = prepare_data(model, *build_records(cfg.data))
    assert data.pref_emb is not None  # the frozen tower's embeddings are cached
    before = Evaluator.build(model, small_sets)
    base_scores = model.logprobs(before.image_emb["attacked"], before.text_emb["attacked"], 0.0)
    result = fit(model, data, cfg)
    load_average(model, result.bma)
    after = Evaluator.build(model, small_sets)
    # t = 0 is exactly the starting model
    scores_t0 = model.logprobs(after.image_emb["attacked"], after.text_emb["attacked"], 0.0)
    assert torch.allclose(scores_t0, base_scores, atol=1e-5)
    m0, m1 = after.metrics(0.0), after.metrics(1.0)
    # On the 64-d tiny base, W alone trades reading for little robustness (the tower must change for
    # more: configs/compare.yaml); it must still move away from the word, and not toward it.
    assert m1["word_only"] < m0["word_only"] - 0.1
    assert m1["attacked"] >= m0["attacked"] and m1["attack_success"] < m0["attack_success"]


def test_the_bias_task_holds_the_class_answers_with_its_kl_term():
    cfg = _cfg(data={"task": "bias", "n_pairs": 64, "n_reg": 32}, training={"batch_size": 32, "reg_batch_size": 32})
    model = build_model(cfg, torch.device("cpu"))
    data = prepare_data(model, *build_records(cfg.data), prompt_template(cfg.data))
    # the pairs ask plain or striped; the regularisation images are scored on the 16 classes
    assert data.text_emb.shape[0] == 2 and data.reg_text_emb is not None
    assert data.ref_reg_logps.shape == (32, len(world.SHAPES))
    with torch.no_grad():  # move W off the identity so that the KL term is not zero
        model.spectral.log_sigma.add_(0.3 * torch.randn_like(model.spectral.log_sigma))
    idx = np.arange(32)
    settings = LossConfig(beta=0.5, kl_weight=1.0)
    _, metrics = train_step(model, data, idx, idx, "dpo", settings)
    # one forward over both candidate sets, renormalised per set, is two separate scorings
    reg_policy = model.logprobs(data.reg_emb[idx], data.reg_text_emb)
    assert metrics["kl"] == pytest.approx(kl_ref_policy(data.ref_reg_logps[idx], reg_policy).item(), rel=1e-5)
    policy = model.logprobs(data.pref_emb[idx], data.text_emb)
    chosen = torch.as_tensor(data.pref.chosen[idx])
    ratio = policy - data.ref_pref_logps[idx]
    margin = ratio[torch.arange(32), chosen] - ratio[torch.arange(32), 1 - chosen]
    assert metrics["loss"] == pytest.approx(torch.nn.functional.softplus(-0.5 * margin).mean().item(), rel=1e-5)


@pytest.mark.slow
def test_the_bias_config_closes_the_gap_along_t_and_keeps_the_classes():
    # configs/bias-full.yaml cut to a quarter of its steps: the full run's direction (docs/results.md), not its size
    cfg = load_config(Path(__file__).resolve().parents[3] / "configs" / "bias-full.yaml")
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"steps": 150})})
    model = build_model(cfg, torch.device("cpu"))
    result = fit(model, prepare_data(model, *build_records(cfg.data), prompt_template(cfg.data)), cfg)
    load_average(model, result.bma)
    evaluator = Evaluator.build(model, world.validation_sets(600))
    m = {t: evaluator.metrics(t) for t in (0.0, 0.5, 1.0)}
    gaps = [m[t]["bias_gap"] for t in (0.0, 0.5, 1.0)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < gaps[0] - 0.08, gaps
    assert m[1.0]["clean"] >= m[0.0]["clean"] - 0.02 and m[1.0]["retention"] >= m[0.0]["retention"] - 0.03, m


def _typographic_full(own_word: float, sets) -> dict[str, float]:
    """A short full-tower DPO run from the shipped base (as the serving tests' trained release), scored at t = 1."""
    cfg = _cfg(model={"image_tower": "full"}, data={"n_pairs": 512, "n_reg": 256, "own_word": own_word},
               loss={"beta": 1.0, "kl_weight": 0.3}, optimizer={"lr": 1e-3, "spectral_lr": 5e-3},
               training={"steps": 40, "batch_size": 64, "reg_batch_size": 64, "bma": False})
    model = build_model(cfg, torch.device("cpu"))
    fit(model, prepare_data(model, *build_records(cfg.data)), cfg)
    return Evaluator.build(model, sets).metrics(1.0)


@pytest.mark.slow
def test_own_word_regularisation_makes_the_model_ignore_the_word_not_avoid_it():
    """Clean-only regularisation lets the pairs be met by avoiding whatever word is written, which costs
    the shapes that carry their own name; holding the base's answers on some of those steers training away."""
    sets = {k: s for k, s in world.validation_sets(300).items() if k in ("clean", "attacked", "own_word")}
    # The margins below sit well inside what these runs measure (docs/results.md, "ignoring the word").
    avoids, ignores = _typographic_full(0.0, sets), _typographic_full(0.25, sets)
    assert avoids["own_word"] < avoids["clean"] - 0.1, avoids  # the failure this guards against is real
    assert ignores["own_word"] > avoids["own_word"] + 0.1 and ignores["own_word"] >= ignores["clean"] - 0.1, ignores
    assert ignores["attacked"] > 0.1, ignores  # and it still learns to see the shape


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "kto", "ce"])
def test_each_loss_learns_on_a_few_steps(loss_type):
    cfg = _cfg(loss={"loss_type": loss_type}, training={"steps": 40})
    model = build_model(cfg, torch.device("cpu"))
    data = prepare_data(model, *build_records(cfg.data))
    idx = np.arange(256)
    settings = cfg.loss
    start, _ = train_step(model, data, idx, idx, loss_type, settings)
    fit(model, data, cfg)
    end, _ = train_step(model, data, idx, idx, loss_type, settings)
    assert end.item() < start.item()


def _embedding_distance(model, data, idx) -> float:
    """mean 1 − cos(f(x), f_ref(x̄)) over these pairs' and regularisation images, as the objective sees it."""
    _, metrics = train_step(model, data, idx, idx, "anchor",
                            LossConfig(loss_type="anchor", anchor_space="embedding", anchor_weight=10.0))
    return metrics["anchor_distance"]


def test_the_embedding_anchor_brings_f_of_the_attacked_image_to_its_twins():
    cfg = _cfg(model={"image_tower": "full"}, data={"n_pairs": 256, "n_reg": 128},
               loss={"loss_type": "anchor", "anchor_space": "embedding", "anchor_weight": 10.0, "kl_weight": 1.0},
               optimizer={"lr": 1e-3, "warmup_steps": 2}, training={"steps": 8, "batch_size": 32, "reg_batch_size": 32})
    model, data = _fresh(cfg)
    idx = np.arange(128)
    start = _embedding_distance(model, data, idx)
    fit(model, data, cfg)
    assert _embedding_distance(model, data, idx) < 0.8 * start, start


def test_the_anchor_space_changes_nothing_where_the_anchor_is_off():
    runs = []
    for space in ("logits", "embedding"):
        cfg = _cfg(loss={"loss_type": "dpo", "anchor_space": space}, training={"steps": 5})
        model, data = _fresh(cfg)
        batch = MemorySource(model, data, cfg)(1)
        assert (batch.anchor_logps, batch.anchor_pref_emb, batch.anchor_reg_emb) == (None, None, None)
        runs.append((fit(model, data, cfg).last_metrics, {k: v.clone() for k, v in model.state_dict().items()}))
    (metrics, state), (metrics_e, state_e) = runs
    assert metrics == metrics_e and all(torch.equal(state[k], state_e[k]) for k in state)


def test_each_anchor_space_gets_its_own_targets():
    cfg = _cfg(loss={"loss_type": "anchor"})
    model, data = _fresh(cfg)
    pref, reg = np.arange(4), np.arange(3)
    logits = memory_batch(model, data, pref, reg, torch.device("cpu"), "logits")
    embedding = memory_batch(model, data, pref, reg, torch.device("cpu"), "embedding")
    assert logits.anchor_logps is not None and logits.anchor_emb is None
    assert embedding.anchor_logps is None and embedding.anchor_emb is not None
    assert torch.equal(embedding.anchor_emb, torch.cat([data.anchor_pref_emb[:4], data.anchor_reg_emb[:3]]))
    # both hold the KL term to the reference's answers on the regularisation images' twins
    assert torch.equal(logits.ref_reg_logps, data.anchor_reg_logps[:3])
    assert torch.equal(embedding.ref_reg_logps, data.anchor_reg_logps[:3])


def test_the_loss_section_is_the_objectives_weights():
    cfg = _cfg(loss={"beta": 0.4, "kl_weight": 0.2, "desirable_weight": 2.0, "undesirable_weight": 0.5})
    assert isinstance(cfg.loss, LossWeights)  # passed to the objective as it is: no second copy to drift
    assert (cfg.loss.beta, cfg.loss.kl_weight, cfg.loss.desirable_weight, cfg.loss.undesirable_weight) == \
        (0.4, 0.2, 2.0, 0.5)


def test_worker_shards_of_a_step_are_the_single_process_batch():
    whole_pref, whole_reg = batch_indices(3, 7, 100, 50, 16, 8)
    shards = [batch_indices(3, 7, 100, 50, 16, 8, rank, 2) for rank in range(2)]
    assert sorted(np.concatenate([pref for pref, _ in shards])) == sorted(whole_pref)
    assert sorted(np.concatenate([reg for _, reg in shards])) == sorted(whole_reg)
    assert not np.array_equal(batch_indices(3, 8, 100, 50, 16, 8)[0], whole_pref)  # another step, another batch


class _Crash(Exception):
    pass


class _Recorder(Callback):
    """Records the hook calls; saves the training state and crashes after `crash_at`."""

    def __init__(self, model=None, state=None, folder=None, crash_at=None):
        self.calls, self.model, self.state, self.folder, self.crash_at = [], model, state, folder, crash_at

    def on_step_begin(self, step):
        self.calls.append(("begin", step))

    def on_step_end(self, step, metrics):
        self.calls.append(("end", step))
        if step == self.crash_at:
            save_train_state(self.folder, step, self.model, self.state.optimizer, self.state.bma)
            raise _Crash


def _fresh(cfg):
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg, torch.device("cpu"))
    return model, prepare_data(model, *build_records(cfg.data))


def test_a_resumed_fit_continues_exactly_where_the_crashed_one_stopped(tmp_path):
    cfg = _cfg(training={"steps": 12})
    model, data = _fresh(cfg)
    seen = []
    whole = fit(model, data, cfg, [_Recorder(), ProgressCallback(lambda step, metrics: seen.append(step))])
    assert seen == list(range(1, 13))

    crashed, data = _fresh(cfg)
    state = TrainState.start(crashed, cfg)
    with pytest.raises(_Crash):
        fit(crashed, data, cfg, [_Recorder(crashed, state, tmp_path, crash_at=5)], state)

    resumed, data = _fresh(cfg)
    state = TrainState.start(resumed, cfg)
    state.step = load_train_state(tmp_path, resumed, state.optimizer, state.bma)
    recorder = _Recorder()
    result = fit(resumed, data, cfg, [recorder], state)
    assert recorder.calls == [(kind, step) for step in range(6, 13) for kind in ("begin", "end")]
    assert state.step == 12 and result.last_metrics == pytest.approx(whole.last_metrics, abs=1e-6)
    for name, p in resumed.named_parameters():
        assert torch.allclose(p, dict(model.named_parameters())[name], atol=1e-6), name
    for name, value in result.bma.average().items():
        assert torch.allclose(value, whole.bma.average()[name], atol=1e-6), name
