"""The one-step sampling pipeline: a student network, what prepares its conditions and decodes its codes, and its
sampling defaults; one object for training-time evaluation and for exported students, without Lightning.

Two ways to build it:

* :meth:`OneStepPipeline.from_teacher` wraps a live teacher and a network (the student, its EMA): the teacher's
  ``encode_condition``, ``apply_network`` and ``decode`` are used, and nothing is copied. ``DiMOModule.generate``,
  ``dimo predict``, the evaluation callbacks and ``dimo bench`` sample through it.
* :func:`~dimo_lightning.inference.export.load_student` rebuilds one from a ``dimo export`` folder, with a
  :class:`LabelConditioner` (class students) or a
  :class:`~dimo_lightning.inference.prompt_export.PromptConditioner` (prompt students) in place of the teacher.

Either way the logits come from :func:`~dimo_lightning.inference.one_step.student_logits` and the tokens from
:func:`~dimo_lightning.inference.one_step.draw_tokens`, so the same generator gives the same codes everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import torch
from torch import nn

from dimo_lightning.core.conditions import move_condition
from dimo_lightning.core.masking import parse_range
from dimo_lightning.inference.one_step import StudentInput, TokenSampling, draw_tokens, student_logits


@dataclass(frozen=True)
class SamplingDefaults:
    """How the student samples unless a call says otherwise (``config.json["sampling"]`` of an export).

    Attributes:
        r_init: share of masked positions in the hybrid input.
        emb_noise_sigma: embedding-noise level of the input embeddings.
        emb_noise_scale: multiplier of the noise (the RMS of the code embeddings when the noise is relative).
        temperature: sampling temperature.
        top_k: top-k filter (0: off).
        top_p: top-p filter (0: off).
    """

    r_init: float = 0.6
    emb_noise_sigma: float = 0.1
    emb_noise_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SamplingDefaults:
        """From ``config.json["sampling"]`` (missing keys keep their defaults, unknown ones are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any], emb_noise_scale: float) -> SamplingDefaults:
        """The evaluation sampling settings of a checkpoint written before the settings groups, from its flat
        hyperparameters:
        ``sample_r_init`` (None: the midpoint of ``r_init``), ``sample_emb_noise_sigma`` (None: ``emb_noise_sigma``),
        ``sample_temperature``, ``student_top_k`` and ``student_top_p``."""
        low, high = parse_range(hparams.get("r_init", 0.6), "r_init")
        r_init = hparams.get("sample_r_init")
        sigma = hparams.get("sample_emb_noise_sigma")
        return cls(
            r_init=float(r_init) if r_init is not None else (low + high) / 2,
            emb_noise_sigma=float(sigma) if sigma is not None else float(hparams.get("emb_noise_sigma", 0.1)),
            emb_noise_scale=float(emb_noise_scale),
            temperature=float(hparams.get("sample_temperature", 1.0)),
            top_k=int(hparams.get("student_top_k", 0)),
            top_p=float(hparams.get("student_top_p", 0.0)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Conditioner(Protocol):
    """What the pipeline needs besides the network: the part of the teacher contract
    (:class:`~dimo_lightning.teachers.base.MaskedTeacher`) that one student forward and the decoding use. A teacher
    is one; exported students get a :class:`LabelConditioner` or a ``PromptConditioner``."""

    seq_len: int
    codebook_size: int
    mask_id: int

    def encode_condition(self, conditions: Any) -> Any: ...

    def condition_batch_size(self, cond: Any) -> int: ...

    def apply_network(self, network: nn.Module, codes: torch.Tensor, cond: Any,
                      drop_condition: torch.Tensor | None = None, emb_noise_sigma: float = 0.0,
                      emb_noise_scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def fix_positions(self, codes: torch.Tensor, cond: Any) -> torch.Tensor: ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...


class LabelConditioner(nn.Module):
    """Class labels and the tokenizer of an exported class student (MaskGIT layout:
    ``network(codes, labels, drop, sigma, scale, generator)``).

    Args:
        tokenizer: decodes codes (B, h, w) to images (B, C, H, W) in [0, 1].
        num_classes: number of class labels.
        grid_size: tokens per side of the (square) token grid.
        codebook_size: K, the image codes.
        mask_id: id of the mask token.
    """

    conditioning_type = "class_label"  # what config.json["conditioning"]["type"] says

    def __init__(self, tokenizer: nn.Module, num_classes: int, grid_size: int, codebook_size: int,
                 mask_id: int) -> None:
        super().__init__()
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.num_classes = int(num_classes)
        self.grid_size = int(grid_size)
        self.codebook_size = int(codebook_size)
        self.mask_id = int(mask_id)

    @property
    def seq_len(self) -> int:
        return self.grid_size ** 2

    def check_labels(self, labels: Any, flag: str = "labels") -> torch.Tensor:
        """Labels (B,) long, each in [0, num_classes); a clear error naming ``flag`` otherwise."""
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"{flag} must lie in [0, {self.num_classes - 1}] (the student's classes); got "
                             f"{sorted(set(labels.tolist()) - set(range(self.num_classes)))[:5]}")
        return labels

    def encode_condition(self, conditions: Any) -> torch.Tensor:
        return self.check_labels(conditions)

    def condition_batch_size(self, cond: torch.Tensor) -> int:
        return cond.shape[0]

    def apply_network(self, network: nn.Module, codes: torch.Tensor, cond: torch.Tensor,
                      drop_condition: torch.Tensor | None = None, emb_noise_sigma: float = 0.0,
                      emb_noise_scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        return network(codes, cond, drop_condition, emb_noise_sigma, emb_noise_scale, generator)

    def fix_positions(self, codes: torch.Tensor, cond: Any) -> torch.Tensor:
        """Codes (B, N) unchanged: no position of an image is fixed by its condition."""
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(codes.reshape(-1, self.grid_size, self.grid_size))


@contextmanager
def _eval_mode(network: nn.Module) -> Iterator[None]:
    """``network`` in eval mode (no dropout) for the duration, then back in its previous mode."""
    was_training = network.training
    network.eval()
    try:
        yield
    finally:
        network.train(was_training)


class OneStepPipeline:
    """A Di[M]O student that samples in one forward pass: conditions -> hybrid masked/random input -> logits ->
    codes -> images.

    Args:
        network: the student network (or its EMA). It runs in eval mode during each call and is left in its mode.
        conditioner: prepares the conditions, runs the network on them and decodes codes: a teacher
            (:meth:`from_teacher`) or the conditioner of an exported student (see :class:`Conditioner`).
        defaults: the sampling settings used where a call gives none.
        device: where the inputs are drawn (None: the device of the network's parameters).
    """

    def __init__(self, network: nn.Module, conditioner: Conditioner, defaults: SamplingDefaults,
                 device: torch.device | str | None = None) -> None:
        self.network = network
        self.conditioner = conditioner
        self.defaults = defaults
        self._device = None if device is None else torch.device(device)

    @classmethod
    def from_teacher(cls, teacher: nn.Module, network: nn.Module, defaults: SamplingDefaults,
                     device: torch.device | str | None = None) -> OneStepPipeline:
        """The pipeline of a live ``network`` (student or EMA) distilled from ``teacher``: the teacher prepares the
        conditions (``encode_condition``), runs the network (``apply_network``) and decodes (``decode``). Nothing is
        copied, so the pipeline samples the network as it is now."""
        return cls(network, teacher, defaults, device)

    # ---- properties ----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else next(self.network.parameters()).device

    @property
    def conditioning_type(self) -> str | None:
        """``class_label`` or ``prompt`` for an exported student (None for a teacher that does not say)."""
        return getattr(self.conditioner, "conditioning_type", None)

    @property
    def seq_len(self) -> int:
        """N: image tokens per sample."""
        return self.conditioner.seq_len

    def to(self, device: torch.device | str) -> OneStepPipeline:
        """Move the network and the conditioner's modules (tokenizer, text encoder) to ``device``."""
        self.network.to(device)
        if isinstance(self.conditioner, nn.Module):
            self.conditioner.to(device)
        self._device = torch.device(device)
        return self

    # ---- the steps -----------------------------------------------------------------------------------------------
    def prepare(self, conditions: Any) -> Any:
        """Raw conditions (class labels (B,), or B prompts) -> the network's condition batch on the device."""
        return move_condition(self.conditioner.encode_condition(conditions), self.device)

    def student_input(self, r_init: float | None = None, emb_noise_sigma: float | None = None) -> StudentInput:
        d = self.defaults
        return StudentInput(d.r_init if r_init is None else r_init,
                            d.emb_noise_sigma if emb_noise_sigma is None else emb_noise_sigma, d.emb_noise_scale)

    def token_sampling(self, logit_width: int, temperature: float | None = None) -> TokenSampling:
        """The defaults' token sampling at ``temperature``; ids from K up (the mask slot) are never drawn."""
        d = self.defaults
        return TokenSampling(d.temperature if temperature is None else temperature, d.top_k, d.top_p,
                             tuple(range(self.conditioner.codebook_size, logit_width)))

    def _condition(self, conditions: Any, cond: Any) -> Any:
        if (conditions is None) == (cond is None):
            raise ValueError("give the conditions (labels or prompts) or a prepared `cond`, exactly one of them")
        return self.prepare(conditions) if cond is None else cond

    @torch.no_grad()
    def logits(self, conditions: Any = None, generator: torch.Generator | None = None, *, cond: Any = None,
               r_init: float | None = None, emb_noise_sigma: float | None = None) -> torch.Tensor:
        """Student logits (B, N, V) on a fresh hybrid input, for B conditions (raw, or already prepared as
        ``cond``, e.g. by the teacher's ``encode_condition``)."""
        cond = self._condition(conditions, cond)
        with _eval_mode(self.network):
            return student_logits(self.conditioner, self.network, cond, self.student_input(r_init, emb_noise_sigma),
                                  generator, self.device)

    @torch.no_grad()
    def sample_codes(self, conditions: Any = None, generator: torch.Generator | None = None, *, cond: Any = None,
                     temperature: float | None = None, r_init: float | None = None,
                     emb_noise_sigma: float | None = None) -> torch.Tensor:
        """Codes (B, N) in [0, K) for B conditions (raw, or prepared as ``cond``); None: the defaults."""
        z = self.logits(conditions, generator, cond=cond, r_init=r_init, emb_noise_sigma=emb_noise_sigma)
        return draw_tokens(z, self.token_sampling(z.shape[-1], temperature), generator)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, N) -> images (B, C, H, W) in [0, 1], float32."""
        return self.conditioner.decode(codes).float()

    @torch.no_grad()
    def __call__(self, conditions: Any, seed: int = 0, generator: torch.Generator | None = None,
                 temperature: float | None = None, r_init: float | None = None,
                 emb_noise_sigma: float | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] for B conditions (class labels (B,), or B prompts), from ``generator`` or
        else a generator seeded with ``seed``."""
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        codes = self.sample_codes(conditions, generator, temperature=temperature, r_init=r_init,
                                  emb_noise_sigma=emb_noise_sigma)
        return self.decode(codes)
