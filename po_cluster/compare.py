"""The core demo: train each loss from the base model and compare them in one table."""
from __future__ import annotations

from po_cluster.config import RunConfig
from po_cluster.data import world
from po_cluster.evaluate import format_table
from po_cluster.progress import StepBar
from po_cluster.train import run_training

COLUMNS = ("model", "clean", "attacked", "word_only", "attack_success", "kl", "seconds")


def compare_losses(cfg: RunConfig, losses: list[str], output_dir: str | None = None) -> str:
    eval_sets = world.evaluation_sets()
    rows, checkpoints = [], []
    for loss_type in losses:
        run = cfg.model_copy(update={
            "name": f"{cfg.name}-{loss_type}", "output_dir": output_dir or cfg.output_dir,
            "loss": cfg.loss.model_copy(update={"loss_type": loss_type}),
        })
        run = RunConfig.model_validate(run.model_dump())  # re-validate the edited copy
        with StepBar(run.training.steps, run.name) as bar:
            result = run_training(run, bar.update, eval_sets)
        if not rows:
            rows.append({"model": "base", **result.before, "seconds": 0.0})
        rows.append({"model": loss_type, **result.after, "seconds": result.seconds})
        checkpoints.append(f"  {loss_type}: {result.checkpoint}")
    return "\n".join([format_table(rows, COLUMNS), "", "checkpoints:", *checkpoints])
