"""Mask schedules, exact-count masking, the hybrid initial sequence and sigma schedules."""

import math

import pytest
import torch

from dimo_lightning.core.masking import (
    hybrid_initial_sequence,
    mask_ratio,
    mask_tokens,
    sample_mask_ratio,
    sigma_at,
)


def test_schedule_values():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(mask_ratio(u, "linear"), u)
    torch.testing.assert_close(mask_ratio(u, "square"), u**2)
    torch.testing.assert_close(mask_ratio(u, "cosine"), torch.cos(math.pi * u / 2))
    torch.testing.assert_close(
        mask_ratio(u, "arccos"), torch.tensor([1.0, math.acos(0.25) * 2 / math.pi, 2 / 3, 0.0])
    )
    mage = mask_ratio(torch.zeros(20000), "mage", generator=torch.Generator().manual_seed(0))
    assert 0.5 <= float(mage.min()) and float(mage.max()) <= 1.0
    # mean of N(0.55, 0.25) truncated to [0.5, 1]: 0.55 + 0.25 * (phi(a) - phi(b)) / (Phi(b) - Phi(a))
    a, b = (0.5 - 0.55) / 0.25, (1.0 - 0.55) / 0.25
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    big_phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    expected = 0.55 + 0.25 * (phi(a) - phi(b)) / (big_phi(b) - big_phi(a))
    assert float(mage.mean()) == pytest.approx(expected, abs=0.005)
    with pytest.raises(ValueError, match="unknown mask schedule"):
        mask_ratio(u, "cubic")


@pytest.mark.parametrize("ratio", [0.0, 0.001, 0.3, 0.5, 0.99, 1.0])
def test_mask_tokens_exact_counts(ratio):
    codes = torch.randint(0, 10, (16, 49))
    masked, mask = mask_tokens(codes, ratio, mask_id=99, generator=torch.Generator().manual_seed(1))
    expected = max(1, round(49 * ratio))
    assert mask.sum(1).tolist() == [expected] * 16
    assert torch.equal(masked[mask], torch.full((expected * 16,), 99))
    assert torch.equal(masked[~mask], codes[~mask])


def test_mask_tokens_per_row_ratio_and_distinct_positions():
    codes = torch.zeros(3, 10, dtype=torch.long)
    ratio = torch.tensor([0.1, 0.5, 0.9])
    _, mask = mask_tokens(codes, ratio, 5, generator=torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [1, 5, 9]
    _, m2 = mask_tokens(torch.zeros(64, 10, dtype=torch.long), 0.5, 5, generator=torch.Generator().manual_seed(0))
    assert len({tuple(r.tolist()) for r in m2}) > 30  # positions differ between rows


def test_hybrid_initial_sequence():
    x = hybrid_initial_sequence(32, 256, 1024, 0.6, 1024, generator=torch.Generator().manual_seed(0))
    assert x.shape == (32, 256)
    assert (x == 1024).sum(1).tolist() == [154] * 32  # round(256 * 0.6)
    assert int(x[x != 1024].max()) < 1024
    with pytest.raises(ValueError, match="r_init"):
        hybrid_initial_sequence(1, 4, 4, 1.5, 4)


def test_sample_mask_ratio_is_seeded_and_clamped():
    a = sample_mask_ratio(8, "arccos", torch.Generator().manual_seed(3))
    b = sample_mask_ratio(8, "arccos", torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    c = sample_mask_ratio(1000, "linear", torch.Generator().manual_seed(3), clamp=(0.02, 0.98))
    assert float(c.min()) >= 0.02 - 1e-6 and float(c.max()) <= 0.98 + 1e-6


def test_sigma_schedules():
    assert sigma_at(5, 0.1) == 0.1
    assert sigma_at(50, 0.4, "linear", 100) == pytest.approx(0.2)
    assert sigma_at(500, 0.4, "linear", 100) == pytest.approx(0.4)
    assert sigma_at(100, 1.0, "exp", 100) == pytest.approx(1 - math.exp(-1))
    assert sigma_at(50, 1.0, "cos", 100) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="sigma schedule"):
        sigma_at(0, 0.1, "step", 10)
