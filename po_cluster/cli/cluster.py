"""`po-cluster sweep | average | report | pipeline`: the cluster stages of the life cycle."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from po_cluster.config import SweepConfig, load_config


def connect_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join a running cluster (address or RAY_ADDRESS), else start a local one."""
    import ray

    from po_cluster.serving import ingress

    if not ray.is_initialized():
        if address is None and not os.environ.get("RAY_ADDRESS"):
            ingress.enable()  # a local Ray of ours: the demo ends by serving on it
        ray.init(address=address, num_cpus=num_cpus if address is None else None,
                 include_dashboard=True,
                 log_to_driver=False, logging_level="WARNING")


def _experiment(args: argparse.Namespace):
    from po_cluster.sweep.experiment import open_experiment

    cfg = load_config(args.config, SweepConfig)
    return cfg, open_experiment(cfg)


def _records(experiment) -> list[dict]:
    from po_cluster.sweep.driver import RESULTS_FILE

    if not experiment.exists(RESULTS_FILE):
        raise FileNotFoundError(f"no {RESULTS_FILE} in {experiment.uri}: run (or resume) the sweep first")
    return experiment.read_json(RESULTS_FILE)["trials"]


def cmd_sweep(args: argparse.Namespace) -> int:
    from po_cluster.sweep.driver import run_sweep

    cfg, experiment = _experiment(args)
    connect_ray(args.address)
    records = run_sweep(cfg, resume=args.resume)
    done = sum(1 for r in records if r.get("checkpoint_path"))
    print(f"sweep {cfg.name}: {len(records)} trials ({done} with a checkpoint) in {experiment.uri}")
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from po_cluster.sweep.average import average_trials

    from po_cluster.sweep.experiment import scratch, work_dir

    cfg, experiment = _experiment(args)
    downloads = scratch()  # trial checkpoints in S3 are read from local copies, verified there
    result = average_trials(_records(experiment), args.top_k or cfg.top_k, work_dir(experiment),
                            cfg.base.data.n_val, cfg.clean_tolerance, cfg.clean_penalty,
                            locate=lambda path: experiment.fetch(path, downloads / Path(path).name))
    if not experiment.is_local:
        experiment.write_json("average.json", result)
    print(f"release candidate: {result['chosen']} → {result['release_folder']}")
    if not args.no_publish:
        from po_cluster.store.artifacts import open_store

        args.release_id = open_store(args.store or cfg.store).publish_release(result["release_folder"])
        print(f"published release {args.release_id} to {args.store or cfg.store}")
    return 0


def base_answer(image) -> str:
    """The shipped base model's top classes for one image: the attack it falls for."""
    import torch

    from po_cluster.config import ModelConfig
    from po_cluster.data import world
    from po_cluster.evaluate.metrics import embed_images, embed_prompts
    from po_cluster.model.aligned import AlignedCLIP
    from po_cluster.model.loading import load_clip

    base = AlignedCLIP(load_clip(ModelConfig()), "frozen")
    probs = base.logprobs(embed_images(base, image[None]), embed_prompts(base, world.prompts()), 0.0)[0].exp()
    top = torch.argsort(probs, descending=True)[:3]
    return ", ".join(f"{world.SHAPES[i]} {probs[i]:.2f}" for i in top.tolist())


def ask_release(store: str, release_id: str) -> None:
    """Serve the release on 127.0.0.1 and ask it about one attacked image at t = 0 and t = 1."""
    import numpy as np

    from po_cluster.data import world
    from po_cluster.serving.local import format_answer, serve_and_ask

    square, written = world.SHAPES.index("square"), world.SHAPES.index("circle")
    image = world.render(square, written, np.random.default_rng(7))
    answers = serve_and_ask(store, release_id, image, list(world.SHAPES))
    print(f"\nserved {release_id} at {answers['url']}; a square with the word 'circle' written on it:")
    print(f"  shipped base model, in process: {base_answer(image)}")
    print(f"  release over HTTP, {format_answer(answers['t0'])}   (spectral layer off)")
    print(f"  release over HTTP, {format_answer(answers['t1'])}")
    print(f"keep it running with:  .venv/bin/po-cluster serve --store {store}   (then open http://127.0.0.1:8000/)")


def cmd_report(args: argparse.Namespace) -> int:
    from po_cluster.evaluate.report import write_report

    from po_cluster.sweep.experiment import work_dir

    cfg, experiment = _experiment(args)
    average = experiment.read_json("average.json") if experiment.exists("average.json") else None
    folder = work_dir(experiment) / "report"
    md, page = write_report(_records(experiment), average, folder, f"po-cluster sweep: {cfg.name}")
    if not experiment.is_local:
        experiment.upload(folder, "report")
    print(f"report: {md}\n        {page}" + ("" if experiment.is_local else f"\n        {experiment.uri}/report/"))
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """The main job: sweep (resumed if it exists), soups + release, report."""
    from ray import tune

    from po_cluster.sweep.driver import RESULTS_FILE

    cfg, experiment = _experiment(args)
    connect_ray(args.address)
    args.resume = tune.Tuner.can_restore(experiment.path, storage_filesystem=experiment.filesystem)
    if args.resume and experiment.exists(RESULTS_FILE) and not args.rerun:
        print(f"sweep {cfg.name} already complete in {experiment.uri} (use --rerun to resume it anyway)")
    else:
        cmd_sweep(args)
    args.top_k, args.no_publish = None, False
    cmd_average(args)
    cmd_report(args)
    if args.address is None and not os.environ.get("RAY_ADDRESS"):
        # Only on a cluster of our own (the laptop demo); a job on a shared cluster leaves serving alone.
        ask_release(args.store or cfg.store, args.release_id)
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
            p.add_argument("--store", default=None, help="artifact store (default: the config's store)")
        if name == "pipeline":
            p.add_argument("--rerun", action="store_true", help="resume the sweep even if it completed")
        if name == "average":
            p.add_argument("--top-k", type=int, default=None)
            p.add_argument("--no-publish", action="store_true", help="write the release folder only")
