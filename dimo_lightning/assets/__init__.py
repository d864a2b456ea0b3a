"""Small weights this project trained itself (MNIST codebook, teacher, metric network); see `make assets`."""

from __future__ import annotations

from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent


def asset_path(name: str) -> Path:
    """Path of a shipped asset file."""
    return ASSET_DIR / name
