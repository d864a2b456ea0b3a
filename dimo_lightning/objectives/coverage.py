"""A coverage term on real data: the energy distance between the student's and the real data's distributions in
the frozen teacher trunk's feature space, per condition (*ours*; Soft-Di[M]O's paper publishes only the GAN).

Why: the non-saturating GAN loss scores each sample on its own, so a student that draws a few good styles per class
is not penalised for the styles it never draws (measured on MNIST: the GAN halved the stroke distance but recall
fell). The energy distance compares *sets*:

    ED(P, Q) = 2 E||f - r|| - E||f - f'|| - E||r - r'||,   f, f' ~ P (student), r, r' ~ Q (real),

which is 0 only when P = Q. Its gradient pulls each student sample towards real samples and pushes it away from the
student's other samples of the same condition: the second part is what a per-sample discriminator lacks, and what
spreads a collapsed student over the real styles. The estimator here is the unbiased one (distinct pairs only),
evaluated within each condition group (class) of the batch and averaged over the groups.

Features (``gan.coverage_space``): the trunk's hidden states at some layers on the *whole* sequences (no masking),
layer-normalised per token and flattened over the positions, each layer scaled to unit expected norm, concatenated
(:func:`trunk_features`); or the decoded images, average-pooled (:func:`pixel_features`), the student's through the
tokenizer's differentiable decode of its code probabilities. The trunk and the tokenizer are frozen; the gradient
reaches the student only through its (soft or straight-through) embeddings or probabilities.

:class:`CoverageTerm` is the term of the generator loss (docs/method.md#soft-dimo), on the generator update's draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from dimo_lightning.core.soft_embedding import soft_probabilities
from dimo_lightning.objectives.context import DrawTerm, IterationContext, StudentDraw
from dimo_lightning.objectives.gan import TeacherDiscriminator, default_head_layers, feature_trunk, trunk_in_eval


def trunk_features(trunk: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor,
                   layers: Sequence[int]) -> torch.Tensor:
    """Per-sequence features of the frozen trunk: (B, N, D) embeddings -> (B, len(layers) * N * D).

    Each layer's (B, N, D) image-position states are layer-normalised over D (no affine: norm ~sqrt(D) per token),
    flattened and divided by sqrt(N * D), so every layer contributes a vector of norm ~1 and no layer dominates.
    """
    n = embeddings.shape[1]
    hidden = trunk.forward_features(embeddings, labels, layers=tuple(layers))
    parts = [F.layer_norm(h[:, :n].float(), (h.shape[-1],)).flatten(1) / (n * h.shape[-1]) ** 0.5 for h in hidden]
    return torch.cat(parts, dim=1)


def pixel_features(images: torch.Tensor, pool: int = 1) -> torch.Tensor:
    """Per-image features of the pixel space: (B, C, H, W) -> (B, C * (H // pool) * (W // pool)).

    Average-pooled over ``pool`` x ``pool`` windows, flattened and divided by the square root of the feature count, so
    the norm is the root mean square of the pooled pixels (independent of the resolution).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    pooled = F.avg_pool2d(images.float(), pool) if pool > 1 else images.float()
    return pooled.flatten(1) / pooled[0].numel() ** 0.5


def group_ids(conditions: object, batch_size: int) -> torch.Tensor | None:
    """Group index per row: class labels (1-D integer tensor) group by value; anything else (prompts) -> None,
    one group."""
    if torch.is_tensor(conditions) and conditions.ndim == 1 and not conditions.is_floating_point():
        if conditions.shape[0] != batch_size:
            raise ValueError(f"{conditions.shape[0]} condition labels for {batch_size} rows")
        return conditions
    return None


def _distances(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances (A, B), with a finite gradient at 0 (torch.cdist's is NaN for identical rows)."""
    squared = (a * a).sum(-1)[:, None] + (b * b).sum(-1)[None, :] - 2.0 * a @ b.T
    return (squared.clamp_min(0.0) + eps).sqrt()


def conditional_energy_distance(
    fake: torch.Tensor,
    real: torch.Tensor,
    fake_groups: torch.Tensor | None = None,
    real_groups: torch.Tensor | None = None,
    real_within: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The energy distance between fake and real feature sets, within groups, averaged over the groups.

    Args:
        fake: (B, F) student features (with grad).
        real: (R, F) real features (no grad needed).
        fake_groups / real_groups: (B,) / (R,) group ids (e.g. class labels); None: one group.
        real_within: optional (C,) precomputed ``E||r - r'||`` per group id in [0, C) (a fixed real bank's, see
            :func:`within_group_distances`): then the (R, R) real distances, which the loss does not need, are not
            computed.

    Returns:
        (loss, value): ``loss`` = mean over groups of ``2 E||f - r|| - E||f - f'||`` (the part that depends on the
        student, differentiable); ``value`` = mean over groups of the full unbiased estimate (with ``- E||r - r'||``),
        detached, ~0 when the two sets come from one distribution. Groups count when they hold >= 2 fake and >= 2
        real rows; with none, both are 0 (in the graph).
    """
    if fake.ndim != 2 or real.ndim != 2 or fake.shape[1] != real.shape[1]:
        raise ValueError(f"features must be (B, F) and (R, F), got {tuple(fake.shape)} and {tuple(real.shape)}")
    if (fake_groups is None) != (real_groups is None):
        raise ValueError("give group ids for both the fake and the real rows, or for neither")
    if fake_groups is None:
        fake_groups = torch.zeros(fake.shape[0], dtype=torch.long, device=fake.device)
        real_groups = torch.zeros(real.shape[0], dtype=torch.long, device=real.device)
    real = real.detach().to(fake.dtype)
    ids = torch.cat([fake_groups, real_groups]).long()
    present, inverse = torch.unique(ids, return_inverse=True)  # present: the group id of each one_hot column
    one_hot = F.one_hot(inverse).to(fake.dtype)  # (B + R, G)
    gf, gr = one_hot[: fake.shape[0]], one_hot[fake.shape[0]:]
    nf, nr = gf.sum(0), gr.sum(0)  # (G,)

    def group_sum(d: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return ((left.T @ d) * right.T).sum(-1)  # (G,): sum of d over pairs within each group

    cross = group_sum(_distances(fake, real), gf, gr) / (nf * nr).clamp_min(1)
    # Distinct pairs only: the diagonal of the within-set matrices is ~sqrt(eps), not a distance to drop by hand.
    eye_f = torch.eye(fake.shape[0], dtype=fake.dtype, device=fake.device)
    within_fake = group_sum(_distances(fake, fake) * (1 - eye_f), gf, gf) / (nf * (nf - 1)).clamp_min(1)
    with torch.no_grad():
        if real_within is not None:
            within_real = real_within.to(fake.dtype)[present.long()]
        else:
            eye_r = torch.eye(real.shape[0], dtype=real.dtype, device=real.device)
            within_real = group_sum(_distances(real, real) * (1 - eye_r), gr, gr) / (nr * (nr - 1)).clamp_min(1)
    used = ((nf >= 2) & (nr >= 2)).to(fake.dtype)
    count = used.sum().clamp_min(1)
    loss = ((2 * cross - within_fake) * used).sum() / count
    value = ((2 * cross.detach() - within_fake.detach() - within_real) * used).sum() / count
    return loss, value


def within_group_distances(features: torch.Tensor, groups: torch.Tensor, num_groups: int,
                           chunk_size: int = 1024) -> torch.Tensor:
    """Mean distance between distinct rows of each group: (M, F), (M,) ids in [0, num_groups) -> (num_groups,)
    (0 for a group with fewer than two rows). Group by group, in chunks: never an (M, M) matrix."""
    means = torch.zeros(num_groups, dtype=torch.float64)
    for g in range(num_groups):
        rows = features[groups == g]
        if rows.shape[0] < 2:
            continue
        total = sum(float(_distances(chunk, rows).sum()) for chunk in rows.split(chunk_size))
        total -= rows.shape[0] * 1e-6  # the diagonal's sqrt(eps)
        means[g] = total / (rows.shape[0] * (rows.shape[0] - 1))
    return means.to(features.dtype)


class RealFeatureBank:
    """Coverage features (trunk or pixels) of a fixed sample of real sequences, computed once (the trunk and the
    tokenizer are frozen), so the coverage term compares each batch of the student with many real samples of its
    class instead of the batch's few.

    Memory: ``size x F`` floats (MNIST trunk layer 0: 4,000 x 49 x 128 x 4 B = 100 MB; pixels: 4,000 x 784 x 4 B =
    13 MB); for data sets far larger than the bank, the bank is a random sample (seeded).

    Args:
        features: (M, F) real features.
        labels: (M,) their class ids in [0, num_classes).
        num_classes: number of classes C.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        self.features = features
        self.labels = labels.long()
        self.within = within_group_distances(features, self.labels, num_classes)


def bank_rows(total: int, size: int, seed: int = 0) -> torch.Tensor:
    """The rows of a real bank: ``size`` of ``total`` drawn without replacement (all when size >= total), sorted."""
    if size < 1:
        raise ValueError(f"gan.coverage_bank must be >= 1 (0 turns the bank off), got {size}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:size].sort().values


class CoverageTerm(DrawTerm):
    """The coverage term of the generator loss: the energy distance, per condition group, between the features of the
    student's draw (rows not ``draw.valid`` left out) and those of the micro-batch's real codes (or of a fixed real
    bank, :meth:`build_bank`). ``loss(ctx, part, draw) -> (differentiable loss, {"coverage": full detached
    estimate})``, unweighted.

    Args:
        teacher: the frozen teacher (its network is the trunk; its tokenizer decodes for ``pixels``).
        space: ``trunk`` or ``pixels`` (needs a teacher with ``decode_soft``).
        layers: trunk layers of the features (None: ``num_layers`` evenly spaced); unused for ``pixels``.
        num_layers: see ``layers``.
        fake_input: the student's side: ``soft`` or ``straight_through`` (the sampled tokens in the forward pass).
        temperature: the soft side is ``softmax(z / temperature)``.
        pixel_pool: average-pooling window of the pixel space.
    """

    def __init__(self, teacher: Any, *, space: str = "trunk", layers: Sequence[int] | None = None,
                 num_layers: int = 3, fake_input: str = "soft", temperature: float = 1.0,
                 pixel_pool: int = 1) -> None:
        self.teacher = teacher
        self.space = space
        self.fake_input = fake_input
        self.temperature = temperature
        self.pixel_pool = pixel_pool
        self.real_bank: RealFeatureBank | None = None
        self.layers: tuple[int, ...] = ()
        if space == "pixels":
            if not callable(getattr(teacher, "decode_soft", None)):
                raise ValueError(f"gan.coverage_space pixels needs a teacher with a differentiable decode "
                                 f"(decode_soft); {type(teacher).__name__} has none: use coverage_space trunk")
        else:
            trunk = feature_trunk(teacher, "gan.coverage_weight > 0")
            self.layers = tuple(layers) if layers else default_head_layers(len(trunk.transformer.layers),
                                                                           num_layers)

    def loss(self, ctx: IterationContext, part: int,
             draw: StudentDraw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cond, trunk = ctx.conditions[part], self.teacher.network
        keep = draw.valid.bool()
        z = draw.z / self.temperature if self.temperature != 1 else draw.z
        tokens = draw.x if self.fake_input == "straight_through" else None
        groups = group_ids(cond, z.shape[0])
        fake_cond = cond[keep] if groups is not None else cond
        fake_groups = groups[keep] if groups is not None else None
        fake_tokens = tokens[keep] if tokens is not None else None
        with trunk_in_eval(trunk):
            if self.space == "pixels":
                fake_features = self.pixel_features(z[keep], fake_tokens)
            else:
                fake = TeacherDiscriminator.student_embeddings(trunk, z[keep], fake_tokens)
                fake_features = trunk_features(trunk, fake, fake_cond, self.layers)
            if self.real_bank is not None and fake_groups is not None:
                loss, value = conditional_energy_distance(fake_features, self.real_bank.features, fake_groups,
                                                          self.real_bank.labels, real_within=self.real_bank.within)
                return loss, {"coverage": value}
            real_features = self.real_features(ctx.real[part], cond)
        loss, value = conditional_energy_distance(fake_features, real_features, fake_groups, groups)
        return loss, {"coverage": value}

    def pixel_features(self, z: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """Pixel-space features of (tempered) student logits z (B, N, V): the tokenizer's differentiable decode of
        ``softmax(z[..., :K])``, or with ``tokens`` (B, N) the straight-through probabilities
        ``one_hot(tokens) + p - sg(p)``, pooled (:func:`pixel_features`)."""
        k = self.teacher.codebook_size
        probs = soft_probabilities(z, k)
        if tokens is not None:
            probs = F.one_hot(tokens.long(), k).to(probs.dtype) + probs - probs.detach()
        return pixel_features(self.teacher.decode_soft(probs), self.pixel_pool)

    @torch.no_grad()
    def real_features(self, codes: torch.Tensor, cond: Any) -> torch.Tensor:
        """Features of real codes (B, N) of conditions ``cond``, in this term's space."""
        if self.space == "pixels":
            return pixel_features(self.teacher.decode(codes.reshape(codes.shape[0], -1)), self.pixel_pool)
        trunk = self.teacher.network
        return trunk_features(trunk, TeacherDiscriminator.real_embeddings(trunk, codes), cond, self.layers)

    def build_bank(self, datamodule: Any, size: int, seed: int, device: torch.device) -> RealFeatureBank:
        """Fill :attr:`real_bank` with the features of ``size`` real sequences of the DataModule's codes, drawn with
        ``seed`` (the same bank on every rank and after a resume)."""
        if not callable(getattr(datamodule, "load", None)):
            raise ValueError("gan.coverage_bank > 0 needs a RealCodesDataModule (its codes fill the bank)")
        data = datamodule.load()
        rows = bank_rows(len(data), size, seed).numpy()
        codes = torch.as_tensor(np.asarray(data.codes[rows]))
        labels = torch.as_tensor(np.asarray(data.labels[rows])).long()
        num_classes = int(getattr(self.teacher, "num_classes", int(labels.max()) + 1))
        with trunk_in_eval(self.teacher.network):
            features = torch.cat([
                self.real_features(chunk.to(device).long(), chunk_labels.to(device))
                for chunk, chunk_labels in zip(codes.split(256), labels.split(256), strict=True)
            ])
        self.real_bank = RealFeatureBank(features, labels.to(device), num_classes)
        megabytes = features.numel() * features.element_size() / 2**20
        rank_zero_info(f"coverage bank: {len(rows)} real sequences, {megabytes:.0f} MB of features")
        return self.real_bank
