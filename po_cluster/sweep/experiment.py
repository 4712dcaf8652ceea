"""Where a sweep lives: a local folder or s3://bucket/prefix, reached through one
pyarrow filesystem that Ray Tune, Ray Train and po-cluster all use, so trial
checkpoints, the experiment state and our own results land in the same place."""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pyarrow import fs as pafs

from po_cluster.config import SweepConfig


@dataclass(frozen=True)
class Experiment:
    filesystem: pafs.FileSystem
    root: str  # storage_path as the filesystem sees it: an absolute folder, or "bucket/prefix"
    name: str
    uri: str  # for messages

    @property
    def path(self) -> str:
        return f"{self.root.rstrip('/')}/{self.name}"

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def file(self, name: str) -> str:
        return f"{self.path}/{name}"

    def exists(self, name: str) -> bool:
        return self.filesystem.get_file_info(self.file(name)).type == pafs.FileType.File

    def read_json(self, name: str) -> dict:
        with self.filesystem.open_input_stream(self.file(name)) as stream:
            return json.loads(stream.read())

    def write_json(self, name: str, content: dict) -> str:
        self.filesystem.create_dir(self.path, recursive=True)
        with self.filesystem.open_output_stream(self.file(name)) as stream:
            stream.write((json.dumps(content, indent=2) + "\n").encode())
        return f"{self.uri}/{name}"

    def upload(self, local: Path, name: str) -> None:
        """A local file or folder to `<experiment>/<name>`."""
        self.filesystem.create_dir(self.path, recursive=True)
        pafs.copy_files(str(local), self.file(name), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.filesystem)

    def fetch(self, path: str, local: Path) -> Path:
        """A folder of this filesystem (a trial checkpoint) as a local folder."""
        if self.is_local:
            return Path(path)
        local.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local), source_filesystem=self.filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
        return local


def open_experiment(cfg: SweepConfig) -> Experiment:
    if cfg.storage_path.startswith("s3://"):
        from po_cluster.store.artifacts import pyarrow_fs

        filesystem, root = pyarrow_fs(cfg.storage_path)
        return Experiment(filesystem, root, cfg.name, f"{cfg.storage_path.rstrip('/')}/{cfg.name}")
    if "://" in cfg.storage_path:
        raise ValueError(f"storage_path {cfg.storage_path!r}: use a local folder or s3://bucket/prefix")
    root = str(Path(cfg.storage_path).expanduser().resolve())
    return Experiment(pafs.LocalFileSystem(), root, cfg.name, f"{root}/{cfg.name}")


def work_dir(experiment: Experiment) -> Path:
    """Where local outputs (release folder, report) are made: the experiment itself when local."""
    if experiment.is_local:
        return Path(experiment.path)
    folder = Path("runs") / "sweeps" / experiment.name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="po-cluster-"))
