"""TextSampleWriter: ``dimo predict`` output of a text student (or teacher) streamed to disk as JSON Lines shards.

Layout of an output folder (``<run dir>/predictions`` or ``output_dir``):

- ``texts_XXXXXXXX.jsonl`` (the global index of its first sample), one per rank and ``shard_size`` samples: one
  ``{"index": i, "prompt": "...", "text": "..."}`` object per line (UTF-8), in global order within the shard;
  ``prompt`` is the prompt string ("" for unconditional text) and ``text`` the generated completion, special tokens
  kept (the decoding the teacher's samples and the text metrics use);
- ``index.json`` (written last, by rank zero, after every index was checked to be there exactly once): ``count``,
  ``format`` ``"jsonl"``, ``conditions`` (``prompts`` or ``unconditional``) and the shards in global order.

The predictions are what ``DiMOModule.predict_step`` returns for a sequence teacher: ``codes`` (B, L), the raw
conditions (``labels``) and ``index`` (B,); the writer re-encodes the conditions with the teacher
(``encode_condition``, cheap) and decodes with its ``split_text``. Predictions that already carry ``texts`` (B
completions) are written as they are.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from dimo_lightning.core.conditions import move_condition
from dimo_lightning.core.run_directory import run_directory
from dimo_lightning.inference.prediction_writer import INDEX_FILE

SHARD_PATTERN = "texts_*.jsonl"


def prediction_texts(teacher: Any, prediction: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(prompts, completions) of one predict batch (see the module docstring)."""
    conditions = prediction.get("labels")
    raw_prompts = list(conditions) if isinstance(conditions, (list, tuple)) and all(
        isinstance(c, str) for c in conditions) else None
    if "texts" in prediction:
        completions = [str(t) for t in prediction["texts"]]
        prompts = raw_prompts or [str(p) for p in prediction.get("prompts", [""] * len(completions))]
        return prompts, completions
    codes = prediction.get("codes")
    if codes is None:
        raise ValueError("TextSampleWriter needs predictions with 'codes' (B, L) or 'texts': predict_step of a "
                         "sequence teacher returns its token rows (an image writer, SampleWriter, takes 'images')")
    cond = move_condition(teacher.encode_condition(conditions), codes.device)
    pairs = teacher.split_text(teacher.fix_positions(codes, cond), cond)
    completions = [c for _, c in pairs]
    return raw_prompts or [p for p, _ in pairs], completions


class TextSampleWriter(BasePredictionWriter):
    """Writes each rank's text predictions as they come: a JSON Lines shard every ``shard_size`` samples, so memory
    holds one shard per rank. After a barrier on every rank, rank zero checks that every global index was written
    exactly once and writes ``index.json``. The token rows are dropped from the predictions Lightning keeps.

    Args:
        output_dir: where to write (None: ``predictions`` in the run's log directory).
        shard_size: samples per shard file and rank.
    """

    def __init__(self, output_dir: str | None = None, shard_size: int = 1000) -> None:
        super().__init__(write_interval="batch")
        if shard_size < 1:
            raise ValueError(f"TextSampleWriter: shard_size must be >= 1, got {shard_size}")
        self.output_dir = output_dir
        self.shard_size = shard_size
        self.path: Path | None = None
        self._buffer: list[dict[str, Any]] = []

    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        teacher = getattr(pl_module, "teacher", None)
        modality = getattr(teacher, "modality", "image")
        if stage == "predict" and teacher is not None and modality != "text":
            raise ValueError(f"TextSampleWriter writes the texts of a sequence teacher's student; "
                             f"{type(pl_module.teacher).__name__} has modality {modality!r}: use SampleWriter")

    @override
    def on_predict_start(self, trainer, pl_module) -> None:
        # every rank: log_dir and barrier are collectives
        self.path = Path(self.output_dir) if self.output_dir else run_directory(trainer) / "predictions"
        if trainer.is_global_zero:
            self.path.mkdir(parents=True, exist_ok=True)
            for stale in [*self.path.glob(SHARD_PATTERN), self.path / INDEX_FILE]:
                stale.unlink(missing_ok=True)  # an earlier run's shards would end up in this run's index
        trainer.strategy.barrier("TextSampleWriter.start")
        self._buffer = []

    @override
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        index = prediction.get("index")
        if index is None:
            if not batch_indices:
                raise ValueError("TextSampleWriter needs global sample indices: predict_step must return 'index'")
            index = torch.as_tensor(batch_indices)
        index = [int(i) for i in torch.as_tensor(index).detach().cpu().reshape(-1).tolist()]
        if index:  # an empty index is a padding batch (equal step counts on every rank): nothing to write
            prompts, texts = prediction_texts(pl_module.teacher, prediction)
            if not len(prompts) == len(texts) == len(index):
                raise ValueError(f"TextSampleWriter: {len(texts)} texts and {len(prompts)} prompts for {len(index)} "
                                 "samples")
            self._buffer += [{"index": i, "prompt": p, "text": t} for i, p, t in zip(index, prompts, texts)]
        prediction.pop("codes", None)  # Lightning keeps the returned predictions: not the token rows
        if len(self._buffer) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        records, self._buffer = self._buffer, []
        target = self.path / f"texts_{records[0]['index']:08d}.jsonl"
        tmp = target.with_name(target.stem + ".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        tmp.replace(target)  # readers never see half a shard

    @override
    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._flush()
        trainer.strategy.barrier("TextSampleWriter.end")  # every rank: all shards are on disk after this
        if trainer.is_global_zero:
            index = write_text_prediction_index(self.path)
            print(f"wrote {index['count']} texts in {len(index['shards'])} shard(s) to {self.path}")


def _read_shard(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not {"index", "prompt", "text"} <= set(record):
                raise ValueError(f'{path}:{number}: expected an object with "index", "prompt" and "text"')
            records.append(record)
    return records


def write_text_prediction_index(directory: str | Path) -> dict[str, Any]:
    """Check the shards of ``directory`` (every global index 0..N-1 exactly once, in order) and write
    ``index.json``."""
    directory = Path(directory)
    shards, expected, prompted = [], 0, False
    for path in sorted(directory.glob(SHARD_PATTERN)):
        records = _read_shard(path)
        index = [r["index"] for r in records]
        if not index or index != list(range(expected, expected + len(index))):
            raise ValueError(f"{path}: global indices {index[:3]}... do not continue from {expected}: a sample is "
                             "missing or written twice")
        prompted = prompted or any(r["prompt"] for r in records)
        shards.append({"file": path.name, "first": index[0], "count": len(index)})
        expected += len(index)
    payload = {"count": expected, "format": "jsonl", "conditions": "prompts" if prompted else "unconditional",
               "shards": shards}
    tmp = directory / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(directory / INDEX_FILE)
    return payload


def iter_text_predictions(directory: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a text ``dimo predict`` folder in global order (``index.json``'s shards)."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} not found: not a finished `dimo predict` output folder")
    for shard in json.loads(index_path.read_text())["shards"]:
        yield from _read_shard(directory / shard["file"])


def read_texts(directory: str | Path) -> Sequence[str]:
    """The generated texts of a text ``dimo predict`` folder, in global order."""
    return [record["text"] for record in iter_text_predictions(directory)]
