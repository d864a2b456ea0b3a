"""SampleWriter: ``dimo predict`` output streamed to disk in shards, and the reader of that output.

Layout of an output folder (``<run dir>/predictions`` or ``output_dir``):

- ``samples_XXXXXXXX.npz`` (the global index of its first sample): ``images`` uint8 (B, H, W, C) (ADM's layout),
  the conditions, ``labels`` int64 (B,) for class labels or ``prompts`` (B,) unicode strings for prompts, and
  ``index`` int64 (B,) global indices;
- ``png/XXXXXX_<label>.png`` (labels) or ``png/XXXXXX.png`` with the prompt in the PNG's ``prompt`` text chunk
  (prompts; ``PIL.Image.open(path).text["prompt"]``) for the first ``max_png`` global indices;
- ``index.json`` (written last, by rank zero): ``count``, ``image_shape``, ``conditions`` (``labels`` or
  ``prompts``) and the shards in global order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torchvision.utils import save_image
from typing_extensions import override

from dimo_lightning.core.run_directory import run_directory

INDEX_FILE = "index.json"


CONDITION_KEYS = ("labels", "prompts")  # the npz key of the conditions: class labels or prompt strings


def _as_numpy_conditions(conditions: Any) -> tuple[str, np.ndarray]:
    """(npz key, array) of a batch of conditions: ``labels`` for a tensor, ``prompts`` (unicode) for strings."""
    if isinstance(conditions, torch.Tensor):
        return "labels", conditions.detach().cpu().numpy()
    if all(isinstance(c, str) for c in conditions):
        return "prompts", np.asarray(list(conditions), dtype=np.str_)
    return "labels", np.asarray(conditions)


def _save_png_with_prompt(image: torch.Tensor, path: Path, prompt: str) -> None:
    """``image`` (C, H, W) in [0, 1] as a PNG (rounded as ``save_image`` does) with ``prompt`` as its text chunk."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    pixels = (image.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    info = PngInfo()
    info.add_itxt("prompt", prompt)  # iTXt: UTF-8, any prompt
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path, pnginfo=info)


