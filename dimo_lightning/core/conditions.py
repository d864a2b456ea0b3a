"""Conditions as one object: class labels (a tensor), text conditions (:class:`TextCondition`) or the prompt
prefixes of sequence teachers (:class:`PrefixCondition`).

The module and the callbacks never look inside a condition: they only ask for its batch size, split it into
micro-batches, repeat it for batched CFG, select rows and move it to a device, so that a new kind of condition
needs no change there. The helpers at the bottom do that for a label tensor and for any object with the
:class:`TextCondition` methods (:class:`PrefixCondition` among them) alike.
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


@dataclass(frozen=True)
class PrefixCondition:
    """A batch of prompt prefixes for a sequence (text) teacher: tokens at fixed positions that neither the student nor
    the teacher ever change.

    Attributes:
        tokens: (B, L) long, the prompt tokens at the fixed positions (the mask id elsewhere, by convention; only the
            entries where ``fixed`` is True are read).
        fixed: (B, L) bool, the positions that hold a prompt token. All False: an unconditional row.
    """

    tokens: torch.Tensor
    fixed: torch.Tensor

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2:
            raise ValueError(f"PrefixCondition.tokens must be (B, L), got {list(self.tokens.shape)}")
        if self.fixed.shape != self.tokens.shape:
            raise ValueError(f"PrefixCondition.fixed must have the shape of tokens {list(self.tokens.shape)}, got "
                             f"{list(self.fixed.shape)}")
        if self.tokens.is_floating_point() or self.tokens.is_complex() or self.tokens.dtype == torch.bool:
            raise ValueError(f"PrefixCondition.tokens must hold integer ids, got {self.tokens.dtype}")
        if self.fixed.dtype != torch.bool:
            raise ValueError(f"PrefixCondition.fixed must be a bool tensor, got {self.fixed.dtype}")

    @staticmethod
    def unconditional(batch_size: int, seq_len: int, mask_id: int,
                      device: torch.device | str | None = None) -> PrefixCondition:
        """B rows without a prompt: every position is generated."""
        return PrefixCondition(
            tokens=torch.full((batch_size, seq_len), mask_id, dtype=torch.long, device=device),
            fixed=torch.zeros(batch_size, seq_len, dtype=torch.bool, device=device),
        )

    def _map(self, fn) -> PrefixCondition:
        return PrefixCondition(tokens=fn(self.tokens), fixed=fn(self.fixed))

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PrefixCondition:
        """Move both tensors to ``device``; ``dtype`` is accepted for symmetry with :class:`TextCondition` and
        ignored (ids and flags have no floating-point field to cast)."""
        return self._map(lambda t: t.to(device=device))

    def select(self, index: torch.Tensor | slice | Sequence[int]) -> PrefixCondition:
        """Rows ``index`` (a slice, integer indices or a (B,) bool mask)."""
        if isinstance(index, Sequence):
            index = torch.as_tensor(index, dtype=torch.long)
        if isinstance(index, torch.Tensor):
            index = index.to(self.device)
        return self._map(lambda t: t[index])

    def split(self, parts: int) -> list[PrefixCondition]:
        """``parts`` equal consecutive micro-batches (the batch size must be divisible by ``parts``)."""
        size = _micro_batch_size(self.batch_size, parts)
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(parts)]

    def repeat(self, repeats: int) -> PrefixCondition:
        """The batch concatenated ``repeats`` times along the batch axis (for one batched CFG pass)."""
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        return self._map(lambda t: t.repeat(repeats, 1))

    def where(self, replace_rows: torch.Tensor, other: PrefixCondition) -> PrefixCondition:
        """Rows where ``replace_rows`` (B,) is True taken from ``other`` (batch B, or 1 to broadcast); the others
        kept. Both must have the same length L."""
        if other.seq_len != self.seq_len:
            raise ValueError(f"PrefixCondition.where: lengths {self.seq_len} and {other.seq_len} differ")
        rows = replace_rows.to(self.device, torch.bool)[:, None]
        return PrefixCondition(tokens=torch.where(rows, other.tokens.to(self.tokens), self.tokens),
                               fixed=torch.where(rows, other.fixed.to(self.device), self.fixed))

    @staticmethod
    def cat(conditions: Sequence[PrefixCondition]) -> PrefixCondition:
        """Concatenate along the batch axis (all of the same length L)."""
        if not conditions:
            raise ValueError("PrefixCondition.cat needs at least one condition")
        lengths = sorted({c.seq_len for c in conditions})
        if len(lengths) > 1:
            raise ValueError(f"PrefixCondition.cat: the conditions have different lengths {lengths}")
        return PrefixCondition(tokens=torch.cat([c.tokens for c in conditions]),
                               fixed=torch.cat([c.fixed for c in conditions]))


def _micro_batch_size(batch_size: int, parts: int) -> int:
    if parts < 1:
        raise ValueError(f"accumulate_micro_batches must be >= 1, got {parts}")
    if batch_size % parts:
        raise ValueError(f"batch size {batch_size} is not divisible by accumulate_micro_batches={parts}")
    return batch_size // parts


def condition_batch_size(cond: Any) -> int:
    """Number of samples of a condition batch (a label tensor, a :class:`TextCondition` or a
    :class:`PrefixCondition`)."""
    if isinstance(cond, torch.Tensor):
        return cond.shape[0]
    if hasattr(cond, "batch_size"):
        return int(cond.batch_size)
    raise TypeError(f"unsupported condition type {type(cond).__name__}: expected a tensor, a TextCondition or a "
                    "PrefixCondition")


def split_condition(cond: Any, parts: int) -> list[Any]:
    """Split a condition batch into ``parts`` equal micro-batches (ValueError when not divisible)."""
    if isinstance(cond, torch.Tensor):
        _micro_batch_size(cond.shape[0], parts)
        return list(cond.chunk(parts))
    if hasattr(cond, "split"):
        return cond.split(parts)
    raise TypeError(f"unsupported condition type {type(cond).__name__}: expected a tensor, a TextCondition or a "
                    "PrefixCondition")


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
    raise TypeError(f"unsupported condition type {type(cond).__name__}: expected a tensor, a TextCondition or a "
                    "PrefixCondition")
