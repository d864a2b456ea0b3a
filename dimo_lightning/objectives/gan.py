"""The Soft-Di[M]O discriminator and GAN losses (arXiv 2509.22925), as tensors-in / losses-out pieces.

Design (choices the paper leaves open are marked *ours*):

* **Trunk**: the frozen teacher network (a :class:`~dimo_lightning.nn.transformer.MaskTransformer`), run on embedding
  sequences through :meth:`~dimo_lightning.nn.transformer.MaskTransformer.forward_features`. It is *not* a submodule of
  :class:`TeacherDiscriminator`: the caller passes it in, so the teacher's weights never enter the discriminator's
  state dict, optimizer or checkpoint, and a trunk with trainable parameters is refused.
* **Inputs**: real sequences are the token table's rows of real codes, ``tok_emb(codes)``; fake sequences are soft
  embeddings of the student, ``softmax(z[..., :K]) @ tok_emb.weight[:K]`` (the mask slot is dropped, as the
  sampler never emits it; *ours*). The class enters as the teacher has it: the class token of the trunk.
* **Mask augmentation**: each real and fake sequence gets its own share r ~ U[0, r_max] (r_max = 0.95) of
  positions replaced by the mask token's embedding, an exact count round(N r) chosen uniformly (generator-seeded);
  the heads receive the realised share count / N. Switchable; off gives r = 0 to the heads.
* **Heads** (*ours*): one per trunk layer, on 3 evenly spaced layers by default (:func:`default_head_layers`).
  Each head is LayerNorm -> (+ embedding of r) -> Linear(D, H) -> GELU -> Linear(H, 1) applied *per token*; the
  per-token logits are averaged over the N image positions, and the heads' logits averaged into one logit per
  sequence. The embedding of r is sinusoidal features of r through a Linear, added after the LayerNorm.
* **Losses**: generator non-saturating ``-log sigmoid(D(fake)) = softplus(-D(fake))``; discriminator binary
  cross-entropy ``softplus(-D(real)) + softplus(D(fake))`` (batch means, summed; *ours*, the paper does not
  publish its discriminator loss). Both in the softplus form, which is exact and overflow-free.

The iteration's objectives (docs/method.md#soft-dimo): :class:`GANGeneratorTerm` (``L_gan`` of the generator
update's student draw) and :class:`DiscriminatorUpdate` (the heads' loss, the third optimizer).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dimo_lightning.core.masking import random_positions_mask
from dimo_lightning.core.soft_embedding import soft_embedding
from dimo_lightning.objectives.context import DrawTerm, IterationContext, Objective, StudentDraw


# ---- pure functions ------------------------------------------------------------------------------------------------
def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def default_head_layers(depth: int, count: int = 3) -> tuple[int, ...]:
    """``count`` evenly spaced block indices in [1, depth], the last block included (fewer if depth < count)."""
    if depth < 1 or count < 1:
        raise ValueError(f"depth and count must be >= 1, got depth={depth}, count={count}")
    return tuple(sorted({max(1, round(depth * (i + 1) / count)) for i in range(count)}))


def generator_gan_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``mean(-log sigmoid(D(fake))) = mean(softplus(-D(fake)))``; fake_logits (B,)."""
    return F.softplus(-_float(fake_logits)).mean()


def discriminator_gan_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the discriminator: ``mean(softplus(-D(real))) + mean(softplus(D(fake)))``.

    Args:
        real_logits: (B_r,) logits of real sequences (target 1).
        fake_logits: (B_f,) logits of fake sequences (target 0).
    """
    return F.softplus(-_float(real_logits)).mean() + F.softplus(_float(fake_logits)).mean()


def mask_augment(
    embeddings: torch.Tensor,
    mask_embedding: torch.Tensor,
    max_ratio: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace a random share r ~ U[0, max_ratio] of each row's positions by the mask embedding.

    Exactly round(N r) positions per row (possibly 0), chosen uniformly at random.

    Args:
        embeddings: (B, N, D) token embeddings.
        mask_embedding: (D,) the mask token's embedding.
        max_ratio: upper end of the uniform ratio, in [0, 1].
        generator: random source (on the embeddings' device).

    Returns:
        (augmented embeddings (B, N, D), mask (B, N) bool with True = replaced, realised share (B,) = count / N).
    """
    if not 0.0 <= max_ratio <= 1.0:
        raise ValueError(f"max_mask_ratio must lie in [0, 1], got {max_ratio}")
    b, n, _ = embeddings.shape
    ratio = torch.rand(b, generator=generator, device=embeddings.device) * max_ratio
    counts = torch.round(ratio * n).long().clamp(0, n)
    mask = random_positions_mask(b, n, counts, generator=generator, device=embeddings.device)
    augmented = torch.where(mask[..., None], mask_embedding.to(embeddings.dtype), embeddings)
    return augmented, mask, counts.float() / n


