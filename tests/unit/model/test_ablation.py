"""Head ablation (po_cluster/model/ablation.py) and `po-cluster ablate` (po_cluster/pipelines/ablate.py):
zeroing a head's out-projection columns removes exactly that head's output, on an open_clip ViT's
blocks and a ResNet's attention pool, and the ablated model is written as a release whose t = 0 is
the base bit for bit."""
import numpy as np
import pytest
import torch
from torch import nn

from po_cluster import cli
from po_cluster.config import AblationConfig, ModelConfig, RunConfig
from po_cluster.model.ablation import Head, ablate_heads, attention_heads, greedy_heads, set_ablation
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.checkpoint import load_checkpoint
from po_cluster.model.loading import load_clip
from po_cluster.pipelines.ablate import ablate, candidate_heads


def _mha_without_head(attn: nn.MultiheadAttention, x: torch.Tensor, head: int) -> torch.Tensor:
    """The block's attention output computed by hand, the head's output zeroed before out_proj."""
    n, length, width = x.shape
    q, k, v = nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    split = lambda z: z.view(n, length, attn.num_heads, width // attn.num_heads).transpose(1, 2)  # noqa: E731
    weights = (split(q) @ split(k).transpose(-1, -2) / (width // attn.num_heads) ** 0.5).softmax(-1)
    heads = weights @ split(v)  # [n, heads, length, d]
    heads[:, head] = 0
    return attn.out_proj(heads.transpose(1, 2).reshape(n, length, width))


@pytest.fixture(scope="module")
def vit_b_32() -> AlignedCLIP:
    torch.manual_seed(0)
    return AlignedCLIP(load_clip(ModelConfig(name="ViT-B-32", pretrained=None)), "full").eval()


def test_a_random_vit_b_32_has_its_144_heads_and_ablating_one_removes_exactly_its_output(vit_b_32):
    visual = vit_b_32.clip.visual
    heads = attention_heads(visual)
    assert len(heads) == 12 * 12 and heads[0] == Head("transformer.resblocks.0.attn", 0,
                                                      "transformer.resblocks.0.attn.out_proj.weight", 64)
    attn = visual.transformer.resblocks[5].attn
    x = torch.randn(2, 50, 768)
    with torch.no_grad():
        full = attn(x, x, x, need_weights=False)[0]
        base = {k: v.clone() for k, v in visual.state_dict().items()}
        head = next(h for h in heads if h.module == "transformer.resblocks.5.attn" and h.index == 7)
        set_ablation(visual, base, [head])
        ablated = attn(x, x, x, need_weights=False)[0]
        expected = _mha_without_head(attn, x, 7)  # out_proj now has the head's columns at 0 anyway
        set_ablation(visual, base, [])
        by_hand = _mha_without_head(attn, x, 7)
    assert not torch.allclose(ablated, full, atol=1e-4)
    assert torch.allclose(ablated, expected, atol=1e-5) and torch.allclose(ablated, by_hand, atol=1e-5)
    assert torch.equal(visual.state_dict()[head.weight], base[head.weight])  # an empty set restores the base


def test_ablate_heads_copies_only_the_weights_it_changes():
    state = {"a.out_proj.weight": torch.ones(4, 8), "b": torch.ones(3)}
    head = Head("a", 1, "a.out_proj.weight", 4)
    out = ablate_heads(state, [head])
    assert out["b"] is state["b"] and torch.equal(state["a.out_proj.weight"], torch.ones(4, 8))
    assert torch.equal(out["a.out_proj.weight"][:, 4:], torch.zeros(4, 4))
    assert torch.equal(out["a.out_proj.weight"][:, :4], torch.ones(4, 4))
    with pytest.raises(KeyError, match="not in the state dict"):
        ablate_heads(state, [Head("c", 0, "c.weight", 4)])


def test_greedy_takes_the_best_head_each_round_and_stops_without_a_gain():
    heads = [Head("m", i, "m.w", 1) for i in range(4)]
    gains = {0: 0.1, 1: 0.5, 2: -0.2, 3: 0.3}
    selection = greedy_heads(heads, lambda chosen: sum(gains[h.index] for h in chosen), max_heads=4)
    assert [h.index for h in selection.heads] == [1, 3, 0] and selection.score == pytest.approx(0.9)
    assert greedy_heads(heads, lambda chosen: 0.0, max_heads=4).heads == ()
    with pytest.raises(ValueError, match="max_heads"):
        greedy_heads(heads, lambda chosen: 0.0, max_heads=0)


def test_a_tower_without_attention_is_refused_by_name():
    with pytest.raises(ValueError, match="no attention heads found in image tower Sequential"):
        attention_heads(nn.Sequential(nn.Conv2d(3, 4, 3)))


def _run(tmp_path, model: ModelConfig) -> RunConfig:
    return RunConfig(name="abl", output_dir=str(tmp_path), model=model,
                     data={"n_pairs": 64, "n_reg": 64, "n_val": 16, "seed": 0})


def test_ablate_writes_a_release_of_the_shipped_base_t0_the_base_t1_the_heads_removed(tmp_path, monkeypatch):
    from po_cluster.data import world

    small = {name: s.take(np.arange(64)) for name, s in world.evaluation_sets(64).items()}
    run = _run(tmp_path, ModelConfig())
    # No charge for clean accuracy: the search must then ablate what turns answers from the word.
    result = ablate(run, AblationConfig(max_heads=2, n_images=64, clean_penalty=0.0), test_sets=small)
    assert result.selection.heads and result.selection.score > result.selection.start
    assert all(h.module == "attnpool" for h in result.selection.heads)
    model, description = load_checkpoint(result.checkpoint)
    base = AlignedCLIP(load_clip(ModelConfig()), "full").eval()
    at0 = model.tower_state(0.0)
    assert all(torch.equal(at0[k], v) for k, v in base.clip.visual.named_parameters())
    weight = model.clip.visual.attnpool.c_proj.weight
    ablated = {h.index for h in result.selection.heads}
    for head in candidate_heads(base, None):
        cols = weight[:, head.columns]
        assert bool((cols == 0).all()) == (head.index in ablated), head
    x = model.pixels(small["attacked"].images[:8])
    with torch.no_grad():
        assert torch.equal(model.encode_image(x, 0.0), base.encode_image(x, 1.0))
        assert not torch.allclose(model.encode_image(x, 1.0), base.encode_image(x, 1.0))
    assert result.after["attack_success"] < result.before["attack_success"]


def test_ablate_on_a_random_vit_b_32_searches_only_the_last_blocks(tmp_path):
    from po_cluster.data import world

    small = {name: s.take(np.arange(4)) for name, s in world.evaluation_sets(16).items() if name in
             ("clean", "attacked", "word_only", "own_word")}
    run = _run(tmp_path, ModelConfig(name="ViT-B-32", pretrained=None))
    result = ablate(run, AblationConfig(max_heads=1, last_blocks=1, n_images=8, clean_penalty=0.0), test_sets=small)
    training = __import__("json").loads((result.checkpoint / "training.json").read_text())
    assert training["ablation"]["last_blocks"] == 1
    assert all(h.module == "transformer.resblocks.11.attn" for h in result.selection.heads)
    model, _ = load_checkpoint(result.checkpoint)
    assert set(result.before) >= {"clean", "attacked"}


def test_cli_refuses_a_bias_run_and_bad_options(tmp_path, capsys):
    config = tmp_path / "bias.yaml"
    config.write_text("name: b\ndata: {task: bias}\n")
    assert cli.main(["ablate", "--config", str(config)]) == 2
    assert "data.task must be typographic" in capsys.readouterr().err
    config.write_text("name: b\n")
    assert cli.main(["ablate", "--config", str(config), "--max-heads", "0"]) == 2
    assert "max_heads" in capsys.readouterr().err
