"""`po-cluster embed`: embed a folder, manifest, S3 prefix or tar shards with a release, on Ray Data
(po_cluster/embed/job.py).

The flags build an EmbedConfig (over an optional YAML file of the same fields);
jobs/embed.py reuses them for `ray job submit`.
"""
from __future__ import annotations

import argparse
from typing import Any

_FLAGS: dict[str, tuple[type, str]] = {  # field: (type, help); each is --field-with-dashes
    "input": (str, "folder, .jsonl/.parquet manifest (id, path or uri), s3:// prefix, or webdataset shards "
                   "(a folder of .tar, one .tar, or a pattern: shards/{00000..00009}.tar)"),
    "output": (str, "folder or s3:// prefix; embeddings/ and errors/ are written under it"),
    "store": (str, "release store: folder or s3://bucket/prefix (default $PO_CLUSTER_STORE, else the "
                   "config's store, else ./artifacts)"),
    "release": (str, "release id or latest (default latest)"),
    "t": (float, "the knob, as the endpoints' t: 0 the starting model, 1 the release (default 1)"),
    "shard_size": (int, "images per output file and decoding task; the unit a re-run skips (default 1000)"),
    "batch_size": (int, "images per model call (default 64)"),
    "decode_batch_size": (int, "images per decoding task call (default 64)"),
    "concurrency": (int, "model actors (default 1)"),
    "actor_num_cpus": (float, "CPUs per model actor (default 1)"),
    "num_gpus": (float, "GPUs per model actor (default: 1 when the cluster has GPUs, else 0)"),
    "decode_concurrency": (int, "decoding tasks at once (default: as CPUs allow)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of EmbedConfig fields; flags override it")
    for name, (kind, text) in _FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help=text)
    parser.add_argument("--max-image-pixels", type=int, help="width × height limit (default: the endpoint's)")
    parser.add_argument("--endpoint-url", help="S3 endpoint (MinIO, moto, …) for the store, inputs and output")
    parser.add_argument("--cache-dir", help="where pulled releases are cached (default ~/.cache/po-cluster)")
    parser.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")


def config_from_args(args: argparse.Namespace) -> Any:  # -> EmbedConfig
    from po_cluster.cli.releases import default_store
    from po_cluster.config import load_yaml, parse_config
    from po_cluster.embed.job import EmbedConfig

    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    data.update({name: getattr(args, name) for name in _FLAGS if getattr(args, name) is not None})
    data["store"] = default_store(args.store, data.get("store"))  # flag > $PO_CLUSTER_STORE > config
    if args.max_image_pixels is not None:
        data["limits"] = {**data.get("limits", {}), "max_image_pixels": args.max_image_pixels}
    for name in ("endpoint_url", "cache_dir"):
        if getattr(args, name):
            data["store_settings"] = {**data.get("store_settings", {}), name: getattr(args, name)}
    return parse_config(data, args.config or "command line", EmbedConfig)


def print_shard(report: Any) -> None:
    print(f"shard {report.index + 1}/{report.total}: {report.ok} ok, {report.failed} failed → {report.uri}",
          flush=True)


def cmd_embed(args: argparse.Namespace) -> int:
    from po_cluster.embed.job import run_embed
    from po_cluster.pipelines.cluster import connect_ray

    cfg = config_from_args(args)  # before Ray starts: a bad flag costs nothing
    connect_ray(args.address)
    summary = run_embed(cfg, on_shard=print_shard)
    print(summary.line(), flush=True)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("embed", help="batch-embed images with a release on Ray Data (resumable)")
    add_arguments(p)
    p.set_defaults(func=cmd_embed)
