"""`po-cluster compare`: train each loss from the base model and compare them in one table."""
from __future__ import annotations

from po_cluster.config import CompareConfig
from po_cluster.data import world
from po_cluster.evaluate.metrics import format_table
from po_cluster.cli.progress import StepBar
from po_cluster.train.loop import run_training

COLUMNS = ("model", "clean", "attacked", "word_only", "attack_success", "kl", "seconds")


def compare_losses(cfg: CompareConfig, output_dir: str | None = None) -> str:
    eval_sets = world.evaluation_sets()
    rows, checkpoints = [], []
    for loss_type in cfg.losses:
        run = cfg.run_for(loss_type)
        if output_dir:
            run = run.model_copy(update={"output_dir": output_dir})
        with StepBar(run.training.steps, run.name) as bar:
            result = run_training(run, bar.update, eval_sets)
        if not rows:
            rows.append({"model": "base", **result.before, "seconds": 0.0})
        settings = ", ".join(f"{k}={v:g}" for k, v in (("beta", run.loss.beta), ("kl_weight", run.loss.kl_weight)))
        rows.append({"model": f"{loss_type} ({settings})", **result.after, "seconds": result.seconds})
        checkpoints.append(f"  {loss_type}: {result.checkpoint}")
    return "\n".join([format_table(rows, COLUMNS), "", "checkpoints:", *checkpoints])
