"""`po-cluster evaluate`: load a checkpoint, a release (by folder, s3:// URI or id in a store) or the
shipped base, evaluate it on the fixed sets at one t and over the trade-off range, plot, and format."""
from __future__ import annotations

from typing import Literal

from po_cluster.data import world
from po_cluster.data.images import Geometry
from po_cluster.data.records import ImageSet
from po_cluster.data.selection import evaluation_sets
from po_cluster.evaluate.metrics import (
    DEFAULT_TS,
    RETENTION_PREFIX,
    Evaluator,
    derived_metrics,
    format_table,
    metric_keys,
    plot_tradeoff,
)
from po_cluster.model.targets import open_target

Split = Literal["train", "val", "test"]


def target_sets(dataset: str | None, split: Split, geometry: Geometry | None = None) -> tuple[dict[str, ImageSet], str]:
    """(sets, prompt template): the world's fixed evaluation sets, or a built dataset's split (its images
    fitted by `geometry`, the model's)."""
    if dataset is None:
        return evaluation_sets(), world.PROMPT_TEMPLATE
    from po_cluster.data.pairs import TEXT_TEMPLATE, dataset_eval_sets

    return dataset_eval_sets(dataset, split, geometry), TEXT_TEMPLATE


def evaluate_target(target: str, t: float = 1.0, ts: bool = True, plot: str | None = None,
                    store: str | None = None, dataset: str | None = None, split: Split = "test",
                    benchmarks: tuple[str, ...] = ()) -> dict:
    """Metrics at `t` ("at_t"), and with `ts` the trade-off over t ("tradeoff"), its plot and a text
    report ("text"). `target` is anything model.targets.resolve_target takes; release ids are looked up
    in `store`.
    With `dataset`, on that dataset's `split` (a dataset without written-word-only images has no
    word_only key). Each of `benchmarks` (data.benchmarks.open_benchmark) adds its zero-shot accuracy at
    t as retain_<name>, and `retention` becomes the mean of every retain_ set."""
    from po_cluster.data.benchmarks import open_benchmark
    from po_cluster.evaluate.zero_shot import benchmark_accuracy

    opened_benchmarks = [open_benchmark(spec) for spec in benchmarks]  # a bad one fails before the model loads
    opened = open_target(target, store)
    model, label = opened.model, opened.label
    sets, template = target_sets(dataset, split, model.preprocess.geometry)
    evaluator = Evaluator.build(model, sets, template)
    metrics = evaluator.metrics(t)
    if opened_benchmarks:
        metrics |= {f"{RETENTION_PREFIX}{b.name}": benchmark_accuracy(model, b, t) for b in opened_benchmarks}
        metrics |= derived_metrics({k: v for k, v in metrics.items() if k.startswith(RETENTION_PREFIX)})
    keys = metric_keys(metrics)
    at_t = {key: metrics[key] for key in keys}
    report: dict = {"at_t": at_t, "t": t}
    if ts:
        rows = evaluator.tradeoff(DEFAULT_TS)
        plot_path = plot or f"{label}-tradeoff.png"
        plot_tradeoff(rows, plot_path, f"trade-off over t: {label}")
        report["tradeoff"] = rows
        report["text"] = "\n".join([
            f"{label} at t = {t:g}:", format_table([{"model": label, **at_t}], ("model",) + keys), "",
            "trade-off over t (θ_ref + t·(θ − θ_ref), σ_i^t):", format_table(rows, ("t",) + keys), "",
            f"plot: {plot_path}",
        ])
    return report
