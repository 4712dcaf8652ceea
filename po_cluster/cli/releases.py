"""`po-cluster releases list | show | pull | push`: entry points over po_cluster.store.artifacts.

Every command takes `--store` (a folder or s3://bucket/prefix; default
$PO_CLUSTER_STORE, else ./artifacts) and `--endpoint-url` (else boto3's own
resolution: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, the profile). Errors are
StoreError, which cli.main prints as one line with a non-zero exit code.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from po_cluster.cli.common import DEFAULT_STORE, default_store  # noqa: F401 (cli.embed imports it from here)


def _store(args: argparse.Namespace):  # -> ArtifactStore
    from po_cluster.store.artifacts import StoreConfig, open_store

    return open_store(default_store(args.store), StoreConfig(endpoint_url=args.endpoint_url))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_list(args: argparse.Namespace) -> int:
    store = _store(args)
    releases = store.list_releases()
    if not releases:
        print(f"no releases in {store.uri}")
        return 0
    print(f"{'release':<28} {'created (UTC)':<20} {'files':>5} {'size':>10}")
    for info in releases:
        created = info.created.strftime("%Y-%m-%d %H:%M:%S") if info.created else "?"
        marker = "  (latest)" if info.latest else ""
        print(f"{info.release_id:<28} {created:<20} {info.files:>5} {_size(info.size):>10}{marker}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    shown = _store(args).show_release(args.release_id)
    if args.json or not shown.get("card"):  # a release without a card is shown as its JSON
        print(json.dumps(shown, indent=2, default=str))
        return 0
    print(shown["card"].rstrip())
    print(f"\n---\nrelease {shown['release_id']} in {shown['store']}, created {shown['created']}, "
          f"manifest sha256 {shown['manifest_sha256']} ({len(shown['manifest']['files'])} files); --json for all")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from po_cluster.store.artifacts import StoreError

    folder = _store(args).pull_release(args.release_id)
    if args.to:
        dest = Path(args.to)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise StoreError(f"{dest} exists and is not an empty folder; choose another --to")
        shutil.copytree(folder, dest, dirs_exist_ok=True)
        from po_cluster.model.checkpoint import verify_manifest

        verify_manifest(dest)  # the copy, not only the cache, is what the user will load
        folder = dest
    print(folder)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    store = _store(args)
    release_id = store.publish_release(Path(args.folder), args.release_id)
    print(f"published {release_id} to {store.uri}")
    return 0


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help=f"folder or s3://bucket/prefix (default: $PO_CLUSTER_STORE or {DEFAULT_STORE})")
    parser.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL[_S3] or AWS)")


def register(subparsers: argparse._SubParsersAction) -> None:
    releases = subparsers.add_parser("releases", help="published releases in an artifact store (folder or s3://)")
    sub = releases.add_subparsers(dest="releases_command", required=True)
    p = sub.add_parser("list", help="published releases, oldest first")
    _store_options(p)
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("show", help="a release's model card (metrics, trade-off over t, training settings, "
                                    "lineage); --json: manifest, metrics, model description and card")
    p.add_argument("release_id", help="a release id or 'latest'")
    p.add_argument("--json", action="store_true", help="everything as one JSON object")
    _store_options(p)
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("pull", help="download and verify a release; prints its local folder")
    p.add_argument("release_id", help="a release id or 'latest'")
    p.add_argument("--to", help="copy the verified release into this (new or empty) folder")
    _store_options(p)
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser("push", help="publish a checkpoint folder (verified against its manifest) as a release")
    p.add_argument("folder")
    p.add_argument("--id", dest="release_id", help="release id (default: r-YYYYMMDD-HHMMSS-<6 hex>)")
    _store_options(p)
    p.set_defaults(func=cmd_push)
