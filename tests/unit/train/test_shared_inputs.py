"""The sweep's shared inputs are exactly what a trial would compute for itself, in every tower mode."""
import pytest
import torch

from po_cluster.config import parse_config
from po_cluster.data.selection import build_records, prompt_template
from po_cluster.train.inputs import compute_shared_inputs
from po_cluster.train.loop import build_model, fit, prepare_data
from po_cluster.train.report import Validation


def _run(image_tower):
    return parse_config({"data": {"n_pairs": 96, "n_reg": 64, "n_val": 40},
                         "model": {"image_tower": image_tower},
                         "training": {"steps": 4, "batch_size": 32, "reg_batch_size": 32}})


@pytest.mark.parametrize("image_tower", ["frozen", "full"])
def test_shared_inputs_equal_what_a_trial_computes(image_tower):
    run = _run(image_tower)
    shared = compute_shared_inputs(run)
    model = build_model(run, torch.device("cpu"))
    own = prepare_data(model, *build_records(run.data), prompt_template(run.data))
    given = shared.train_data(model.image_tower_frozen)
    assert (given.pref_emb is None) == (own.pref_emb is None) == (image_tower != "frozen")
    # the word-free twins' answers and embeddings too: the anchor's targets in either space
    for name in ("text_emb", "ref_pref_logps", "ref_reg_logps", "anchor_pref_logps", "anchor_reg_logps",
                 "anchor_pref_emb", "anchor_reg_emb"):
        assert torch.allclose(getattr(given, name), getattr(own, name), atol=1e-5), name
    assert (given.pref.images == own.pref.images).all() and (given.pref.chosen == own.pref.chosen).all()
    of_shared, of_start = Validation.of_shared(model, shared), Validation.of_start(model, run.data)
    assert of_shared.base == pytest.approx(of_start.base, abs=1e-6)
    assert torch.allclose(of_shared.start.ref_clean_logps, of_start.start.ref_clean_logps, atol=1e-5)


def test_a_frozen_trial_on_shared_inputs_never_runs_its_image_tower():
    run = _run("frozen")
    shared = compute_shared_inputs(run)
    model = build_model(run, torch.device("cpu"))
    seen = []
    model.clip.visual.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    fit(model, shared.train_data(model.image_tower_frozen), run)
    metrics = Validation.of_shared(model, shared).metrics(model, None)
    assert seen == [] and set(metrics) >= {"clean", "attacked", "kl"}
