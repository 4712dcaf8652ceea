"""`po-cluster …`: the command line. Entry points only parse, call the library, print."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from po_cluster.config import SHIPPED_BASE, CompareConfig, ConfigError, RunConfig, json_schema, load_config


def _quiet_open_clip() -> None:
    # open_clip warns on the root logger whenever a model is built without weights,
    # which we do on purpose before loading safetensors ourselves.
    logging.getLogger().setLevel(logging.ERROR)


def cmd_train(args: argparse.Namespace) -> int:
    from po_cluster.cli.progress import StepBar
    from po_cluster.pipelines.train import run_train
    from po_cluster.tracking.client import ui_hint

    cfg = load_config(args.config)
    if args.output_dir:
        cfg = cfg.model_copy(update={"output_dir": args.output_dir})
    with StepBar(cfg.training.steps, cfg.name) as bar:
        tracked = run_train(cfg, bar.update)
    from po_cluster.evaluate.metrics import format_table, shown_keys

    result = tracked.run
    rows = [{"model": "before", **result.before}, {"model": "after", **result.after}]
    print(format_table(rows, ("model", *shown_keys([result.after]))))
    print(f"checkpoint: {result.checkpoint}  ({result.seconds:.0f} s)")
    if tracked.tracking_uri is not None:
        print(f"tracked: {ui_hint(tracked.tracking_uri)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from po_cluster.cli.common import default_store
    from po_cluster.evaluate.targets import evaluate_target

    report = evaluate_target(args.target, t=args.t, ts=not args.json, plot=args.plot, store=default_store(args.store),
                             dataset=args.dataset, split=args.split, benchmarks=tuple(args.benchmark or ()))
    if args.json:
        print(json.dumps(report["at_t"]))
    else:
        print(report["text"])
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from po_cluster.cli.progress import RunBars
    from po_cluster.pipelines.compare import compare_losses

    cfg = load_config(args.config, CompareConfig)
    with RunBars() as bars:
        result = compare_losses(cfg, args.output_dir, progress=bars)
    print(result.table())
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from po_cluster.config import AblationConfig, parse_config
    from po_cluster.evaluate.metrics import format_table, shown_keys
    from po_cluster.pipelines.ablate import ablate

    run = load_config(args.config)
    given = {"max_heads": args.max_heads, "last_blocks": args.last_blocks, "n_images": args.n_images}
    cfg = parse_config({k: v for k, v in given.items() if v is not None}, "ablate options", model=AblationConfig)
    result = ablate(run, cfg, args.output_dir)
    heads = ", ".join(f"{step.head} ({step.score:.3f})" for step in result.selection.steps) or "none"
    print(f"heads ablated (training-split score, start {result.selection.start:.3f}): {heads}")
    rows = [{"model": "base", **result.before}, {"model": "ablated", **result.after}]
    print(format_table(rows, ("model", *shown_keys([result.after]))))
    print(f"checkpoint: {result.checkpoint}  (t = 0 the base, t = 1 ablated; publish with "
          f"`po-cluster releases push {result.checkpoint}`)")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(RunConfig), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="po-cluster", description="Preference optimization of CLIP on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="single-process training from a YAML config")
    p.add_argument("--config", required=True)
    p.add_argument("--output-dir", help="override output_dir of the config")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("evaluate", help="accuracies, attack success and KL, and their trade-off over t")
    p.add_argument("target", nargs="?", default=SHIPPED_BASE,
                   help=f"checkpoint or release folder, s3://…/releases/<id>, or a release id / 'latest' in --store "
                        f"(default: {SHIPPED_BASE})")
    p.add_argument("--store", help="artifact store for release ids (default $PO_CLUSTER_STORE, else ./artifacts)")
    p.add_argument("--t", type=float, default=1.0, help="the knob: 0 the starting model, 1 the release (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object at --t")
    p.add_argument("--plot", help="write the trade-off curve to this PNG (default: next to the checkpoint)")
    p.add_argument("--dataset", help="a built dataset (folder or s3://) to evaluate on, not the world")
    p.add_argument("--split", choices=("train", "val", "test"), default="test",
                   help="the dataset's split (default test, which no trial trained or was chosen on)")
    p.add_argument("--benchmark", action="append", metavar="[NAME=]PATH",
                   help="zero-shot accuracy on a benchmark (class folders or clip_benchmark's webdataset shards, "
                   "local or s3://) with clip_benchmark's class names and templates, as retain_NAME; repeatable")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("compare", help="train each loss from the base model and print one table")
    p.add_argument("--config", required=True)
    p.add_argument("--output-dir", default=None)
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("ablate", help="training-free comparator: ablate the image tower's attention heads that "
                       "read the written word, chosen on the training split; writes a checkpoint")
    p.add_argument("--config", required=True, help="a run config: its model, data and output_dir")
    p.add_argument("--output-dir", default=None, help="override output_dir of the config")
    p.add_argument("--max-heads", type=int, help="ablate at most this many heads (default 4)")
    p.add_argument("--last-blocks", type=int, help="only heads of the last k attention modules (default all)")
    p.add_argument("--n-images", type=int, help="attacked and clean training images to score on (default 512)")
    p.set_defaults(func=cmd_ablate)
    p = sub.add_parser("schema", help="print the JSON schema of run configs")
    p.set_defaults(func=cmd_schema)
    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list:
    """Command groups living beside the stage they drive; each adds its subparsers."""
    from po_cluster.cli import cluster, data, embed, releases, serve

    return [m.register for m in (data, releases, cluster, serve, embed)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_open_clip()
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"po-cluster {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # CheckpointError, ModelLoadError, StoreError
        print(f"po-cluster {args.command}: error: {error}", file=sys.stderr)
        return 1

