"""The teacher contract: what Di[M]O needs from a pretrained masked diffusion model.

A teacher bundles three things:

* the token network (``self.network``): what student and aux are initialised from (deep copies);
* the tokenizer (``self.tokenizer``): codes <-> images, frozen, never copied;
* the condition encoder: class labels here; a frozen text encoder for prompt teachers. Never copied.

Every call into a network (teacher, student or aux) goes through :meth:`MaskedTeacher.apply_network`, so a
teacher with an unusual forward signature adapts it in one place. Adding a teacher is one subclass plus one config.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dimo_lightning.core.sampling import cfg_combine, maskgit_decode


class MaskedTeacher(nn.Module, ABC):
    """Base class of all teachers.

    Subclasses set ``self.network`` and ``self.tokenizer`` in ``__init__`` and implement the abstract members.
    Conventions (shapes): codes are (B, N) long in [0, K] where K = ``mask_id``; logits are (B, N, V) with
    V = ``logit_width`` (V = K + 1 when the network also scores the mask slot, V = K otherwise); images are
    (B, C, H, W) float in [0, 1].
    """

    network: nn.Module
    tokenizer: nn.Module
    # What the codes stand for: "image" (token grids decoded to pixels) or "text" (token sequences decoded to
    # strings, :class:`~dimo_lightning.teachers.sequence.SequenceTeacher`), so callbacks and reports can check they fit.
    modality: str = "image"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Record every subclass's constructor arguments, so that a checkpoint can name the teacher it was trained
        # against (class path + init args) and rebuild it, whether the teacher came from the CLI or from Python.
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def recording_init(self, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            bound = inspect.signature(init).bind(self, *args, **kw)
            bound.apply_defaults()
            arguments = dict(list(bound.arguments.items())[1:])  # drop self
            # Relative paths are made absolute, so a checkpoint rebuilds its teacher from any working directory.
            arguments = {k: os.path.abspath(v) if isinstance(v, str) and not os.path.isabs(v) and os.path.exists(v)
                         else v for k, v in arguments.items()}
            # The outermost constructor finishes last, so a subclass's own arguments win over its parent's.
            object.__setattr__(self, "_init_record", {"class_path": _class_path(type(self)), "init_args": arguments})

        cls.__init__ = recording_init

    def init_record(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}``: how to rebuild this teacher (plain values only).

        Raises:
            ValueError: an argument is not a plain (JSON) value, so it cannot be recorded in a checkpoint.
        """
        record = getattr(self, "_init_record", None) or {"class_path": _class_path(type(self)), "init_args": {}}
        try:
            json.dumps(record["init_args"])
        except TypeError as err:
            raise ValueError(
                f"{record['class_path']} was built with arguments that are not plain values ({err}); pass paths "
                "and numbers so that checkpoints can record and rebuild the teacher"
            ) from err
        return {"class_path": record["class_path"], "init_args": dict(record["init_args"])}

    @staticmethod
    def from_record(record: Mapping[str, Any]) -> MaskedTeacher:
        """Build the teacher described by :meth:`init_record` (``class_path`` + ``init_args``)."""
        if not isinstance(record, Mapping) or "class_path" not in record:
            raise ValueError(f"a teacher record needs 'class_path' and 'init_args', got {record!r}")
        teacher_class = import_class(record["class_path"])
        if not (isinstance(teacher_class, type) and issubclass(teacher_class, MaskedTeacher)):
            raise ValueError(f"{record['class_path']} is not a MaskedTeacher subclass")
        return teacher_class(**dict(record.get("init_args") or {}))

    # ---- vocabulary and grid -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def codebook_size(self) -> int:
        """K: number of image codes."""

    @property
    @abstractmethod
    def mask_id(self) -> int:
        """The id of the mask token."""

    @property
    @abstractmethod
    def logit_width(self) -> int:
        """V: width of the logit vector (K + 1 if the mask slot is scored, else K)."""

    @property
    @abstractmethod
    def grid_shape(self) -> tuple[int, int]:
        """(h, w) of the token grid; N = h * w."""

    @property
    def seq_len(self) -> int:
        """N: number of image tokens."""
        h, w = self.grid_shape
        return h * w

    # ---- conditions ----------------------------------------------------------------------------------------
    @abstractmethod
    def encode_condition(self, batch: Any) -> Any:
        """Turn what the DataModule yields (labels, prompts) into the condition the network consumes."""

    def check_condition(self, batch: Any) -> None:
        """Raise ``ValueError`` for a batch this teacher cannot condition on (e.g. labels out of range).

        Called on the host-side batch (``on_before_batch_transfer``), off the device hot path."""

    def fix_positions(self, codes: torch.Tensor, cond: Any) -> torch.Tensor:
        """Codes (B, N) with the condition's fixed positions (a text prompt) written in. Image teachers have none:
        the codes come back unchanged (the same tensor)."""
        return codes

    @abstractmethod
    def condition_batch_size(self, cond: Any) -> int:
        """Number of samples in a condition batch."""

    @abstractmethod
    def apply_network(
        self,
        network: nn.Module,
        codes: torch.Tensor,
        cond: Any,
        drop_condition: torch.Tensor | None = None,
        emb_noise_sigma: float | torch.Tensor = 0.0,
        emb_noise_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Run ``network`` (the teacher's, the student's or the aux's) on codes (B, N) -> logits (B, N, V).

        ``drop_condition`` (B,) bool selects the unconditional branch per sample. ``emb_noise_sigma`` perturbs the
        image-token embeddings (student input only), scaled by ``emb_noise_scale``.
        """

    @abstractmethod
    def repeat_condition(self, cond: Any, repeats: int) -> Any:
        """The condition batch concatenated ``repeats`` times along the batch axis (for batched CFG)."""

    # ---- images --------------------------------------------------------------------------------------------
    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, N) in [0, K) -> images (B, C, H, W) in [0, 1]."""

    def embedding_rms(self, network: nn.Module | None = None) -> float:
        """RMS of the clean image-token embeddings (for noise relative to the embeddings' scale)."""
        net = self.network if network is None else network
        if not hasattr(net, "code_embedding_rms"):
            raise NotImplementedError(f"{type(self).__name__} must implement embedding_rms()")
        return net.code_embedding_rms()

    def frozen_parameter_names(self) -> list[str]:
        """Names (within the network) of embedding/output-head parameters frozen by ``fix_emb_layer``."""
        return []

    # ---- conveniences --------------------------------------------------------------------------------------
    def forward(self, codes: torch.Tensor, cond: Any, drop_condition: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher logits (B, N, V)."""
        return self.apply_network(self.network, codes, cond, drop_condition)

    def guided_logits(
        self,
        network: nn.Module,
        codes: torch.Tensor,
        cond: Any,
        cfg_scale: float | torch.Tensor,
    ) -> torch.Tensor:
        """Classifier-free guided logits ``l_u + w (l_c - l_u)`` in one batched pass of 2B.

        Args:
            network: the network to run.
            codes: (B, N).
            cond: condition batch of size B.
            cfg_scale: a number or a (B,) tensor of guidance scales w. The number 1 runs only the conditional
                pass; a tensor always runs both (deciding on its values would read them back from the device).

        Returns:
            (B, N, V) logits.
        """
        if not torch.is_tensor(cfg_scale) and cfg_scale == 1:
            return self.apply_network(network, codes, cond)
        scale = torch.as_tensor(cfg_scale, dtype=torch.float32, device=codes.device)
        b = codes.shape[0]
        drop = torch.arange(2 * b, device=codes.device) >= b  # conditional half first, then the unconditional
        logits = self.apply_network(network, codes.repeat(2, 1), self.repeat_condition(cond, 2), drop)
        cond_logits, uncond_logits = logits[:b], logits[b:]
        scale = scale.reshape(-1, 1, 1) if scale.ndim else scale
        return cfg_combine(cond_logits, uncond_logits, scale.to(logits.dtype))

    @torch.no_grad()
    def sample(
        self,
        cond: Any,
        steps: int = 8,
        cfg_scale: float = 1.0,
        cfg_ramp: bool = True,
        schedule: str = "arccos",
        softmax_temperature: float = 1.0,
        choice_temperature: float = 4.5,
        generator: torch.Generator | None = None,
        cfg_batched: bool = True,
    ) -> torch.Tensor:
        """Multi-step MaskGIT decoding of the teacher -> codes (B, N) in [0, K) (no mask left).

        See :func:`dimo_lightning.core.sampling.maskgit_decode` for the arguments.
        """

        b = self.condition_batch_size(cond)
        doubled = self.repeat_condition(cond, 2)
        device = next(self.network.parameters()).device

        def logits_fn(codes: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
            # A batch of B (conditional, or the unconditional pass of split CFG) or of 2B (batched CFG).
            return self.apply_network(self.network, codes, cond if codes.shape[0] == b else doubled, drop)

        was_training = self.network.training
        self.network.eval()
        try:
            return maskgit_decode(
                logits_fn, b, self.seq_len, self.codebook_size, self.mask_id, steps=steps, schedule=schedule,
                cfg_scale=cfg_scale, cfg_ramp=cfg_ramp, softmax_temperature=softmax_temperature,
                choice_temperature=choice_temperature, device=device, generator=generator, cfg_batched=cfg_batched,
            )
        finally:
            self.network.train(was_training)

    def check_codes(self, codes: torch.Tensor, allow_mask: bool = True) -> None:
        """Raise ``ValueError`` if codes fall outside the vocabulary."""
        high = self.mask_id if allow_mask else self.codebook_size - 1
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > high):
            raise ValueError(
                f"codes must lie in [0, {high}] (codebook {self.codebook_size}"
                f"{', mask id ' + str(self.mask_id) if allow_mask else ''}); got range "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )


class ClassConditionalTeacher(MaskedTeacher):
    """A teacher whose network is a :class:`~dimo_lightning.nn.transformer.MaskTransformer` conditioned on class labels.

    Subclasses set ``self.network`` (a MaskTransformer) and ``self.tokenizer`` (with ``decode(codes (B, h, w))``).
    The logits include the mask slot (V = K + 1), as MaskGIT's do; samplers exclude it.
    """

    @property
    def codebook_size(self) -> int:
        return self.network.codebook_size

    @property
    def mask_id(self) -> int:
        return self.network.mask_id

    @property
    def logit_width(self) -> int:
        return self.network.logit_width

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (self.network.grid_size, self.network.grid_size)

    @property
    def num_classes(self) -> int:
        return self.network.num_classes

    def encode_condition(self, batch: Any) -> torch.Tensor:
        """Labels (B,) long. Not range-checked here (that would read device values back in every training step):
        :meth:`check_condition` runs on the host-side batch before it reaches the device."""
        labels = batch[0] if isinstance(batch, (list, tuple)) else batch
        return torch.as_tensor(labels).long()

    def check_condition(self, batch: Any) -> None:
        labels = batch[0] if isinstance(batch, (list, tuple)) else batch
        labels = torch.as_tensor(labels)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"class labels must lie in [0, {self.num_classes}); got [{int(labels.min())}, {int(labels.max())}]"
            )

    def condition_batch_size(self, cond: torch.Tensor) -> int:
        return cond.shape[0]

    def repeat_condition(self, cond: torch.Tensor, repeats: int) -> torch.Tensor:
        return cond.repeat(repeats)

    def apply_network(
        self,
        network: nn.Module,
        codes: torch.Tensor,
        cond: torch.Tensor,
        drop_condition: torch.Tensor | None = None,
        emb_noise_sigma: float | torch.Tensor = 0.0,
        emb_noise_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return network(codes, cond, drop_condition, emb_noise_sigma, emb_noise_scale, generator)

    def frozen_parameter_names(self) -> list[str]:
        # The tied token table (input embedding and output projection), the output bias and the positions:
        # what the official code freezes with fix_emb_layer (docs/method.md#official-defaults).
        return ["tok_emb.weight", "bias", "pos_emb"]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_codes(codes, allow_mask=False)
        h, w = self.grid_shape
        return self.tokenizer.decode(codes.reshape(-1, h, w))

    def decode_soft(self, probs: torch.Tensor) -> torch.Tensor:
        """Differentiable decode (Soft-Di[M]O): probabilities (B, N, K) over the K codes -> images (B, C, H, W).

        The tokenizer decodes the expected codebook vector at each position (its ``decode_soft``); one-hot
        probabilities give :meth:`decode` of their codes. Slice the mask slot off student logits before the softmax.
        """
        if probs.ndim != 3 or probs.shape[1:] != (self.seq_len, self.codebook_size):
            raise ValueError(
                f"probs must have shape (B, {self.seq_len}, {self.codebook_size}) (tokens, codes), got "
                f"{tuple(probs.shape)}"
            )
        return self.tokenizer.decode_soft(probs, self.grid_shape)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def import_class(class_path: str) -> Any:
    """The object named by a dotted ``module.Name`` path (a clear error if it does not exist)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot import {class_path!r}: {err}") from err