def ratio_features(ratio: torch.Tensor, frequencies: int) -> torch.Tensor:
    """Sinusoidal features of a ratio in [0, 1]: (B,) -> (B, 2 * frequencies), periods 2, 1, 1/2, ... ."""
    scales = math.pi * 2.0 ** torch.arange(frequencies, device=ratio.device, dtype=torch.float32)
    angles = ratio.float()[:, None] * scales  # (B, F)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def check_frozen(trunk: nn.Module) -> None:
    """Raise ``ValueError`` if any trunk parameter requires grad (the discriminator must never train the teacher)."""
    trainable = [name for name, p in trunk.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(
            f"the discriminator trunk must be frozen, but {len(trainable)} parameter(s) require grad "
            f"(e.g. {trainable[0]}); pass the frozen teacher network"
        )


# ---- the discriminator ---------------------------------------------------------------------------------------------
class FeatureHead(nn.Module):
    """Per-token logits from one trunk layer, conditioned on the mask share r, averaged over the image tokens.

    Args:
        hidden_dim: width D of the trunk.
        head_dim: hidden width H of the head's MLP.
        ratio_dim: size of the ratio features.
    """

    def __init__(self, hidden_dim: int, head_dim: int, ratio_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.ratio_proj = nn.Linear(ratio_dim, hidden_dim)
        self.fc1 = nn.Linear(hidden_dim, head_dim)
        self.fc2 = nn.Linear(head_dim, 1)

    def forward(self, hidden: torch.Tensor, ratio_emb: torch.Tensor) -> torch.Tensor:
        """hidden (B, N, D), ratio_emb (B, R) -> logits (B,)."""
        x = self.norm(hidden) + self.ratio_proj(ratio_emb)[:, None]
        return self.fc2(F.gelu(self.fc1(x))).squeeze(-1).mean(dim=1)


class TeacherDiscriminator(nn.Module):
    """Trainable heads on a frozen teacher trunk (Soft-Di[M]O); the trunk is passed to each call, never owned.

    Args:
        hidden_dim: width D of the trunk (the teacher network's ``hidden_dim``).
        layers: trunk layers that get a head (indices of ``MaskTransformer.forward_features``); see
            :func:`default_head_layers`.
        head_dim: hidden width of each head's MLP.
        mask_augment: replace a random share r ~ U[0, max_mask_ratio] of the positions of every real and fake
            sequence by the mask embedding, and give r to the heads. Off: sequences go in whole, r = 0.
        max_mask_ratio: upper end r_max of the augmentation ratio.
        ratio_frequencies: number of sinusoidal frequencies of the r embedding.
    """

    def __init__(
        self,
        hidden_dim: int,
        layers: Sequence[int],
        head_dim: int = 256,
        mask_augment: bool = True,
        max_mask_ratio: float = 0.95,
        ratio_frequencies: int = 8,
    ) -> None:
        super().__init__()
        if not layers:
            raise ValueError("layers must name at least one trunk layer")
        if not 0.0 <= max_mask_ratio <= 1.0:
            raise ValueError(f"max_mask_ratio must lie in [0, 1], got {max_mask_ratio}")
        self.layers = tuple(int(layer) for layer in layers)
        self.mask_augment = mask_augment
        self.max_mask_ratio = max_mask_ratio
        self.ratio_frequencies = ratio_frequencies
        self.heads = nn.ModuleList(FeatureHead(hidden_dim, head_dim, 2 * ratio_frequencies) for _ in self.layers)

    @classmethod
    def for_trunk(cls, trunk: nn.Module, num_layers: int = 3, **kwargs) -> TeacherDiscriminator:
        """Heads sized for ``trunk`` (a MaskTransformer) on ``num_layers`` evenly spaced layers."""
        layers = kwargs.pop("layers", None) or default_head_layers(len(trunk.transformer.layers), num_layers)
        return cls(trunk.hidden_dim, layers, **kwargs)

    # ---- inputs ----
    @staticmethod
    def real_embeddings(trunk: nn.Module, codes: torch.Tensor) -> torch.Tensor:
        """The token table's rows of real codes: (B, N) in [0, K) -> (B, N, D)."""
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"real codes must be an integer tensor, got {codes.dtype}")
        codes = codes.reshape(codes.shape[0], -1)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= trunk.codebook_size):
            raise ValueError(
                f"real codes must lie in [0, {trunk.codebook_size}) (the teacher's codebook); got "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )
        return trunk.tok_emb(codes)

    @staticmethod
    def fake_embeddings(trunk: nn.Module, student_logits: torch.Tensor) -> torch.Tensor:
        """Soft embeddings of the student: ``softmax(z[..., :K]) @ tok_emb.weight[:K]``; (B, N, V) -> (B, N, D)."""
        k = trunk.codebook_size
        if student_logits.shape[-1] < k:
            raise ValueError(f"student logits have {student_logits.shape[-1]} ids, fewer than the {k} codes")
        return soft_embedding(student_logits[..., :k], trunk.tok_emb.weight[:k])

    @classmethod
    def student_embeddings(
        cls, trunk: nn.Module, student_logits: torch.Tensor, tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What the heads see of the student, (B, N, D): the soft embedding, or with ``tokens`` (B, N) (the
        student's samples) the straight-through form ``E[tokens] + soft - sg(soft)``: the sampled token's row in
        the forward pass, the soft embedding's gradient in the backward pass (never a gradient through
        ``tokens``)."""
        soft = cls.fake_embeddings(trunk, student_logits)
        if tokens is None:
            return soft
        hard = trunk.tok_emb(tokens).to(soft.dtype)  # the sampler's ids lie in [0, K): no range check (no sync)
        return hard + soft - soft.detach()

    # ---- the logit ----
    def forward(
        self,
        trunk: nn.Module,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Discriminator logits (B,) of embedding sequences (B, N, D) of class ``labels`` (B,).

        Mask augmentation (if on) is drawn from ``generator``. Gradients flow to the heads and to ``embeddings``;
        the trunk must be frozen (checked). The trunk runs in whatever train/eval mode the caller set.
        """
        check_frozen(trunk)
        if self.mask_augment:
            mask_embedding = trunk.tok_emb.weight[trunk.mask_id]
            embeddings, _, ratio = mask_augment(embeddings, mask_embedding, self.max_mask_ratio, generator)
        else:
            ratio = torch.zeros(embeddings.shape[0], device=embeddings.device)
        hidden = trunk.forward_features(embeddings, labels, layers=self.layers)
        ratio_emb = ratio_features(ratio, self.ratio_frequencies).to(embeddings.dtype)
        n = embeddings.shape[1]
        logits = [head(h[:, :n], ratio_emb) for head, h in zip(self.heads, hidden, strict=True)]
        return torch.stack(logits).mean(dim=0)

    # ---- the two losses ----
    def generator_loss(
        self,
        trunk: nn.Module,
        student_logits: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
        row_weight: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``L_gan`` of the student: non-saturating loss on its soft embeddings; differentiable in the logits.

        Args:
            trunk: the frozen teacher network.
            student_logits: (B, N, V) student logits (with grad).
            labels: (B,) the classes the student generated for.
            generator: random source of the mask augmentation.
            row_weight: optional (B,) bool of rows to use (e.g. ``finite_rows``): the others never enter the
                trunk, so a non-finite row cannot reach the loss or the gradient; no row left gives 0.
            tokens: optional (B, N) sampled tokens: straight-through inputs (:meth:`student_embeddings`).
        """
        if row_weight is not None:
            keep = row_weight.bool()
            if not bool(keep.any()):
                # A zero that stays in the graph (DDP's reducer expects one), NaN-free whatever the logits hold.
                finite = torch.where(torch.isfinite(student_logits), student_logits, torch.zeros_like(student_logits))
                return finite.sum() * 0.0
            student_logits, labels = student_logits[keep], labels[keep]
            tokens = tokens[keep] if tokens is not None else None
        fake = self.student_embeddings(trunk, student_logits, tokens)
        return generator_gan_loss(self(trunk, fake, labels, generator))

    def discriminator_loss(
        self,
        trunk: nn.Module,
        real_codes: torch.Tensor,
        real_labels: torch.Tensor,
        student_logits: torch.Tensor,
        fake_labels: torch.Tensor,
        generator: torch.Generator | None = None,
        tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """BCE of the heads on real codes vs the (detached) student's soft embeddings.

        Args:
            trunk: the frozen teacher network.
            real_codes: (B_r, N) real token codes in [0, K).
            real_labels: (B_r,) their classes.
            student_logits: (B_f, N, V) student logits; detached here (no gradient reaches the student).
            fake_labels: (B_f,) the classes the student generated for.
            generator: random source of the mask augmentation.
            tokens: optional (B_f, N) sampled tokens: the fake side is then their table rows (the forward value of
                the straight-through input).

        Returns:
            (loss, logs): logs hold the mean real / fake logits and the accuracy at threshold 0, detached.
        """
        real_logits = self(trunk, self.real_embeddings(trunk, real_codes), real_labels, generator)
        fake = self.student_embeddings(trunk, student_logits.detach(), tokens).detach()
        fake_logits = self(trunk, fake, fake_labels, generator)
        loss = discriminator_gan_loss(real_logits, fake_logits)
        with torch.no_grad():
            accuracy = torch.cat([real_logits > 0, fake_logits <= 0]).float().mean()
        return loss, {
            "logit_real": real_logits.detach().mean(),
            "logit_fake": fake_logits.detach().mean(),
            "accuracy": accuracy,
        }


# ---- the objectives of an iteration -------------------------------------------------------------------------------
def feature_trunk(teacher, flag: str) -> nn.Module:
    """The teacher's network as the frozen feature trunk of the heads and the coverage term; a ``ValueError``
    naming ``flag`` when it has no ``forward_features``."""
    trunk = teacher.network
    if not callable(getattr(trunk, "forward_features", None)):
        raise ValueError(
            f"{flag} needs a teacher network with forward_features (a MaskTransformer) as the frozen feature "
            f"trunk; {type(teacher).__name__}'s network is a {type(trunk).__name__}"
        )
    return trunk


@contextmanager
def trunk_in_eval(trunk: nn.Module) -> Iterator[None]:
    """The trunk in eval mode for the block: the discriminator's and the coverage term's features are deterministic
    (no dropout) whatever ``targets.teacher_eval`` says of the targets."""
    was_training = trunk.training
    trunk.eval()
    try:
        yield
    finally:
        trunk.train(was_training)


def build_discriminator(trunk: nn.Module, seed: int, num_layers: int, **kwargs) -> TeacherDiscriminator:
    """Heads for ``trunk`` whose initial weights are a function of ``seed``, not of whatever drew from the global RNG
    before (so a run and its resumed copy, built in any order, agree); ``kwargs`` as :class:`TeacherDiscriminator`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TeacherDiscriminator.for_trunk(trunk, num_layers, **kwargs)


class GANGeneratorTerm(DrawTerm):
    """``L_gan`` (non-saturating) of the generator update's student draw, through the soft (or straight-through)
    embedding path; rows not ``draw.valid`` are left out. ``loss(ctx, part, draw) -> (L_gan, {})``, unweighted.

    Args:
        discriminator: the heads.
        fake_input: ``soft`` or ``straight_through`` (the sampled tokens in the forward pass).
    """

    def __init__(self, discriminator: TeacherDiscriminator, fake_input: str = "soft") -> None:
        self.discriminator = discriminator
        self.fake_input = fake_input

    def loss(self, ctx: IterationContext, part: int, draw: StudentDraw) -> tuple[torch.Tensor, dict]:
        tokens = draw.x if self.fake_input == "straight_through" else None
        trunk = ctx.teacher.network
        with trunk_in_eval(trunk):
            return self.discriminator.generator_loss(trunk, draw.z, ctx.conditions[part], ctx.generator,
                                                     row_weight=draw.valid, tokens=tokens), {}


class DiscriminatorUpdate(Objective):
    """The heads' loss of one micro-batch: its real codes vs the student's (detached) draw of the generator update (a
    fresh no-grad student sample when the generator did not step).

    Args:
        discriminator: the heads.
        fake_input: ``soft`` or ``straight_through`` (the fake side is the sampled tokens' table rows).

    Logs (per micro-batch): ``logit_real``, ``logit_fake``, ``accuracy`` (at threshold 0).
    """

    def __init__(self, discriminator: TeacherDiscriminator, fake_input: str = "soft") -> None:
        self.discriminator = discriminator
        self.fake_input = fake_input

    def loss(self, ctx: IterationContext, part: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cond, trunk = ctx.conditions[part], ctx.teacher.network
        with trunk_in_eval(trunk):
            x, z = ctx.sample_for(part, reuse=True)
            tokens = x if self.fake_input == "straight_through" else None
            return self.discriminator.discriminator_loss(trunk, ctx.real[part], cond, z, cond, ctx.generator,
                                                         tokens=tokens)
