"""po-cluster: preference optimisation of open_clip models on Ray (README.md).

`po_cluster.load_release` is the notebook entry point; importing the package imports nothing else.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from po_cluster.model.open_clip_api import ImagePreprocess


def load_release(target: str | Path = "po-cluster:typo-shapes-base", t: float = 1.0, store: str | None = None,
                 device: str = "cpu") -> tuple[Any, ImagePreprocess, Any]:
    """A release as open_clip returns a model: (model, preprocess, tokenizer), the release folded in at t.

    `target` is anything `po-cluster evaluate` takes: a checkpoint or release folder, a
    <store>/releases/<id or latest> URI (local or s3://), a release id or "latest" in `store`
    (default: $PO_CLUSTER_STORE, else ./artifacts), or the shipped base "po-cluster:typo-shapes-base".
    `model.encode_image(preprocess(image)[None], normalize=True)` is then the aligned embedding at t.
    """
    from po_cluster.cli.common import default_store
    from po_cluster.model.open_clip_api import load_release as load

    return load(target, t, default_store(store), device)
