"""AtomicCheckpointIO: checkpoints written next to their target and renamed into place.

Lightning 2.6's ``TorchCheckpointIO`` (``lightning.fabric.utilities.cloud_io._atomic_save``) serialises the whole
checkpoint into an in-memory buffer and writes it through an fsspec transaction; for a local path fsspec writes the
bytes to a temporary file from ``tempfile.mkstemp()`` (the system temp folder) and ``shutil.move``\\s it onto the
target. When the run folder is on another file system than ``/tmp`` (a cluster's shared storage, the usual case)
that move is a copy: a crash during it leaves a truncated ``last.ckpt``, and a 5 GB checkpoint also passes through
RAM (the buffer) and through ``/tmp``. Here a local checkpoint goes to ``<target>.tmp`` in the same folder, is
flushed to disk, and ``os.replace`` swaps it in (atomic on POSIX): a reader sees the old file or the new one, never
half of one. Remote URLs (``s3://`` ...) keep Lightning's path.

Loading checks the file first (:func:`check_checkpoint_file`) and the loaded object after
(:func:`check_checkpoint_contents`): an empty, truncated or foreign file raises :class:`UnreadableCheckpoint` naming
the file and what is wrong with it, instead of the unpickler's message ("pop from empty list", "101") or a
``KeyError`` from Lightning's checkpoint migration.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format is a zip archive
# The keys Lightning reads from every checkpoint it restores from (``_pl_migrate_checkpoint``, the model's weights).
LIGHTNING_KEYS = ("pytorch-lightning_version", "state_dict")


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that cannot be restored from; the message names the file and what is wrong with it."""


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_checkpoint_file(path: str | os.PathLike) -> Path:
    """Raise :class:`UnreadableCheckpoint` unless ``path`` is a non-empty file in a format ``torch.load`` reads (a
    complete zip archive, or the legacy pickle format); reads at most a few bytes. Returns the path."""
    file = Path(str(path).removeprefix("file://"))
    if not file.exists():
        raise UnreadableCheckpoint(f"checkpoint not found: {file}")
    if not file.is_file():
        raise UnreadableCheckpoint(f"{file} is not a checkpoint file (a folder?)")
    with open(file, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if not head:
        raise UnreadableCheckpoint(f"{file} is empty (0 bytes), not a checkpoint: an interrupted save or copy?")
    if head == ZIP_MAGIC and not zipfile.is_zipfile(file):
        raise UnreadableCheckpoint(
            f"{file} is a truncated or corrupt checkpoint ({file.stat().st_size} bytes; its zip archive has no end): "
            "an interrupted save or copy?"
        )
    if head != ZIP_MAGIC and head[:1] != pickle.PROTO:  # torch.save's legacy format opens with a pickle
        raise UnreadableCheckpoint(
            f"{file} is not a checkpoint: torch.save writes a zip archive, this file starts with {head!r}"
        )
    return file


def check_checkpoint_contents(checkpoint: Any, path: str | os.PathLike) -> None:
    """Raise :class:`UnreadableCheckpoint` unless ``checkpoint`` (loaded from ``path``) is a Lightning checkpoint."""
    missing = [key for key in LIGHTNING_KEYS if key not in checkpoint] if isinstance(checkpoint, dict) else None
    if missing is None:
        raise UnreadableCheckpoint(f"{path} holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
    if missing:
        raise UnreadableCheckpoint(
            f"{path} is not a Lightning checkpoint: it lacks {', '.join(map(repr, missing))} (a weights file? "
            "`dimo fit`, `validate` and `predict` resume from what ModelCheckpoint writes)"
        )


def read_checkpoint(path: str | os.PathLike, **load_kwargs: Any) -> dict[str, Any]:
    """``torch.load(path, **load_kwargs)`` of a local Lightning checkpoint; :class:`UnreadableCheckpoint` (naming the
    file) when the file is missing, empty, truncated, not a checkpoint or not a Lightning one."""
    file = check_checkpoint_file(path)
    try:
        checkpoint = torch.load(file, **load_kwargs)
    except Exception as err:  # any failure to unpickle: say which file, keep the first line of the reason
        raise UnreadableCheckpoint(f"cannot read the checkpoint {file}: {_first_line(err)}") from err
    check_checkpoint_contents(checkpoint, file)
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are a same-folder temp file + fsync + ``os.replace``, and whose
    loads name the file and the problem when it cannot be restored from (as ``--ckpt_path last`` resolves it)."""

    @override
    def load_checkpoint(self, path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, *args, **kwargs)
        check_checkpoint_file(path)
        try:
            checkpoint = super().load_checkpoint(path, *args, **kwargs)
        except Exception as err:  # a file that passed the format check but does not unpickle
            raise UnreadableCheckpoint(f"cannot read the checkpoint {path}: {_first_line(err)}") from err
        check_checkpoint_contents(checkpoint, path)
        return checkpoint

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
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
