"""TextCondition and the condition helpers shared by label tensors and text conditions."""

from __future__ import annotations

import pytest
import torch

from dimo_lightning.core.conditions import (
    TextCondition,
    condition_batch_size,
    move_condition,
    repeat_condition,
    split_condition,
)


def make(b=4, length=3, dim=5, pooled=6, mask=True, micro=True, offset=0.0):
    rows = torch.arange(b, dtype=torch.float32)[:, None] + offset  # row i is recognisable by its value i
    return TextCondition(
        hidden_states=rows[:, :, None].expand(b, length, dim).clone(),
        pooled=rows.expand(b, pooled).clone(),
        attention_mask=(torch.arange(length)[None] <= torch.arange(b)[:, None] % length) if mask else None,
        micro_conds=rows.expand(b, 5).clone() if micro else None,
    )


def row_ids(cond: TextCondition) -> list[float]:
    return cond.pooled[:, 0].tolist()


def test_batch_size_split_select_repeat_cat():
    cond = make()
    assert cond.batch_size == condition_batch_size(cond) == 4
    parts = cond.split(2)
    assert [row_ids(p) for p in parts] == [[0, 1], [2, 3]]
    assert all(p.hidden_states.shape == (2, 3, 5) and p.attention_mask.shape == (2, 3) for p in parts)
    assert row_ids(TextCondition.cat(parts)) == [0, 1, 2, 3]
    assert torch.equal(TextCondition.cat(parts).attention_mask, cond.attention_mask)
    assert row_ids(cond.repeat(2)) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert cond.repeat(2).micro_conds.shape == (8, 5)
    assert row_ids(cond.select([3, 1])) == [3, 1]
    assert row_ids(cond.select(torch.tensor([True, False, False, True]))) == [0, 3]
    assert torch.equal(cond.select(slice(1, 3)).hidden_states, cond.hidden_states[1:3])
    bare = make(mask=False, micro=False)
    assert bare.split(4)[2].attention_mask is None and bare.repeat(3).micro_conds is None
    with pytest.raises(ValueError, match="not divisible by accumulate_micro_batches=3"):
        cond.split(3)
    with pytest.raises(ValueError, match="set on some conditions"):
        TextCondition.cat([cond, bare])


def test_where_swaps_in_broadcast_rows_and_to_moves_and_casts():
    cond = make()
    null = make(b=1, offset=100.0)
    swapped = cond.where(torch.tensor([False, True, False, True]), null)
    assert row_ids(swapped) == [0, 100, 2, 100]
    assert torch.equal(swapped.attention_mask[1], null.attention_mask[0])
    assert torch.equal(swapped.hidden_states[2], cond.hidden_states[2])
    with pytest.raises(ValueError, match="same optional fields"):
        cond.where(torch.ones(4, dtype=torch.bool), make(b=1, mask=False))
    half = cond.to("cpu", dtype=torch.float16)
    assert half.pooled.dtype == torch.float16 and half.attention_mask.dtype == torch.bool
    assert move_condition(cond, "meta").hidden_states.device.type == "meta"


def test_shape_validation_names_the_field():
    with pytest.raises(ValueError, match="hidden_states must be"):
        TextCondition(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="pooled must be"):
        TextCondition(torch.zeros(2, 3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="attention_mask must be"):
        TextCondition(torch.zeros(2, 3, 4), torch.zeros(2, 4), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="micro_conds must be"):
        TextCondition(torch.zeros(2, 3, 4), torch.zeros(2, 4), micro_conds=torch.ones(5))


def test_helpers_treat_label_tensors_and_text_conditions_alike():
    labels = torch.arange(6)
    assert condition_batch_size(labels) == 6
    assert [p.tolist() for p in split_condition(labels, 3)] == [[0, 1], [2, 3], [4, 5]]
    assert repeat_condition(labels, 2).tolist() == [0, 1, 2, 3, 4, 5] * 2
    assert move_condition(labels, "meta").device.type == "meta"
    assert [row_ids(p) for p in split_condition(make(), 4)] == [[0], [1], [2], [3]]
    assert row_ids(repeat_condition(make(b=2), 2)) == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="not divisible by accumulate_micro_batches=4"):
        split_condition(labels, 4)
    with pytest.raises(TypeError, match="unsupported condition type"):
        condition_batch_size(["a prompt"])
    assert move_condition(["a prompt"], "cpu") == ["a prompt"]
