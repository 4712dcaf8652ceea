"""`po-cluster serve`: run the serving app locally (Ray Serve on 127.0.0.1 by default) until Ctrl-C.

For a cluster, use `serve deploy serve/config.yaml` or the KubeRay RayService
(serve/README.md); this command is the same application with args from flags.
"""
from __future__ import annotations

import argparse
import signal
import threading


def cmd_serve(args: argparse.Namespace) -> int:
    from po_cluster.cli.common import default_store
    from po_cluster.serving.local import start_local

    app_args = {"store": default_store(args.store),
                "default_release": args.release,
                "batching": {"max_batch_size": args.max_batch_size},
                "auth": {"api_keys_env": args.api_keys_env, "api_keys_file": args.api_keys_file}}
    if args.endpoint_url:
        app_args["store_settings"] = {"endpoint_url": args.endpoint_url}
    server = start_local(app_args, host=args.host, port=args.port, num_cpus=args.num_cpus)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving {args.release} from {app_args['store']} on {server.url}  (playground: {server.url}/, "
          f"API: {server.url}/docs); Ctrl-C to stop", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        print("stopping…", flush=True)
        server.stop()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve releases over HTTP locally (Ray Serve), until Ctrl-C")
    p.add_argument("--store", help="release store: folder or s3://bucket/prefix (default $PO_CLUSTER_STORE, "
                                   "else ./artifacts)")
    p.add_argument("--release", default="latest", help="release served when a request names none")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint-url", help="S3 endpoint (MinIO, moto, …)")
    p.add_argument("--api-keys-env", help="require Bearer keys, read from this environment variable")
    p.add_argument("--api-keys-file", help="require Bearer keys, read from this file (one per line)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.set_defaults(func=cmd_serve)
