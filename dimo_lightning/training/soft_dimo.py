"""Soft-Di[M]O training settings and the host-side helpers DiMOModule uses for the GAN stage (arXiv 2509.22925).

* :class:`GANSettings`: the ``gan`` argument group of :class:`~dimo_lightning.training.module.DiMOModule` (weight 0 = off,
  the data-free default).
* :func:`split_real_batch`: a ``(labels, real codes)`` batch of
  :class:`~dimo_lightning.data.real_codes.RealCodesDataModule` -> (conditions, codes).
* :func:`student_init_state`: the student / aux / EMA weights of a trained Di[M]O checkpoint (``student_init``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from dimo_lightning.core.teacher_sampling import coerce_settings

FAKE_INPUTS = ("soft", "straight_through")
COVERAGE_SPACES = ("trunk", "pixels")


@dataclass
class GANSettings:
    """The GAN on real data of Soft-Di[M]O: ``L_gen = L_DiMO + weight * L_gan`` and a discriminator on the frozen
    teacher trunk (see :mod:`dimo_lightning.objectives.gan`).

    Args:
        weight: w_gan; 0 turns the GAN (and the need for real data) off.
        only: ablation: drop ``L_DiMO`` (the student learns from ``L_gan`` alone; the aux model still trains).
        weight_warmup_steps: ramp w_gan linearly from 0 over this many generator steps (0: full weight at once),
            so the heads learn before their gradient reaches the student.
        num_layers: heads on this many evenly spaced trunk layers (ignored when ``layers`` is given).
        layers: explicit trunk layers of the heads (0 = after the input layer, l = after block l).
        head_dim: hidden width of each head's MLP.
        mask_augment: replace a share r ~ U[0, max_mask_ratio] of the positions of every real and fake sequence by
            the mask embedding and give r to the heads (the paper's remedy against an overfitting discriminator).
        max_mask_ratio: the upper end of r.
        grad_clip: max gradient norm of the heads (0: no clipping; the norm is logged either way).
        fake_input: what the discriminator sees of the student. ``soft``: the soft embedding ``softmax(z) @ E``
            (the paper). ``straight_through``: the embedding of the student's sampled token in the forward pass,
            with the soft embedding's gradient (``E[x] + soft - sg(soft)``), so the heads cannot tell fake from
            real by softness (a spread-out softmax gives embeddings off the table's rows); the gradient still
            reaches the student only through the soft path.
        coverage_weight: weight of the coverage term (:mod:`dimo_lightning.objectives.coverage`): the energy
            distance, per class, between the student's and the batch's real sequences in the frozen trunk's
            features, added to the generator loss (0: off). Unlike ``L_gan`` it scores the set of samples, so it
            rewards the styles a mode-seeking student leaves out. Works with or without the discriminator.
        coverage_layers: trunk layers of its features (None: the heads' layers, or ``num_layers`` evenly spaced).
        coverage_bank: compare with a fixed bank of this many real sequences (their features computed once
            at fit start; all of a smaller data set) instead of the batch's real codes: many real samples per class
            each step. Memory: ``coverage_bank x len(layers) x N x D`` floats (trunk) or ``coverage_bank x C x H x W /
            coverage_pixel_pool^2`` (pixels). 0: the batch's codes.
        coverage_input: the student's embeddings it sees: ``soft`` (expected embeddings: their distances measure
            what the student's *input noise* changes) or ``straight_through`` (as ``fake_input``).
        coverage_temperature: the soft embedding it scores is ``softmax(z / T) @ E`` (the soft part of the
            straight-through form too). None: the module's ``sample_temperature``, so the term scores the
            distribution the student is sampled from at evaluation. At a low T the expected embeddings are close to
            the argmax tokens, so the only way to spread them is the input noise: the term then pays for styles
            rather than for per-token randomness (docs/notes/gan.md).
        coverage_space: where the distances are measured. ``trunk``: the frozen trunk's features at
            ``coverage_layers``. ``pixels``: the images, through the tokenizer's differentiable decode of the
            (tempered) code probabilities for the student and its plain decode for the real codes, average-pooled
            by ``coverage_pixel_pool`` (needs a teacher with ``decode_soft``). On MNIST pixels gave more recall per
            step than the trunk's token-level features, which whole-image shape barely moves.
        coverage_pixel_pool: average-pooling window of the pixel space (1: full resolution; 2 halves each side).
    """

    weight: float = 0.0
    only: bool = False
    weight_warmup_steps: int = 0
    num_layers: int = 3
    layers: list[int] | None = None
    head_dim: int = 256
    mask_augment: bool = True
    max_mask_ratio: float = 0.95
    grad_clip: float = 1.0
    fake_input: Literal["soft", "straight_through"] = "soft"
    coverage_weight: float = 0.0
    coverage_layers: list[int] | None = None
    coverage_input: Literal["soft", "straight_through"] = "soft"
    coverage_bank: int = 0
    coverage_temperature: float | None = None
    coverage_space: Literal["trunk", "pixels"] = "trunk"
    coverage_pixel_pool: int = 1

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"gan.weight must be >= 0, got {self.weight}")
        if self.only and self.weight <= 0:
            raise ValueError("gan.only drops the Di[M]O loss: it needs gan.weight > 0")
        if self.weight_warmup_steps < 0:
            raise ValueError(f"gan.weight_warmup_steps must be >= 0, got {self.weight_warmup_steps}")
        if self.num_layers < 1:
            raise ValueError(f"gan.num_layers must be >= 1, got {self.num_layers}")
        if self.head_dim < 1:
            raise ValueError(f"gan.head_dim must be >= 1, got {self.head_dim}")
        if not 0.0 <= self.max_mask_ratio <= 1.0:
            raise ValueError(f"gan.max_mask_ratio must lie in [0, 1], got {self.max_mask_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"gan.grad_clip must be >= 0, got {self.grad_clip}")
        if self.fake_input not in FAKE_INPUTS:
            raise ValueError(f"gan.fake_input must be one of {', '.join(FAKE_INPUTS)}, got {self.fake_input!r}")
        if self.coverage_weight < 0:
            raise ValueError(f"gan.coverage_weight must be >= 0, got {self.coverage_weight}")
        if self.coverage_bank < 0:
            raise ValueError(f"gan.coverage_bank must be >= 0 (0: the batch's real codes), got {self.coverage_bank}")
        if self.coverage_temperature is not None and not self.coverage_temperature > 0:
            raise ValueError(f"gan.coverage_temperature must be > 0 (or null: the sample_temperature), got "
                             f"{self.coverage_temperature}")
        if self.coverage_space not in COVERAGE_SPACES:
            raise ValueError(
                f"gan.coverage_space must be one of {', '.join(COVERAGE_SPACES)}, got {self.coverage_space!r}")
        if self.coverage_pixel_pool < 1:
            raise ValueError(f"gan.coverage_pixel_pool must be >= 1, got {self.coverage_pixel_pool}")
        if self.coverage_input not in FAKE_INPUTS:
            raise ValueError(
                f"gan.coverage_input must be one of {', '.join(FAKE_INPUTS)}, got {self.coverage_input!r}")

    @property
    def enabled(self) -> bool:
        """The discriminator (and its optimizer) exist."""
        return self.weight > 0

    @property
    def needs_real_data(self) -> bool:
        """Batches must carry real codes: the discriminator or the coverage term is on."""
        return self.weight > 0 or self.coverage_weight > 0

    def weight_at(self, generator_step: int) -> float:
        """w_gan at ``generator_step`` (the linear warm-up, then ``weight``)."""
        if self.weight_warmup_steps <= 0:
            return self.weight
        return self.weight * min(1.0, (generator_step + 1) / self.weight_warmup_steps)

    @classmethod
    def coerce(cls, value: GANSettings | Mapping[str, Any] | None) -> GANSettings:
        """Accept the dataclass, a plain dict (a checkpoint's hyperparameters) or None (off)."""
        return coerce_settings(cls, value, "gan")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_real_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """``(labels (B,), codes (B, N))`` from RealCodesDataModule -> (labels, codes); any other batch -> (batch, None).

    A batch counts as real-code batch when it is a pair whose second element is a 2-D integer tensor (so a pair of
    prompts, or a label tensor, is left alone).
    """
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        codes = batch[1]
        if torch.is_tensor(codes) and codes.ndim == 2 and not codes.is_floating_point() and codes.dtype != torch.bool:
            return batch[0], codes
    return batch, None


def student_init_state(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any] | None]:
    """The networks of a Di[M]O checkpoint: ``({"student": sd, "aux": sd or absent, "student_ema": sd or absent},
    its recorded teacher)``.

    Raises:
        FileNotFoundError / ValueError naming the file (and the ``student_init`` flag).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"student_init: checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a file that is no checkpoint
        raise ValueError(f"student_init: {path} is not a readable Lightning checkpoint ({err})") from err
    state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"student_init: {path} has no state_dict (a DiMOModule Lightning checkpoint is expected)")
    networks: dict[str, dict[str, torch.Tensor]] = {}
    for name in ("student", "aux", "student_ema"):
        prefix = name + "."
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if weights:
            networks[name] = weights
    if "student" not in networks:
        raise ValueError(f"student_init: {path} holds no student.* weights (not a DiMOModule checkpoint)")
    teacher = (checkpoint.get("hyper_parameters") or {}).get("teacher")
    return networks, teacher


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
