"""The run folder every callback and writer of a run writes into."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl


def run_directory(trainer: pl.Trainer) -> Path:
    """The run's log directory (the logger's version folder), created if needed.

    ``trainer.log_dir`` is a collective (it broadcasts rank zero's path): call this on every rank, never inside a
    rank-zero-only branch, or the other ranks wait forever.
    """
    directory = Path(trainer.log_dir or trainer.default_root_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return directory
