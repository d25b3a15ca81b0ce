"""What the training loop needs from its runner: rank, world size, device, the checkpoint to resume from, and a
way to report metrics and checkpoints.

``RaySession`` is Ray Train (``ray.train.get_context``, ``get_checkpoint``, ``report``); ``LocalSession`` runs the
same loop in the current process with one worker and keeps checkpoints in a local folder (unit tests, and the GPU
test on machines without Ray).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from reasonembed.config.base import StorageConfig
from reasonembed.redapter.state import CHECKPOINT_PREFIX
from reasonembed.storage import is_s3, resolve


class RaySession:
    """Inside a Ray Train worker."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:  # local storage: the folder itself; s3: a download
            yield Path(d)

    def checkpoint_uri(self, run_uri: str, name: str) -> str:
        """Where a reported checkpoint lands: Ray Train's run folder."""
        from reasonembed.storage import join

        return join(run_uri, name)

    def report(self, metrics: dict[str, Any], folder: Path | None, name: str) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(folder)) if folder is not None else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)


class LocalSession:
    """One worker in this process; checkpoints are copied to ``root/checkpoint-<step>``."""

    def __init__(self, root: str | Path, device: str | torch.device = "cpu"):
        self.rank, self.world_size = 0, 1
        self.device = torch.device(device)
        self.root = Path(root)
        self.reports: list[dict[str, Any]] = []

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        found = self.checkpoints()
        yield found[-1] if found else None

    def checkpoint_uri(self, run_uri: str, name: str) -> str:
        return str(self.root / name)

    def report(self, metrics: dict[str, Any], folder: Path | None, name: str) -> None:
        self.reports.append(dict(metrics))
        if folder is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.copytree(folder, self.root / name, dirs_exist_ok=True)


@contextlib.contextmanager
def fetched(uri: str, storage: StorageConfig | None = None) -> Iterator[Path]:
    """A checkpoint folder given by URI as a local path (s3:// is downloaded to a temporary folder)."""
    if not is_s3(uri):
        path = Path(uri).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"checkpointing.resume_from: {uri} is not a folder")
        yield path
        return
    import pyarrow.fs as pafs

    fs, path = resolve(uri, storage)
    with tempfile.TemporaryDirectory(prefix="reasonembed-resume-") as tmp:
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)
