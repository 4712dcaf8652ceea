"""`po-cluster sweep | average | report | pipeline`: the cluster stages of the life cycle
(po_cluster/pipelines/cluster.py). Each command parses, calls one stage, prints its result.

The release store of `average` and `pipeline` is cli.common.default_store's: --store, else
$PO_CLUSTER_STORE, else the config's `store`, else ./artifacts — the store `serve` reads.
"""
from __future__ import annotations

import argparse
import sys

from po_cluster.cli.common import default_store
from po_cluster.config import SweepConfig, load_config


def print_stage(result: object) -> None:
    """One stage's result as the commands print it (also the pipeline's on_stage callback)."""
    from po_cluster.pipelines.cluster import ReportResult
    from po_cluster.pipelines.demo import DemoAnswers
    from po_cluster.sweep.average import AverageResult
    from po_cluster.sweep.driver import SweepResult

    if isinstance(result, SweepResult):
        print_sweep(result)
    elif isinstance(result, AverageResult):
        print(f"release candidate: {result.chosen} → {result.release_folder}")
        if result.release_id is not None:
            print(f"published release {result.release_id} to {result.store}")
    elif isinstance(result, ReportResult):
        print(f"report: {result.markdown}\n        {result.html}" + (f"\n        {result.uri}" if result.uri else ""))
    elif isinstance(result, DemoAnswers):
        print_answers(result)
    else:
        raise TypeError(f"no way to print a {type(result).__name__}")


def print_sweep(result) -> None:  # a SweepResult
    from po_cluster.tracking.client import ui_hint

    if result.ran:
        print(f"sweep {result.name}: {len(result.trials)} trials ({result.with_checkpoint} with a checkpoint) "
              f"in {result.uri}")
    else:
        print(f"sweep {result.name} already complete in {result.uri} (use --rerun to resume it anyway)")
    if result.tracking_uri is not None:
        print(f"tracked: {ui_hint(result.tracking_uri)}")


def print_answers(answers) -> None:  # a DemoAnswers
    from po_cluster.serving.local import format_answer

    base = ", ".join(f"{label} {probability:.2f}" for label, probability in answers.base)
    print(f"\nserved {answers.release_id} at {answers.url}; a {answers.shape} with the word '{answers.word}' "
          "written on it:")
    print(f"  shipped base model, in process: {base}")
    print(f"  release over HTTP, {format_answer(answers.t0)}   (spectral layer off)")
    print(f"  release over HTTP, {format_answer(answers.t1)}")
    print(f"keep it running with:  .venv/bin/po-cluster serve --store {answers.store}   "
          "(then open http://127.0.0.1:8000/)")


def cmd_sweep(args: argparse.Namespace) -> int:
    from po_cluster.pipelines.cluster import connect_ray
    from po_cluster.sweep.driver import run_sweep

    cfg = load_config(args.config, SweepConfig)
    connect_ray(args.address)
    result = run_sweep(cfg, resume=args.resume)
    print_stage(result)
    if result.trials and not result.with_checkpoint:  # nothing to average: say why, and fail
        errors = [t.error for t in result.trials if t.error]
        last = errors[0].strip().splitlines()[-1] if errors else "no trial reported a checkpoint"
        print(f"error: every trial failed; the first: {last}", file=sys.stderr)
        return 1
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from po_cluster.pipelines.cluster import run_average

    cfg = load_config(args.config, SweepConfig)
    print_stage(run_average(cfg, default_store(args.store, cfg.store), top_k=args.top_k, publish=not args.no_publish))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from po_cluster.pipelines.cluster import run_report

    print_stage(run_report(load_config(args.config, SweepConfig)))
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """The main job: sweep (resumed if it exists), soups + release, report; on a Ray of our own
    (the laptop demo) it ends by serving the release, while a job on a shared cluster leaves serving alone."""
    from po_cluster.pipelines.cluster import connect_ray, run_pipeline

    cfg = load_config(args.config, SweepConfig)
    own_ray = connect_ray(args.address)
    run_pipeline(cfg, default_store(args.store, cfg.store), rerun=args.rerun, ask_served=own_ray,
                 on_stage=print_stage)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    for name, func, text in (("sweep", cmd_sweep, "Ray Tune + Optuna search of β, λ and the loss"),
                             ("average", cmd_average, "soups of the top-k trials and a release"),
                             ("report", cmd_report, "Markdown/HTML report of a sweep with plots"),
                             ("pipeline", cmd_pipeline, "sweep, average, release and report in one go")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, help="sweep config (YAML)")
        p.set_defaults(func=func)
        if name == "sweep":
            p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
        if name in ("sweep", "pipeline"):
            p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
        if name in ("average", "pipeline"):
            p.add_argument("--store", default=None, help="artifact store (default: $PO_CLUSTER_STORE, else the "
                                                         "config's store, else ./artifacts)")
        if name == "pipeline":
            p.add_argument("--rerun", action="store_true", help="resume the sweep even if it completed")
        if name == "average":
            p.add_argument("--top-k", type=int, default=None)
            p.add_argument("--no-publish", action="store_true", help="write the release folder only")
