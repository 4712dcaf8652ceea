"""`po-cluster ablate`: the training-free defence beside preference optimisation.

Greedy ablation of the image tower's attention heads (po_cluster/model/ablation.py) chosen on the
run's training split: a head set is scored by how attacked training images are answered (the object
rather than the word), charged for the clean accuracy it costs beyond a tolerance. The result is written
as a checkpoint like any trained run's, so it can be published, served, exported and evaluated as a
release: the tower is "trained" (image_tower: full) with θ_ref the base, so t = 0 is the base model
bit for bit, t = 1 the ablated one, and W stays the identity at every t.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from po_cluster.config import AblationConfig, RunConfig
from po_cluster.data import world
from po_cluster.data.records import NO_WORD, ImageSet, PreferenceSet
from po_cluster.data.selection import build_records, held_out_sets, prompt_template
from po_cluster.evaluate.metrics import Evaluator, embed_images, embed_prompts
from po_cluster.model.ablation import Head, Selection, attention_heads, greedy_heads, set_ablation
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.checkpoint import model_description, save_checkpoint
from po_cluster.model.loading import load_clip


@dataclass(frozen=True)
class AblationResult:
    checkpoint: Path
    selection: Selection
    before: dict[str, float]  # the test sets, base model
    after: dict[str, float]  # the test sets, heads ablated (t = 1)
    seconds: float


@dataclass(frozen=True)
class _SearchSet:
    """What a head set is scored on: attacked and clean training images with their true class."""

    attacked: np.ndarray
    attacked_labels: torch.Tensor
    attacked_written: torch.Tensor
    clean: np.ndarray
    clean_labels: torch.Tensor
    text_emb: torch.Tensor

    @classmethod
    def of(cls, model: AlignedCLIP, pref: PreferenceSet, reg: ImageSet, n: int, seed: int,
           template: str) -> _SearchSet:
        """At most `n` of each from the training split: the preference images (a word other than the
        class written on each) and the regularisation images with no word."""
        rng = np.random.default_rng(seed)
        attacked = np.sort(rng.choice(len(pref), min(n, len(pref)), replace=False))
        bare = np.flatnonzero(reg.written == NO_WORD)
        if len(bare) == 0:
            raise ValueError("the training split's regularisation set has no image without a word: the head "
                             "search needs clean images to charge for the clean accuracy a head set costs")
        clean = np.sort(rng.choice(bare, min(n, len(bare)), replace=False))
        text = embed_prompts(model, world.prompts(pref.classnames, template))
        return cls(pref.images[attacked], torch.as_tensor(pref.chosen[attacked]),
                   torch.as_tensor(pref.rejected[attacked]), reg.images[clean],
                   torch.as_tensor(reg.labels[clean]), text)

    def logps(self, model: AlignedCLIP, images: np.ndarray) -> torch.Tensor:
        return model.logprobs(embed_images(model, images), self.text_emb)

    def clean_accuracy(self, model: AlignedCLIP) -> float:
        return float((self.logps(model, self.clean).argmax(-1) == self.clean_labels).float().mean())

    def attacked_score(self, model: AlignedCLIP) -> float:
        """Accuracy on the attacked images less the share answered with the written word: it moves
        when a head set turns answers away from the word, before they reach the object (accuracy alone
        is flat at 0 on a base that reads every word)."""
        pred = self.logps(model, self.attacked).argmax(-1)
        return float((pred == self.attacked_labels).float().mean() - (pred == self.attacked_written).float().mean())


def _scorer(model: AlignedCLIP, base: dict[str, torch.Tensor], search: _SearchSet, cfg: AblationConfig):
    """score(heads): `attacked_score` with `heads` ablated, less clean_penalty per unit of clean accuracy
    lost beyond clean_tolerance (against the base's own clean accuracy on the same images)."""
    clean_start = search.clean_accuracy(model)

    def score(heads: tuple[Head, ...]) -> float:
        set_ablation(model.clip.visual, base, heads)
        lost = clean_start - search.clean_accuracy(model)
        return search.attacked_score(model) - cfg.clean_penalty * max(0.0, lost - cfg.clean_tolerance)

    return score


def candidate_heads(model: AlignedCLIP, last_blocks: int | None) -> list[Head]:
    """The tower's heads, or those of its last `last_blocks` attention modules."""
    heads = attention_heads(model.clip.visual)
    if last_blocks is None:
        return heads
    modules = list(dict.fromkeys(head.module for head in heads))
    kept = set(modules[-last_blocks:])
    return [head for head in heads if head.module in kept]


@torch.no_grad()
def ablate(run: RunConfig, cfg: AblationConfig, output_dir: str | Path | None = None,
           test_sets: dict[str, ImageSet] | None = None) -> AblationResult:
    """Choose heads on `run`'s training split, ablate them in its base model and save the checkpoint
    `<output_dir>/<run.name>-ablated`, scored on the test sets (the run's, unless given)."""
    if run.data.task != "typographic":
        raise ValueError(f"ablate removes the heads that read the written word: data.task must be typographic, "
                         f"not {run.data.task!r}")
    started = time.time()
    model = AlignedCLIP(load_clip(run.model), "full").eval()
    template = prompt_template(run.data)
    pref, reg = build_records(run.data, model.preprocess.geometry)
    search = _SearchSet.of(model, pref, reg, cfg.n_images, run.data.seed, template)
    evaluator = Evaluator.build(model, test_sets or held_out_sets(run.data, "test", model.preprocess.geometry),
                                template=template)
    before = evaluator.metrics(1.0)
    base = {k: v.clone() for k, v in model.clip.visual.state_dict().items()}
    selection = greedy_heads(candidate_heads(model, cfg.last_blocks), _scorer(model, base, search, cfg),
                             cfg.max_heads, cfg.min_gain)
    set_ablation(model.clip.visual, base, selection.heads)
    after = evaluator.with_model(model).metrics(1.0)
    folder = Path(output_dir or run.output_dir) / f"{run.name}-ablated"
    training = {**run.model_dump(mode="json"), "ablation": {
        **cfg.model_dump(mode="json"), "start_score": selection.start,
        "heads": [{"head": str(step.head), "score": step.score} for step in selection.steps]}}
    metrics = {"before": before, "after": after, "seconds": time.time() - started}
    save_checkpoint(folder, model, model_description(model, run.model, pref.classnames, template), training, metrics)
    return AblationResult(folder, selection, before, after, time.time() - started)
