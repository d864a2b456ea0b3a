"""Checks that configuration pieces built separately agree (data vs teacher, checkpoint vs teacher).

The DataModule's number of classes comes from a YAML key while the teacher's comes from its weights file, so no
parse-time link can tie them; they are compared when fit starts, and the error names both flags.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def check_data_matches_module(module: Any, datamodule: Any) -> None:
    """Raise ``ValueError`` if the DataModule disagrees with the teacher or with ``optim.accumulate_micro_batches``.

    Args:
        module: a DiMOModule (``teacher``, ``settings.optim.accumulate_micro_batches``).
        datamodule: the trainer's DataModule, or None (plain dataloaders: nothing to compare).
    """
    if datamodule is None:
        return
    teacher = module.teacher
    data_classes = getattr(datamodule, "num_classes", None)
    teacher_classes = getattr(teacher, "num_classes", None)
    if data_classes is not None and teacher_classes is not None and int(data_classes) != int(teacher_classes):
        raise ValueError(
            f"--data.init_args.num_classes={data_classes} does not match the teacher's {teacher_classes} classes "
            f"(--model.init_args.teacher: {type(teacher).__name__}); set them equal"
        )
    batch_size = getattr(datamodule, "batch_size", None)
    parts = int(module.settings.optim.accumulate_micro_batches)
    if isinstance(batch_size, int) and batch_size % parts:
        raise ValueError(
            f"--data.init_args.batch_size={batch_size} is not divisible by "
            f"--model.init_args.optim.accumulate_micro_batches={parts}"
        )


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # tuples -> lists, so YAML- and Python-made records compare


def check_teacher_unchanged(saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None, source: str,
                            allow_change: bool) -> None:
    """Raise ``ValueError`` if the teacher recorded in a checkpoint differs from the current one.

    Args:
        saved: the checkpoint's teacher record (``class_path``, ``init_args``); None for old checkpoints (no check).
        current: the record of the teacher the module was built with.
        source: the checkpoint (named in the error).
        allow_change: the override (``--model.init_args.run.allow_teacher_change=true``).
    """
    if allow_change or not isinstance(saved, Mapping) or not isinstance(current, Mapping):
        return
    if _plain(saved) != _plain(current):
        raise ValueError(
            f"the checkpoint {source} was trained against the teacher {_describe(saved)}, but this run uses "
            f"{_describe(current)}; resume with the same teacher, or pass "
            "--model.init_args.run.allow_teacher_change=true"
        )


def _describe(record: Mapping[str, Any]) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in (record.get("init_args") or {}).items())
    return f"{record.get('class_path')}({args})"


def check_real_data_matches_teacher(datamodule: Any, teacher: Any) -> None:
    """Raise ``ValueError`` (naming the flag) if a real-codes DataModule was set up for another vocabulary or grid
    than the teacher's: its file checks use its own ``codebook_size`` / ``grid_size``, which must be the teacher's.
    """
    if datamodule is None:
        return
    checks = (
        ("codebook_size", getattr(datamodule, "codebook_size", None), getattr(teacher, "codebook_size", None)),
        ("grid_size", getattr(datamodule, "grid_shape", None), getattr(teacher, "grid_shape", None)),
    )
    for flag, data_value, teacher_value in checks:
        if data_value is None or teacher_value is None:
            continue
        plain = [tuple(v) if isinstance(v, (list, tuple)) else v for v in (data_value, teacher_value)]
        if plain[0] != plain[1]:
            raise ValueError(f"--data.init_args.{flag}={data_value} does not match the teacher's {teacher_value} "
                             f"(the real codes must come from the teacher's tokenizer)")
