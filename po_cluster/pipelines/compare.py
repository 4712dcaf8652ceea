"""`po-cluster compare`: train each loss from the base model and compare them, and the training-free
head ablation of that model, in one table."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from po_cluster.config import CompareConfig, LossConfig, RunConfig
from po_cluster.data.selection import evaluation_sets
from po_cluster.evaluate.metrics import format_table
from po_cluster.losses import anchor_mu
from po_cluster.pipelines.ablate import ablate
from po_cluster.train.callbacks import Callback, ProgressCallback
from po_cluster.train.run import train
from po_cluster.train.session import LocalSession

COLUMNS = ("model", "clean", "attacked", "word_only", "own_word", "attack_success", "retention", "kl", "bias_gap",
           "attacked_styles", "seconds")

# (the run being trained, its step, the metrics of that step): how a caller shows progress
Progress = Callable[[RunConfig, int, dict[str, float]], None]


@dataclass(frozen=True)
class CompareResult:
    rows: tuple[dict, ...]  # "base" first, then one per loss, in COLUMNS
    checkpoints: dict[str, Path]  # loss (or "ablation") → its checkpoint folder

    def table(self) -> str:
        lines = [f"  {loss}: {folder}" for loss, folder in self.checkpoints.items()]
        return "\n".join([format_table(list(self.rows), COLUMNS), "", "checkpoints:", *lines])


def compare_losses(cfg: CompareConfig, output_dir: str | None = None,
                   progress: Progress | None = None) -> CompareResult:
    """One run per loss from the same base run, all evaluated on the fixed evaluation sets."""
    eval_sets = evaluation_sets()
    rows: list[dict] = []
    checkpoints: dict[str, Path] = {}
    for loss_type in cfg.losses:
        run = cfg.run_for(loss_type)
        if output_dir:
            run = run.model_copy(update={"output_dir": output_dir})
        result = train(run, LocalSession.for_run(run, eval_sets), _shown(run, progress))
        if not rows:
            rows.append({"model": "base", **result.before, "seconds": 0.0})
        rows.append({"model": f"{loss_type} ({loss_settings(run.loss)})", **result.after, "seconds": result.seconds})
        assert result.checkpoint is not None, "a local session saves the final checkpoint"
        checkpoints[loss_type] = result.checkpoint
    if cfg.ablation is not None:
        base = cfg.base if not output_dir else cfg.base.model_copy(update={"output_dir": output_dir})
        ablated = ablate(base, cfg.ablation, test_sets=eval_sets)
        if not rows:
            rows.append({"model": "base", **ablated.before, "seconds": 0.0})
        heads = ", ".join(str(head) for head in ablated.selection.heads) or "none worth it"
        rows.append({"model": f"head ablation ({heads})", **ablated.after, "seconds": ablated.seconds})
        checkpoints["ablation"] = ablated.checkpoint
    return CompareResult(tuple(rows), checkpoints)


def _shown(run: RunConfig, progress: Progress | None) -> list[Callback]:
    """The callback that shows `run`'s progress, if any."""
    if progress is None:
        return []
    return [ProgressCallback(lambda step, metrics: progress(run, step, metrics))]


def loss_settings(loss: LossConfig) -> str:
    """What tells the rows apart: β and λ, and the anchor's weight and space where it is on (the anchor
    loss has no β)."""
    shown = [] if loss.loss_type == "anchor" else [f"beta={loss.beta:g}"]
    shown.append(f"kl_weight={loss.kl_weight:g}")
    if loss.anchor_on:
        shown += [f"anchor_weight={anchor_mu(loss):g}", f"anchor_space={loss.anchor_space}"]
    return ", ".join(shown)
