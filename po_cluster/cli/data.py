"""`po-cluster data …`, `evaluate-attack-set` and `export`: real data and real models.

Registered by po_cluster.cli; entry points only parse, call the library, print.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from po_cluster.config import SHIPPED_BASE, load_yaml, parse_config

if TYPE_CHECKING:  # the commands import torch and open_clip only when they run
    from po_cluster.data.typographic import TypographicConfig
    from po_cluster.model.aligned import AlignedCLIP


def _typographic_config(args: argparse.Namespace) -> TypographicConfig:
    """YAML file (optional) overridden by the flags that were given, validated once."""
    from po_cluster.data.typographic import TypographicConfig

    data = load_yaml(args.config) if args.config else {}
    flags = {"source": args.source, "out": args.out, "variants": args.variants, "seed": args.seed,
             "image_size": args.image_size, "prompt_template": args.template,
             "fonts": tuple(args.font) if args.font else None, "workers": args.workers,
             "splits": tuple(args.splits) if args.splits else None, "rows_per_shard": args.rows_per_shard,
             "own_word": args.own_word, "resize_mode": args.resize_mode}
    data.update({key: value for key, value in flags.items() if value is not None})
    if args.model is not None:
        model = {"name": args.model, "pretrained": args.pretrained, "preprocess": args.preprocess}
        data["model"] = {key: value for key, value in model.items() if value is not None}
    return parse_config(data, args.config or "<command line>", TypographicConfig)


def cmd_data_typographic(args: argparse.Namespace) -> int:
    from po_cluster.data.typographic import build_typographic

    summary = build_typographic(_typographic_config(args))
    print(f"wrote {summary.pairs} preference pairs from {summary.images} images of {len(summary.classes)} "
          f"classes to {summary.out}")
    for fault in summary.skipped:  # the build goes on without them; dataset.json lists them too
        print(f"skipped {fault.where}: {fault.reason}")
    return 0


def cmd_data_ingest(args: argparse.Namespace) -> int:
    from po_cluster.data.ingest import ingest_records

    summary = ingest_records(args.source, args.out, rows_per_shard=args.rows_per_shard)
    per_split = ", ".join(f"{c['pairs']} {name}" for name, c in summary.counts.items())
    print(f"wrote {summary.pairs} preference pairs ({per_split}) and {summary.regularization} regularisation "
          f"images to {summary.out}")
    return 0


def cmd_data_world(args: argparse.Namespace) -> int:
    from po_cluster.data.world_dataset import write_world_dataset

    summary = write_world_dataset(args.out, args.n_pairs, args.n_reg, args.n_val, args.seed, args.rows_per_shard,
                                  args.own_word)
    per_split = ", ".join(f"{c['pairs']} {name}" for name, c in summary.counts.items())
    print(f"wrote the typo-shapes world's preference pairs ({per_split}) to {summary.out}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from po_cluster.data.images import Geometry
    from po_cluster.data.pairs import load_preference_data, read_dataset
    from po_cluster.data.splits import SPLITS

    pref, reg = load_preference_data(args.location, None if args.image_size is None else Geometry(args.image_size))
    files = read_dataset(args.location)
    per_split = ", ".join(f"{sum(p.split == s for p in files.pairs)} {s}" for s in SPLITS)
    print(f"{args.location}: {len(pref)} pairs ({per_split}), {len(reg)} regularisation images, "
          f"images {pref.images.shape[1]}x{pref.images.shape[2]}")
    empty = [s for s in SPLITS[1:] if not any(p.split == s for p in files.pairs)]
    if empty:
        print(f"warning: no pairs in {' or '.join(empty)}: a sweep needs val to choose on and test to score on "
              "(classes of fewer than 3 source images keep them all for train)")
    print(f"candidates ({len(pref.classnames)}):")
    for text in pref.classnames:
        print(f"  {text}")
    return 0


def _attack_model(args: argparse.Namespace) -> AlignedCLIP:
    from po_cluster.config import ModelConfig
    from po_cluster.model.aligned import AlignedCLIP
    from po_cluster.model.loading import load_clip
    from po_cluster.model.targets import open_target

    if args.model:  # a plain open_clip model (e.g. the openai base) before any training
        return AlignedCLIP(load_clip(ModelConfig(name=args.model, pretrained=args.pretrained)), "frozen")
    return open_target(args.target).model


def cmd_evaluate_attack_set(args: argparse.Namespace) -> int:
    from po_cluster.evaluate.attack_sets import evaluate_attack_set, read_attack_set

    model = _attack_model(args)
    attack_set = read_attack_set(args.folder, model.preprocess.geometry)
    result = evaluate_attack_set(model, attack_set, t=args.t, template=args.template)
    if args.rows:
        Path(args.rows).write_text("".join(json.dumps(row) + "\n" for row in result.rows))
    if args.json:
        print(json.dumps({"t": args.t, **result.metrics}))
        return 0
    names = attack_set.images.classnames
    print(f"{args.folder}: {int(result.metrics['n'])} images, {len(names)} candidate classes, t = {args.t:g}")
    print(f"  accuracy (true label)        {result.metrics['accuracy']:.3f}")
    print(f"  attack success (written text) {result.metrics['attack_success']:.3f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from po_cluster.cli.common import default_store
    from po_cluster.model.export import export_open_clip, export_open_clip_folder

    out = args.out or args.destination
    if out is None or (args.out and args.destination):
        raise ValueError("give the export's destination once: --out PATH or PATH")
    if args.push and args.format != "open_clip":
        raise ValueError("--push uploads an open_clip folder: it needs --format open_clip")
    if args.push:
        from po_cluster.model.hub import repo_id

        repo_id(args.push)  # a malformed name is refused before anything is exported
    store = default_store(args.store)
    if args.format == "safetensors":
        result = export_open_clip(args.release, out, args.t, store)
        print(f"wrote {result.path} ({result.architecture}, W(t) folded in at t = {result.t:g}); load it with")
        print(f"  open_clip.create_model_and_transforms({result.architecture!r}, pretrained={str(result.path)!r})")
        return 0
    result = export_open_clip_folder(args.release, out, args.t, store)
    print(f"wrote {result.path} ({result.architecture}, W(t) folded in at t = {result.t:g}); load it with")
    print(f"  open_clip.create_model_and_transforms('local-dir:{result.path}')")
    if args.push:
        from po_cluster.model.hub import push_folder

        url = push_folder(result.path, args.push)
        print(f"pushed to {args.push} ({url}); load it with open_clip.create_model_and_transforms({args.push!r})")
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build and check preference datasets").add_subparsers(
        dest="data_command", required=True)
    p = data.add_parser("typographic", help="labelled images → typographic-attack preference pairs")
    p.add_argument("source", nargs="?", help="class folders, a .jsonl/.csv manifest (path,label), or webdataset "
                   "shards (a folder of .tar, one .tar, or a pattern: shards/{00000..00009}.tar); local or s3://")
    p.add_argument("--out", help="output folder or s3:// prefix")
    p.add_argument("--config", help="YAML with TypographicConfig fields; flags override it")
    p.add_argument("--variants", type=int, help="attacked copies per image (default 1)")
    p.add_argument("--seed", type=int)
    p.add_argument("--model", help="open_clip architecture the dataset is for: its preprocessing fits the images "
                   "(instead of --image-size, --resize-mode); no weights are read")
    p.add_argument("--pretrained", help="with --model: its pretrained tag (whose preprocessing it takes: SigLIP's "
                   "webli squashes)")
    p.add_argument("--preprocess", help="with --model: take this open_clip tag's preprocessing")
    p.add_argument("--image-size", type=int, help="square side of the written images (default 224)")
    p.add_argument("--resize-mode", choices=("shortest", "longest", "squash"),
                   help="how images are fitted to the square (default shortest: resize and centre crop)")
    p.add_argument("--template", help='prompt template (default "a photo of a {}.")')
    p.add_argument("--font", action="append", help=".ttf path (repeatable; default: Pillow's bundled font)")
    p.add_argument("--workers", type=int)
    p.add_argument("--splits", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions of the source images per split, by class (default 0.8 0.1 0.1)")
    p.add_argument("--rows-per-shard", type=int, help="records per Parquet shard (default 1024)")
    p.add_argument("--own-word", type=float, help="share of train regularisation images with their own class "
                   "name written (default 0.25)")
    p.set_defaults(func=cmd_data_typographic)
    p = data.add_parser("ingest", help="JSONL records (docs/records.md) → a dataset of Parquet shards")
    p.add_argument("source", help="records .jsonl (or a dataset built before shards); local or s3://")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--rows-per-shard", type=int, default=1024, help="records per shard (default 1024)")
    p.set_defaults(func=cmd_data_ingest)
    p = data.add_parser("world", help="the typo-shapes world as a dataset of Parquet shards (its own splits)")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--n-pairs", type=int, default=4096, help="train preference pairs (default 4096)")
    p.add_argument("--n-reg", type=int, default=2048, help="train regularisation images (default 2048)")
    p.add_argument("--own-word", type=float,
                   help="share of them with their own class name written, as data.own_word (default: its default)")
    p.add_argument("--n-val", type=int, default=500, help="images per validation set (default 500)")
    p.add_argument("--seed", type=int, default=0, help="the train records' seed, as data.seed (default 0)")
    p.add_argument("--rows-per-shard", type=int, default=1024, help="records per shard (default 1024)")
    p.set_defaults(func=cmd_data_world)
    p = data.add_parser("check", help="load a JSONL pairs file or built dataset and list its candidates")
    p.add_argument("location", help="records .jsonl or dataset folder; local or s3://")
    p.add_argument("--image-size", type=int, default=None)
    p.set_defaults(func=cmd_data_check)


def register(sub: argparse._SubParsersAction) -> None:
    _add_data(sub)
    p = sub.add_parser("evaluate-attack-set", help="accuracy and attack success on a PAINT / RTA-100 style folder")
    p.add_argument("folder", help="images named label=<class>_text=<written>.png; local or s3://")
    p.add_argument("target", nargs="?", default=SHIPPED_BASE, help="checkpoint folder (default: shipped base)")
    p.add_argument("--model", help="evaluate a plain open_clip architecture instead of a checkpoint")
    p.add_argument("--pretrained", default=None, help="with --model: open_clip tag or .safetensors file")
    p.add_argument("--t", type=float, default=1.0)
    p.add_argument("--template", default="a photo of a {}.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rows", help="write per-image predictions to this JSONL file")
    p.set_defaults(func=cmd_evaluate_attack_set)
    p = sub.add_parser("export", help="stock open_clip weights with W(t) folded in: one .safetensors file, or the "
                       "folder open_clip loads as local-dir: (and hf-hub: once pushed)")
    p.add_argument("destination", nargs="?", help="output file (.safetensors) or folder (--format open_clip)")
    p.add_argument("--release", default=SHIPPED_BASE,
                   help="what `evaluate` takes: checkpoint or release folder, <store>/releases/<id or latest> (also "
                   f"s3://), or a release id / 'latest' in --store (default: {SHIPPED_BASE})")
    p.add_argument("--store", help="artifact store for release ids (default $PO_CLUSTER_STORE, else ./artifacts)")
    p.add_argument("--t", type=float, default=1.0)
    p.add_argument("--format", choices=("safetensors", "open_clip"), default="safetensors",
                   help="safetensors: one weights file; open_clip: open_clip_config.json (with the preprocessing), "
                   "weights, tokenizer, README (default safetensors)")
    p.add_argument("--out", help="the destination, as a flag")
    p.add_argument("--push", metavar="hf-hub:ORG/NAME", help="with --format open_clip: upload the folder to the "
                   "Hugging Face Hub (token from HF_TOKEN or `huggingface-cli login`, endpoint from HF_ENDPOINT)")
    p.set_defaults(func=cmd_export)
