"""What `evaluate`, `export` and `load_release` take as a model: a checkpoint or release folder, a
release as <store>/releases/<id or latest> (local or s3://), a release id (or "latest") in a store,
or the shipped base. One resolution, so every command takes the same targets."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from po_cluster.config import SHIPPED_BASE, ModelConfig
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.checkpoint import load_checkpoint, model_description
from po_cluster.model.loading import load_clip

SHIPPED_LABEL = "typo-shapes-base"


def resolve_target(target: str | Path, store: str | None = None) -> str:
    """A target as open_target takes it: the shipped base, a folder or an s3:// release pass as they
    are; anything else is a release id (or "latest") in `store`, pulled, verified and cached."""
    target = str(target)
    if target == SHIPPED_BASE or target.startswith("s3://") or Path(target).exists():
        return target
    if "/" in target or target.startswith("."):  # a path (release ids have no slash): not there
        raise FileNotFoundError(f"no checkpoint folder at {target}")
    if store is None:
        raise FileNotFoundError(f"no checkpoint folder at {target} (and no store given to look it up as a release)")
    from po_cluster.store.artifacts import open_store

    return str(open_store(store).pull_release(target))


@dataclass
class Target:
    model: AlignedCLIP
    description: dict  # model.json, or the shipped base's equivalent
    label: str  # a short name: the folder's, the release id, typo-shapes-base


def _shipped_base() -> Target:
    from po_cluster.data import world

    model = AlignedCLIP(load_clip(ModelConfig()), "frozen")
    return Target(model, model_description(model, ModelConfig(), world.SHAPES, world.PROMPT_TEMPLATE), SHIPPED_LABEL)


def open_target(target: str | Path, store: str | None = None) -> Target:
    """Load `target` (anything resolve_target takes). A checkpoint is its own reference: at t = 0 it is
    exactly its starting model."""
    resolved = resolve_target(target, store)
    if resolved == SHIPPED_BASE:
        return _shipped_base()
    if resolved.startswith("s3://") or "/releases/" in resolved and not Path(resolved).is_dir():
        from po_cluster.store.artifacts import pull_release_uri  # <store>/releases/<id|latest>: pulled, verified

        resolved = str(pull_release_uri(resolved))
    folder = Path(resolved)
    if not folder.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {resolved}")
    model, description = load_checkpoint(folder)
    return Target(model, description, folder.name)
