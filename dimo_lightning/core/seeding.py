"""One seed-derivation rule for every random stream of a run (training iterations, evaluation batches, data).

A stream is named by its base seed and up to three integers (rank, step, salt). Distinct names give unrelated
streams, and the same name gives the same stream on any machine, so ranks differ, resumed runs repeat an
uninterrupted one, and evaluation samples do not depend on the number of ranks.
"""

from __future__ import annotations

import torch

SEED_MODULUS = 2**63 - 1  # torch.Generator takes seeds below 2**64; this keeps them positive int64
SAMPLE_SEED_MODULUS = 2**62  # the modulus of evaluation and prediction streams


def derive_seed(base: int, rank: int = 0, step: int = 0, salt: int = 0, modulus: int = SEED_MODULUS) -> int:
    """The seed of stream (base, rank, step, salt): ``(base * 1_000_003 + rank * 7_919 + step * 104_729 + salt)
    mod modulus`` (three primes, so small names never collide)."""
    return (int(base) * 1_000_003 + int(rank) * 7_919 + int(step) * 104_729 + int(salt)) % modulus


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(seed)
