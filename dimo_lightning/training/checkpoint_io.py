"""AtomicCheckpointIO: checkpoints written next to their target and renamed into place.

Lightning 2.6's ``TorchCheckpointIO`` (``lightning.fabric.utilities.cloud_io._atomic_save``) serialises the whole
checkpoint into an in-memory buffer and writes it through an fsspec transaction; for a local path fsspec writes the
bytes to a temporary file from ``tempfile.mkstemp()`` (the system temp folder) and ``shutil.move``\\s it onto the
target. When the run folder is on another file system than ``/tmp`` (a cluster's shared storage, the usual case)
that move is a copy: a crash during it leaves a truncated ``last.ckpt``, and a 5 GB checkpoint also passes through
RAM (the buffer) and through ``/tmp``. Here a local checkpoint goes to ``<target>.tmp`` in the same folder, is
flushed to disk, and ``os.replace`` swaps it in (atomic on POSIX): a reader sees the old file or the new one, never
half of one. Remote URLs (``s3://`` ...) keep Lightning's path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are a same-folder temp file + fsync + ``os.replace``."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or ("://" in str(path) and not str(path).startswith("file://")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
