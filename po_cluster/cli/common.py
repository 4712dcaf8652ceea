"""What several commands share: where the artifact store is.

Every command that touches a store (evaluate, embed, serve, releases, average, pipeline) resolves it
here, so that a pipeline publishes to the store that `serve` and `evaluate` then read:

    the --store flag  >  $PO_CLUSTER_STORE (when non-empty)  >  the config's `store`  >  ./artifacts

The environment outranks a config file on purpose: the variable says where this machine's (or this
cluster's) releases live, for every command at once, while a config travels between machines.
This is where commands read $PO_CLUSTER_STORE; the other places that read the environment (RAY_ADDRESS,
AWS_*, the API-key variable, Serve's ingress variables) are listed in docs/design.md, "The data flow".
"""
from __future__ import annotations

import os

DEFAULT_STORE = "./artifacts"
STORE_ENV = "PO_CLUSTER_STORE"


def default_store(explicit: str | None = None, configured: str | None = None) -> str:
    """`explicit` (a flag), else $PO_CLUSTER_STORE if non-empty, else `configured` (a config's
    `store`), else ./artifacts."""
    return explicit or os.environ.get(STORE_ENV) or configured or DEFAULT_STORE
