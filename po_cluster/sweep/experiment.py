"""Where a sweep lives: a local folder or s3://bucket/prefix. Ray Tune and Ray Train
reach it through one pyarrow filesystem (po_cluster.store.location.pyarrow_fs);
our own results, uploads and checkpoint fetches go through po_cluster.store.location
to the same place, so everything of one sweep lands together."""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pyarrow import fs as pafs

from po_cluster.config import SweepConfig
from po_cluster.store import location


@dataclass(frozen=True)
class Experiment:
    filesystem: pafs.FileSystem  # what Ray Tune and Ray Train write through
    root: str  # storage_path as the filesystem sees it: an absolute folder, or "bucket/prefix"
    name: str
    uri: str  # the experiment as a location: a folder, or s3://bucket/prefix/name

    @property
    def path(self) -> str:
        return f"{self.root.rstrip('/')}/{self.name}"

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def file(self, name: str) -> str:
        """`<experiment>/<name>` as the filesystem sees it (for Ray)."""
        return f"{self.path}/{name}"

    def location_of(self, name: str) -> str:
        """`<experiment>/<name>` as a location (for po_cluster.store.location)."""
        return location.join(self.uri, name)

    def exists(self, name: str) -> bool:
        return location.exists(self.location_of(name))

    def read_json(self, name: str) -> dict:
        return json.loads(location.read_bytes(self.location_of(name)))

    def write_json(self, name: str, content: dict) -> str:
        location.write_bytes(self.location_of(name), (json.dumps(content, indent=2) + "\n").encode())
        return self.location_of(name)

    def upload(self, local: Path, name: str) -> None:
        """A local file or folder to `<experiment>/<name>`."""
        location.upload(local, self.location_of(name))

    def fetch(self, path: str, local: Path) -> Path:
        """A folder of this filesystem (a trial checkpoint, "bucket/key" on S3) as a local folder."""
        if self.is_local:
            return Path(path)
        local.mkdir(parents=True, exist_ok=True)
        return location.download_folder(f"s3://{path.lstrip('/')}", local)


def open_experiment(cfg: SweepConfig) -> Experiment:
    if "://" in cfg.storage_path and not location.is_s3(cfg.storage_path):
        raise ValueError(f"storage_path {cfg.storage_path!r}: use a local folder or s3://bucket/prefix")
    filesystem, root = location.pyarrow_fs(cfg.storage_path)
    uri = location.join(cfg.storage_path.rstrip("/"), cfg.name) if location.is_s3(cfg.storage_path) \
        else f"{root}/{cfg.name}"
    return Experiment(filesystem, root, cfg.name, uri)


def work_dir(experiment: Experiment) -> Path:
    """Where local outputs (release folder, report) are made: the experiment itself when local."""
    if experiment.is_local:
        return Path(experiment.path)
    folder = Path("runs") / "sweeps" / experiment.name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="po-cluster-"))