class SampleWriter(BasePredictionWriter):
    """Writes each rank's predictions (dicts with ``images`` (B, C, H, W) in [0, 1], ``labels`` and the global
    ``index`` (B,)) as they come: a shard file every ``shard_size`` samples, so memory holds one shard per rank.
    After a barrier on every rank, rank zero checks that every global index was written exactly once and writes
    ``index.json``. The images are dropped from the predictions Lightning keeps (they are on disk).

    Args:
        output_dir: where to write (None: ``predictions`` in the run's log directory).
        shard_size: samples per shard file and rank.
        max_png: also write PNG files of the first ``max_png`` global indices (0: none).
    """

    def __init__(self, output_dir: str | None = None, shard_size: int = 1000, max_png: int = 1000) -> None:
        super().__init__(write_interval="batch")
        if shard_size < 1 or max_png < 0:
            raise ValueError(f"SampleWriter: shard_size must be >= 1 and max_png >= 0, got {shard_size}, {max_png}")
        self.output_dir = output_dir
        self.shard_size = shard_size
        self.max_png = max_png
        self.path: Path | None = None  # the output folder
        self._buffer: list[dict[str, np.ndarray]] = []

    @override
    def on_predict_start(self, trainer, pl_module) -> None:
        # every rank: log_dir and barrier are collectives
        self.path = Path(self.output_dir) if self.output_dir else run_directory(trainer) / "predictions"
        if trainer.is_global_zero:
            self.path.mkdir(parents=True, exist_ok=True)
            for stale in [*self.path.glob("samples_*.npz"), self.path / INDEX_FILE]:
                stale.unlink(missing_ok=True)  # an earlier run's shards would end up in this run's index
        trainer.strategy.barrier("SampleWriter.start")
        self._buffer = []

    @override
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        images = prediction["images"].detach()
        index = prediction.get("index")
        if index is None:
            if not batch_indices:
                raise ValueError("SampleWriter needs global sample indices: predict_step must return 'index' "
                                 "(ClassLabelDataModule's predict loader provides them)")
            index = torch.as_tensor(batch_indices)
        index = index.detach().cpu().long().numpy()
        if len(index) == 0:  # a padding batch (equal step counts on every rank): nothing to write
            del prediction["images"]
            return
        key, conditions = _as_numpy_conditions(prediction["labels"])
        if len(conditions) != len(index):
            raise ValueError(f"SampleWriter: {len(conditions)} conditions for {len(index)} samples")
        pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)  # (B, C, H, W), as save_image rounds
        self._buffer.append({"images": pixels.permute(0, 2, 3, 1).cpu().numpy(), key: conditions, "index": index})
        if self.max_png:
            png_dir = self.path / "png"
            for i in np.flatnonzero(index < self.max_png):
                png_dir.mkdir(exist_ok=True)
                if key == "prompts":  # file name: the index; the prompt rides in the PNG's text chunk
                    _save_png_with_prompt(images[i], png_dir / f"{index[i]:06d}.png", str(conditions[i]))
                    continue
                suffix = f"_{conditions[i]}" if np.issubdtype(conditions.dtype, np.integer) else ""
                save_image(images[i].float().cpu(), png_dir / f"{index[i]:06d}{suffix}.png")
        del prediction["images"]  # Lightning keeps the returned predictions: not the images
        if sum(len(b["index"]) for b in self._buffer) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        keys = [key for key in ("images", *CONDITION_KEYS, "index") if key in self._buffer[0]]
        if any(set(b) != set(keys) for b in self._buffer):
            raise ValueError("SampleWriter: a predict run mixed label and prompt conditions")
        shard = {key: np.concatenate([b[key] for b in self._buffer]) for key in keys}
        self._buffer = []
        target = self.path / f"samples_{int(shard['index'][0]):08d}.npz"
        tmp = target.with_name(target.stem + ".tmp.npz")
        np.savez(tmp, **shard)
        tmp.replace(target)  # readers never see half a shard

    @override
    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._flush()
        trainer.strategy.barrier("SampleWriter.end")  # every rank: all shards are on disk after this
        if trainer.is_global_zero:
            index = write_prediction_index(self.path)
            print(f"wrote {index['count']} samples in {len(index['shards'])} shard(s) to {self.path}")


def write_prediction_index(directory: str | Path) -> dict:
    """Check the shards of ``directory`` (every global index 0..N-1 exactly once) and write ``index.json``."""
    directory = Path(directory)
    shards, expected, image_shape, kinds = [], 0, None, set()
    for path in sorted(directory.glob("samples_*.npz")):
        if path.name.endswith(".tmp.npz"):
            continue
        with np.load(path) as data:
            index = data["index"]
            image_shape = list(data["images"].shape[1:])
            kinds.update(key for key in CONDITION_KEYS if key in data.files)
        if len(index) == 0 or not np.array_equal(index, np.arange(expected, expected + len(index))):
            raise ValueError(f"{path}: global indices {index[:3]}... do not continue from {expected}: a sample is "
                             "missing or written twice")
        shards.append({"file": path.name, "first": int(index[0]), "count": int(len(index))})
        expected += len(index)
    if len(kinds) > 1:
        raise ValueError(f"{directory}: shards mix class labels and prompts (an earlier run's shards?)")
    payload = {"count": expected, "image_shape": image_shape, "conditions": next(iter(kinds), None),
               "shards": shards}
    tmp = directory / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(directory / INDEX_FILE)
    return payload


def read_prediction_index(directory: str | Path) -> dict:
    """``index.json`` of a ``dimo predict`` folder."""
    path = Path(directory) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a finished `dimo predict` output folder")
    return json.loads(path.read_text())


def iter_prediction_shards(directory: str | Path) -> Iterator[dict[str, np.ndarray]]:
    """The shards of a ``dimo predict`` folder in global order, one at a time: ``images`` uint8 (B, H, W, C),
    the conditions (``labels`` (B,) or ``prompts`` (B,) strings) and ``index`` (B,)."""
    directory = Path(directory)
    for shard in read_prediction_index(directory)["shards"]:
        with np.load(directory / shard["file"]) as data:
            yield {key: data[key] for key in ("images", *CONDITION_KEYS, "index") if key in data.files}
