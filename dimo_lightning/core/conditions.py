"""Conditions as one object: class labels (a tensor) or text conditions (:class:`TextCondition`).

The module and the callbacks never look inside a condition: they only ask for its batch size, split it into
micro-batches, repeat it for batched CFG, select rows and move it to a device, so that a new kind of condition
needs no change there. The helpers at the bottom do that for a label tensor and for any object with the
:class:`TextCondition` methods alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch


@dataclass(frozen=True)
class TextCondition:
    """A batch of encoded prompts.

    Attributes:
        hidden_states: (B, L, D) per-token text states (CLIP penultimate layer for Meissonic).
        pooled: (B, Dp) pooled text embedding.
        attention_mask: optional (B, L) bool/int mask of real (non-padding) tokens.
        micro_conds: optional (B, 5) micro-conditions (orig width, orig height, crop top, crop left, aesthetic).
    """

    hidden_states: torch.Tensor
    pooled: torch.Tensor
    attention_mask: torch.Tensor | None = None
    micro_conds: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.hidden_states.ndim != 3:
            raise ValueError(f"TextCondition.hidden_states must be (B, L, D), got {list(self.hidden_states.shape)}")
        b, length = self.hidden_states.shape[:2]
        if self.pooled.ndim != 2 or self.pooled.shape[0] != b:
            raise ValueError(f"TextCondition.pooled must be (B={b}, Dp), got {list(self.pooled.shape)}")
        if self.attention_mask is not None and tuple(self.attention_mask.shape) != (b, length):
            raise ValueError(
                f"TextCondition.attention_mask must be (B={b}, L={length}), got {list(self.attention_mask.shape)}"
            )
        if self.micro_conds is not None and (self.micro_conds.ndim != 2 or self.micro_conds.shape[0] != b):
            raise ValueError(f"TextCondition.micro_conds must be (B={b}, 5), got {list(self.micro_conds.shape)}")

    def _map(self, fn) -> TextCondition:
        """Apply ``fn`` to every tensor field (None stays None)."""
        return replace(self, **{f.name: None if (v := getattr(self, f.name)) is None else fn(v) for f in fields(self)})

    @property
    def batch_size(self) -> int:
        return self.hidden_states.shape[0]

    @property
    def device(self) -> torch.device:
        return self.hidden_states.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextCondition:
        """Move every tensor to ``device``; ``dtype`` casts the floating-point fields only (not the mask)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        return self._map(move)

    def select(self, index: torch.Tensor | slice | Sequence[int]) -> TextCondition:
        """Rows ``index`` (a slice, integer indices or a (B,) bool mask) of every field."""
        if isinstance(index, Sequence):
            index = torch.as_tensor(index, dtype=torch.long)
        if isinstance(index, torch.Tensor):
            index = index.to(self.device)
        return self._map(lambda t: t[index])

    def split(self, parts: int) -> list[TextCondition]:
        """``parts`` equal consecutive micro-batches (the batch size must be divisible by ``parts``)."""
        size = _micro_batch_size(self.batch_size, parts)
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(parts)]

    def repeat(self, repeats: int) -> TextCondition:
        """The batch concatenated ``repeats`` times along the batch axis (for one batched CFG pass)."""
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        return self._map(lambda t: t.repeat(repeats, *([1] * (t.ndim - 1))))

    def where(self, replace_rows: torch.Tensor, other: TextCondition) -> TextCondition:
        """Rows where ``replace_rows`` (B,) is True taken from ``other`` (batch B, or 1 to broadcast, e.g. the cached
        null-prompt embedding); the others kept. Both must have the same fields set and the same widths."""
        if (self.attention_mask is None) != (other.attention_mask is None) or (self.micro_conds is None) != (
            other.micro_conds is None
        ):
            raise ValueError("TextCondition.where: both conditions must set the same optional fields")
        mask = replace_rows.to(self.device, torch.bool)
        out = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine is None:
                out[f.name] = None
                continue
            if mine.shape[1:] != theirs.shape[1:]:
                raise ValueError(
                    f"TextCondition.where: {f.name} shapes {list(mine.shape)} and {list(theirs.shape)} differ"
                )
            out[f.name] = torch.where(mask.view(-1, *([1] * (mine.ndim - 1))), theirs.to(mine), mine)
        return TextCondition(**out)

    @staticmethod
    def cat(conditions: Sequence[TextCondition]) -> TextCondition:
        """Concatenate along the batch axis (all must set the same optional fields)."""
        if not conditions:
            raise ValueError("TextCondition.cat needs at least one condition")
        out = {}
        for f in fields(TextCondition):
            values = [getattr(c, f.name) for c in conditions]
            if all(v is None for v in values):
                out[f.name] = None
            elif any(v is None for v in values):
                raise ValueError(f"TextCondition.cat: {f.name} is set on some conditions but not on others")
            else:
                out[f.name] = torch.cat(values)
        return TextCondition(**out)


def _micro_batch_size(batch_size: int, parts: int) -> int:
    if parts < 1:
        raise ValueError(f"accumulate_micro_batches must be >= 1, got {parts}")
    if batch_size % parts:
        raise ValueError(f"batch size {batch_size} is not divisible by accumulate_micro_batches={parts}")
    return batch_size // parts


def condition_batch_size(cond: Any) -> int:
    """Number of samples of a condition batch (a label tensor or a :class:`TextCondition`-like object)."""
    if isinstance(cond, torch.Tensor):
        return cond.shape[0]
    if hasattr(cond, "batch_size"):
        return int(cond.batch_size)
    raise TypeError(f"unsupported condition type {type(cond).__name__}: expected a tensor or a TextCondition")


def split_condition(cond: Any, parts: int) -> list[Any]:
    """Split a condition batch into ``parts`` equal micro-batches (ValueError when not divisible)."""
    if isinstance(cond, torch.Tensor):
        _micro_batch_size(cond.shape[0], parts)
        return list(cond.chunk(parts))
    if hasattr(cond, "split"):
        return cond.split(parts)
    raise TypeError(f"unsupported condition type {type(cond).__name__}: expected a tensor or a TextCondition")


def move_condition(cond: Any, device: torch.device | str) -> Any:
    """A condition batch on ``device`` (tensors and objects with ``to(device)``; anything else is returned as is,
    e.g. a list of prompt strings that the teacher has not encoded yet)."""
    if isinstance(cond, torch.Tensor) or hasattr(cond, "to"):
        return cond.to(device)
    return cond


def repeat_condition(cond: Any, repeats: int) -> Any:
    """A condition batch concatenated ``repeats`` times along the batch axis."""
    if isinstance(cond, torch.Tensor):
        return cond.repeat(repeats, *([1] * (cond.ndim - 1)))
    if hasattr(cond, "repeat"):
        return cond.repeat(repeats)
    raise TypeError(f"unsupported condition type {type(cond).__name__}: expected a tensor or a TextCondition")
