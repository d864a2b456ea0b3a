"""Weight files: weights-only torch reading and strict, explained state-dict loading shared by every teacher, and
safetensors writing with the file mode every other file gets."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process umask (0o644 under umask 022)."""
    try:  # Linux reports the umask without changing it (os.umask must set one to read it, racing other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def give_default_mode(paths: Iterable[str | Path]) -> None:
    """Set each file of ``paths`` to :func:`default_file_mode`.

    safetensors' ``save_file`` (0.8) writes a temporary file in the target's folder, created 0600 (owner-only), and
    renames it onto the target: everything written through it, transformers' and diffusers' ``save_pretrained``
    included, would be unreadable to the user's group and others whatever their umask.
    """
    mode = default_file_mode()
    for path in paths:
        os.chmod(path, mode)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` (atomic: a temporary file renamed onto ``path``) with the mode ``open()``
    would give the file (:func:`give_default_mode`) -> path."""
    save_file(dict(tensors), str(path), metadata=metadata)
    give_default_mode([path])
    return Path(path)


def load_torch_file(path: str | Path) -> Any:
    """``torch.load`` on CPU with ``weights_only=True``, memory-mapped when the file format allows it.

    Memory mapping keeps the multi-GB MaskGIT/VQGAN files (which also hold optimizer states we never read) out of
    RAM; files in the legacy (pre-zip) format cannot be mapped and are read normally.

    Raises:
        ValueError: the file is not a weights-only torch file (corrupt, or it stores arbitrary Python objects).
    """
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"torch.load(weights_only=True) cannot read {path}: not a torch file, or it stores Python objects beyond "
            f"tensors and plain containers. {str(err).splitlines()[0]}"
        ) from err
    except RuntimeError as err:
        raise ValueError(f"cannot read {path}: {err}") from err


def _show(items: Sequence[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def load_state_dict_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Load ``state`` into ``module`` strictly, assigning the tensors (works for a module built on the meta device).

    Args:
        module: the target; may live on the meta device (its parameters are replaced by the checkpoint's tensors).
        state: checkpoint tensors, already stripped of ignorable keys/prefixes.
        source: the file the tensors come from (named in errors).
        hint: extra advice appended to the error message.

    Raises:
        ValueError: missing keys, unexpected keys or shape mismatches, each listed (a few, with counts).
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_show(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_show(unexpected)}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} shape mismatches: {_show(wrong_shape)}")
        raise ValueError(
            f"{source} does not match {type(module).__name__}: " + "; ".join(parts) + (f". {hint}" if hint else "")
        )
    # Cast to the module's dtypes (a no-op for fp32 files) so a half-precision file cannot silently change them.
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
