"""The one-step sampling pipeline: a student network, its tokenizer and its sampling defaults, without Lightning."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dimo_lightning.core.masking import hybrid_initial_sequence
from dimo_lightning.core.sampling import sample_tokens


class OneStepSampler(nn.Module):
    """An exported Di[M]O student: one forward pass from a hybrid masked/random sequence to image codes.

    Mirrors ``DiMOModule.generate`` draw for draw: the same generator gives the same codes. This class takes class
    labels; :class:`~dimo_lightning.inference.prompt_export.PromptSampler` overrides :meth:`prepare` and
    :meth:`apply_network` for prompts.

    Args:
        network: the student network (MaskGIT layout: ``network(codes, labels, drop, sigma, scale, generator)``).
        tokenizer: decodes codes (B, h, w) to images (B, C, H, W) in [0, 1].
        num_classes: number of class labels.
        sampling: defaults ``r_init``, ``emb_noise_sigma``, ``emb_noise_scale``, ``temperature``, ``top_k``,
            ``top_p``.
    """

    def __init__(self, network: nn.Module, tokenizer: nn.Module, num_classes: int, sampling: Mapping[str, Any]):
        super().__init__()
        self.network = network.eval().requires_grad_(False)
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.num_classes = num_classes
        self.sampling = dict(sampling)

    conditioning_type = "class_label"  # what config.json["conditioning"]["type"] says

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def grid_size(self) -> int:
        """Tokens per side of the (square) token grid."""
        return self.network.grid_size

    @property
    def seq_len(self) -> int:
        """N: image tokens per sample."""
        return self.network.seq_len

    def prepare(self, conditions: Any) -> Any:
        """Raw conditions (class labels) -> what :meth:`apply_network` takes (a checked label tensor)."""
        return self.check_labels(conditions)

    def condition_size(self, cond: Any) -> int:
        return cond.shape[0]

    def apply_network(self, codes: torch.Tensor, cond: Any, settings: Mapping[str, Any],
                      generator: torch.Generator | None) -> torch.Tensor:
        """One student forward on ``codes`` (B, N) for prepared conditions -> logits (B, N, V)."""
        return self.network(codes, cond, None, settings["emb_noise_sigma"], settings["emb_noise_scale"], generator)

    def check_labels(self, labels: torch.Tensor, flag: str = "labels") -> torch.Tensor:
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"{flag} must lie in [0, {self.num_classes - 1}] (the student's classes); got "
                             f"{sorted(set(labels.tolist()) - set(range(self.num_classes)))[:5]}")
        return labels.to(self.device)

    @torch.no_grad()
    def logits(self, labels: Any, generator: torch.Generator | None = None, **overrides: Any) -> torch.Tensor:
        """Student logits (B, N, V) for B conditions (class labels, or prompts for a prompt student), on a fresh
        hybrid initial sequence."""
        settings = {**self.sampling, **{k: v for k, v in overrides.items() if v is not None}}
        cond = self.prepare(labels)
        net = self.network
        x_init = hybrid_initial_sequence(self.condition_size(cond), self.seq_len, net.codebook_size,
                                         settings["r_init"], net.mask_id, generator, self.device)
        return self.apply_network(x_init, cond, settings, generator)

    @torch.no_grad()
    def sample_codes(
        self, labels: torch.Tensor, generator: torch.Generator | None = None, temperature: float | None = None,
        r_init: float | None = None, emb_noise_sigma: float | None = None,
    ) -> torch.Tensor:
        """Codes (B, N) in [0, K) for B conditions (defaults: the exported sampling settings)."""
        logits = self.logits(labels, generator, r_init=r_init, emb_noise_sigma=emb_noise_sigma)
        exclude = tuple(range(self.network.codebook_size, logits.shape[-1]))  # never the mask slot
        return sample_tokens(logits, temperature or self.sampling["temperature"], self.sampling["top_k"],
                             self.sampling["top_p"], exclude, generator)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, N) -> images (B, C, H, W) in [0, 1]."""
        side = self.grid_size
        return self.tokenizer.decode(codes.reshape(-1, side, side)).float()

    @torch.no_grad()
    def forward(self, labels: torch.Tensor, seed: int = 0, **kwargs: Any) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] for B conditions (class labels (B,), or B prompts), seeded."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return self.decode(self.sample_codes(labels, generator, **kwargs))
