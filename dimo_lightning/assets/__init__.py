"""Small weights this project trained itself (MNIST codebook, teacher, metric network; the text teacher, tokenizer
and judge); see `make assets`."""

from __future__ import annotations

from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent
ASSET_PREFIX = "asset:"  # a path setting "asset:text_judge" names the shipped dimo_lightning/assets/text_judge


def asset_path(name: str) -> Path:
    """Path of a shipped asset file."""
    return ASSET_DIR / name


def resolve_asset(spec: str | Path, flag: str = "path") -> Path:
    """A path setting as a path: ``"asset:NAME"`` is the shipped asset ``NAME`` (wherever the package is installed,
    so configs need not know the install location); anything else is taken as given.

    Raises:
        FileNotFoundError: an ``asset:`` name that is not shipped; the message names ``flag``.
    """
    text = str(spec)
    if not text.startswith(ASSET_PREFIX):
        return Path(spec)
    name = text[len(ASSET_PREFIX):].strip("/")
    path = asset_path(name)
    if not name or not path.exists():
        shipped = sorted(p.name for p in ASSET_DIR.iterdir() if not p.name.startswith(("_", ".")))
        raise FileNotFoundError(f"{flag}: no shipped asset {name!r} (shipped: {', '.join(shipped)})")
    return path
