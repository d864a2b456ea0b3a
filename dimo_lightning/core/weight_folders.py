"""Reading Hugging Face model folders strictly: ``config.json``, one ``model.safetensors`` or a sharded set behind
``model.safetensors.index.json``. Every failure names the file and the layout that was expected, so a wrong or
half-downloaded folder is diagnosed from the message alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _show(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def read_config(path: str | Path, layout: str) -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
        FileNotFoundError: no such file (the message names it and the expected ``layout``).
        ValueError: not valid JSON, or not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found. Expected layout: {layout}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}). Expected layout: {layout}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}. Expected layout: {layout}")
    return config


def load_safetensors(path: str | Path, layout: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file, on ``device``.

    Raises:
        FileNotFoundError: no such file (named with the expected ``layout``).
        ValueError: the file cannot be read as safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found. Expected layout: {layout}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {path} as safetensors: {err}. Expected layout: {layout}") from err


def load_sharded_safetensors(
    folder: str | Path,
    expected_shapes: Mapping[str, tuple[int, ...]],
    layout: str,
    device: torch.device | str = "cpu",
    index_name: str = INDEX_NAME,
) -> dict[str, torch.Tensor]:
    """The tensors of a sharded checkpoint, checked key by key against the index and against ``expected_shapes``.

    The index's ``weight_map`` must name exactly the expected keys; every shard it lists must exist and hold exactly
    the keys the index assigns to it, with the expected shapes. Shards are read one at a time.

    Args:
        folder: the model folder holding ``index_name`` and the shards.
        expected_shapes: key -> shape of every tensor the model needs.
        layout: a description of the expected folder, appended to every error.
        device: where the tensors are materialised.
        index_name: the index file's name.

    Raises:
        FileNotFoundError: the index or a shard it lists is missing (the message names it).
        ValueError: a malformed index; keys missing from or unexpected in the index; a shard holding keys the index
            does not assign to it, or lacking some it does; a shape mismatch (each names the file).
    """
    folder = Path(folder)
    index_path = folder / index_name
    index = read_config(index_path, layout)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_path} has no 'weight_map' object (key -> shard file name). Expected layout: {layout}")
    missing = sorted(set(expected_shapes) - set(weight_map))
    unexpected = sorted(set(weight_map) - set(expected_shapes))
    if missing or unexpected:
        parts = [f"{len(missing)} missing keys: {_show(missing)}"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys: {_show(unexpected)}"] if unexpected else []
        raise ValueError(f"{index_path} does not match the model: {'; '.join(parts)}. Expected layout: {layout}")

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = folder / shard
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} (listed in {index_path}) not found. Expected layout: {layout}")
        assigned = {key for key, name in weight_map.items() if name == shard}
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                held = set(f.keys())
                if held != assigned:
                    extra, lacking = sorted(held - assigned), sorted(assigned - held)
                    parts = [f"holds {len(extra)} keys not assigned to it in the index: {_show(extra)}"] * bool(extra)
                    parts += [f"lacks {len(lacking)} keys the index assigns to it: {_show(lacking)}"] * bool(lacking)
                    raise ValueError(f"{path} disagrees with {index_path}: {'; '.join(parts)}. "
                                     f"Expected layout: {layout}")
                wrong = [f"{key}: file {shape} vs model {list(expected_shapes[key])}" for key in sorted(held)
                         if (shape := list(f.get_slice(key).get_shape())) != list(expected_shapes[key])]
                if wrong:
                    raise ValueError(f"{path} does not match the model's shapes ({len(wrong)} mismatches: "
                                     f"{_show(wrong)}). Is the config.json next to it the config of these weights? "
                                     f"Expected layout: {layout}")
                tensors.update({key: f.get_tensor(key) for key in sorted(held)})
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read shard {path} as safetensors: {err}. Expected layout: {layout}") from err
    return tensors
