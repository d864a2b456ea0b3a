"""Text-conditional teachers: a :class:`~dimo_lightning.nn.meissonic.MeissonicTransformer` conditioned on prompts.

:class:`TextConditionalTeacher` holds what every prompt teacher shares: conditions are
:class:`~dimo_lightning.core.conditions.TextCondition` objects; the unconditional branch of CFG and the aux condition
drop swap in cached embeddings of the empty prompt ("") or of the negative prompt; the network gets the micro-conditions
and the (documented) timestep convention. :class:`PromptTeacher` adds the frozen text encoder: transformers
``CLIPTextModelWithProjection`` + tokenizer loaded with ``from_pretrained`` from a diffusers-layout folder
(``transformer/``, ``text_encoder/``, ``tokenizer/``), run once per batch (penultimate hidden state and pooled
projection, as the official Meissonic distillation feeds them).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dimo_lightning.assets import asset_path
from dimo_lightning.core.conditions import TextCondition, condition_batch_size, repeat_condition
from dimo_lightning.nn.meissonic import MeissonicTransformer
from dimo_lightning.teachers.base import MaskedTeacher
from dimo_lightning.tokenizers.patch_vq import PatchVQTokenizer

T2I_TEACHER_ASSET = "mnist_t2i_teacher"  # the shipped captioned-MNIST teacher folder under assets/


class TextConditionalTeacher(MaskedTeacher):
    """Base of prompt teachers: ``self.network`` is a MeissonicTransformer, ``self.tokenizer`` decodes codes.

    Subclasses set ``self.network`` and ``self.tokenizer`` and implement :meth:`encode_prompts`.

    The unconditional branch (``drop_condition`` True): for the teacher's own network (its CFG, in targets and in
    multi-step sampling) the negative-prompt embedding when ``negative_prompt`` is set, else the empty prompt's; for
    any other network (aux condition drop, a student) always the empty prompt's, as the official recipe does
    (``distil_neg_prompt``; docs/method.md#targets-and-the-divergence). Both are computed once per device and
    cached.

    Args:
        grid_size: token grid side (N = grid_size^2).
        negative_prompt: optional negative prompt for the teacher's CFG.
        timestep: the network's timestep input, a fraction in [0, 1] (x1000 inside). The official distillation
            always passes 0 (a long cast of the mask ratio), so 0 reproduces it.
        micro_conds: the 5 micro-conditions given to every sample; None uses the network's default
            (1024, 1024, 0, 0, 6) of the released model.
    """

    network: MeissonicTransformer

    def __init__(self, grid_size: int, negative_prompt: str | None = None, timestep: float = 0.0,
                 micro_conds: list[float] | None = None) -> None:
        super().__init__()
        if grid_size < 1:
            raise ValueError(f"grid_size must be >= 1, got {grid_size}")
        if not 0.0 <= timestep <= 1.0:
            raise ValueError(f"timestep must lie in [0, 1] (it is multiplied by 1000 inside), got {timestep}")
        if micro_conds is not None and len(micro_conds) != 5:
            raise ValueError(f"micro_conds must hold 5 values (width, height, crop top, crop left, aesthetic), got "
                             f"{micro_conds}")
        if negative_prompt is not None and not negative_prompt.strip():
            raise ValueError("negative_prompt must be None or a non-empty string")
        self.grid_size = grid_size
        self.negative_prompt = negative_prompt
        self.timestep = timestep
        self.micro_conds = None if micro_conds is None else [float(v) for v in micro_conds]
        self._cache: dict[tuple[str, str], TextCondition] = {}

    # ---- vocabulary and grid --------------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.network.codebook_size

    @property
    def mask_id(self) -> int:
        return self.network.mask_id

    @property
    def logit_width(self) -> int:
        return self.network.codebook_size  # Meissonic scores codes only (no mask slot)

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (self.grid_size, self.grid_size)

    # ---- conditions ----------------------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> TextCondition:
        """Encode prompts (B strings) with the frozen text encoder -> TextCondition of batch B (no micro_conds)."""

    def _with_micro_conds(self, cond: TextCondition) -> TextCondition:
        if self.micro_conds is None or cond.micro_conds is not None:
            return cond
        micro = torch.tensor(self.micro_conds, device=cond.device).expand(cond.batch_size, -1)
        return replace(cond, micro_conds=micro)

    def encode_condition(self, batch: Any) -> TextCondition:
        """A batch of prompts (list of strings) -> TextCondition; a TextCondition passes through."""
        if isinstance(batch, TextCondition):
            return self._with_micro_conds(batch)
        if isinstance(batch, str) or not all(isinstance(p, str) for p in batch):
            raise TypeError(f"{type(self).__name__} expects a batch of prompts (a list of strings)")
        with torch.no_grad():
            return self._with_micro_conds(self.encode_prompts(list(batch)))

    def cached_condition(self, which: str, device: torch.device) -> TextCondition:
        """The (1-row) embedding of the empty prompt (``"null"``) or of the negative prompt (``"negative"``),
        encoded once per device."""
        key = (which, str(device))
        if key not in self._cache:
            prompt = "" if which == "null" else self.negative_prompt
            if prompt is None:
                raise ValueError("no negative_prompt was given")
            with torch.no_grad():
                self._cache[key] = self.encode_prompts([prompt]).to(device)
        return self._cache[key]

    def unconditional(self, network: nn.Module, device: torch.device) -> TextCondition:
        """What the unconditional branch of ``network`` sees (see the class docstring)."""
        use_negative = network is self.network and self.negative_prompt is not None
        return self.cached_condition("negative" if use_negative else "null", device)

    def condition_batch_size(self, cond: TextCondition) -> int:
        return condition_batch_size(cond)

    def repeat_condition(self, cond: TextCondition, repeats: int) -> TextCondition:
        return repeat_condition(cond, repeats)

    def apply_network(
        self,
        network: nn.Module,
        codes: torch.Tensor,
        cond: TextCondition,
        drop_condition: torch.Tensor | None = None,
        emb_noise_sigma: float | torch.Tensor = 0.0,
        emb_noise_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if drop_condition is not None and bool(drop_condition.any()):
            uncond = self.unconditional(network, codes.device)
            # Swap the text (states, pooled, mask) only: micro-conditions describe the image, not the prompt.
            text = replace(cond, micro_conds=None).where(drop_condition, replace(uncond, micro_conds=None))
            cond = replace(text, micro_conds=cond.micro_conds)
        return network(codes, cond.hidden_states, cond.pooled, cond.micro_conds, self.timestep, emb_noise_sigma,
                       emb_noise_scale, generator)

    def frozen_parameter_names(self) -> list[str]:
        # The official fix_emb_layer freezes the whole token embedding and the MLM head
        # (docs/method.md#official-defaults).
        return [n for n, _ in self.network.named_parameters() if n.startswith(("embed.", "mlm_layer."))]

    # ---- images ----------------------------------------------------------------------------------------------------
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_codes(codes, allow_mask=False)
        return self.tokenizer.decode(codes.reshape(-1, self.grid_size, self.grid_size))


class PromptTeacher(TextConditionalTeacher):
    """A text-to-image teacher in the diffusers folder layout, with a frozen CLIP text encoder.

    ``path`` holds ``transformer/`` (config.json + diffusion_pytorch_model safetensors, see
    :meth:`MeissonicTransformer.from_pretrained`), ``text_encoder/`` (a transformers
    ``CLIPTextModelWithProjection``) and ``tokenizer/`` (any transformers tokenizer folder: ``AutoTokenizer``).
    Prompts are padded / truncated to ``max_length`` tokens; the hidden states are the encoder's penultimate layer
    (``hidden_states[-2]``, no final LayerNorm) and the pooled embedding its ``text_embeds``, as in the official
    Meissonic distillation.

    Args:
        path: the teacher folder; None loads the shipped captioned-MNIST teacher (``assets/mnist_t2i_teacher``,
            rebuilt by ``make assets``).
        codebook: the PatchVQ codebook (safetensors) that decodes the codes; None uses ``path/codebook.safetensors``.
        grid_size: token grid side (7 for 28x28 MNIST with 4x4 patches).
        max_length: tokenizer length; None uses the text encoder's ``max_position_embeddings``.
        negative_prompt: optional negative prompt for the teacher's CFG.
        timestep: see :class:`TextConditionalTeacher`.
        micro_conds: see :class:`TextConditionalTeacher`.
    """

    def __init__(
        self,
        path: str | None = None,
        codebook: str | None = None,
        grid_size: int = 7,
        max_length: int | None = None,
        negative_prompt: str | None = None,
        timestep: float = 0.0,
        micro_conds: list[float] | None = None,
    ) -> None:
        super().__init__(grid_size, negative_prompt, timestep, micro_conds)
        root = Path(path) if path is not None else asset_path(T2I_TEACHER_ASSET)
        for sub in ("transformer", "text_encoder", "tokenizer"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(
                    f"prompt teacher folder {root} lacks {sub}/ (expected the diffusers layout transformer/, "
                    "text_encoder/, tokenizer/)" + ("; `make assets` rebuilds the shipped one" if path is None else "")
                )
        self.network = MeissonicTransformer.from_pretrained(root / "transformer")
        codebook_path = Path(codebook) if codebook is not None else root / "codebook.safetensors"
        if not codebook_path.is_file():
            raise FileNotFoundError(f"prompt teacher codebook not found: {codebook_path}")
        self.tokenizer = PatchVQTokenizer.from_file(str(codebook_path))
        if self.tokenizer.codebook_size != self.network.codebook_size:
            raise ValueError(f"codebook {codebook_path} has {self.tokenizer.codebook_size} codes but the transformer "
                             f"in {root / 'transformer'} expects {self.network.codebook_size}")
        self.text_encoder, self.text_tokenizer = load_clip_text_encoder(root / "text_encoder", root / "tokenizer")
        config = self.text_encoder.config
        if config.hidden_size != self.network.config["joint_attention_dim"] or (
            config.projection_dim != self.network.config["pooled_projection_dim"]
        ):
            raise ValueError(
                f"text encoder of {root} gives states of width {config.hidden_size} and pooled {config.projection_dim}"
                f", the transformer expects {self.network.config['joint_attention_dim']} and "
                f"{self.network.config['pooled_projection_dim']}"
            )
        self.max_length = max_length or config.max_position_embeddings
        self.eval().requires_grad_(False)

    def encode_prompts(self, prompts: list[str]) -> TextCondition:
        return encode_with_clip(self.text_encoder, self.text_tokenizer, prompts, self.max_length)


# ---- the frozen CLIP text encoder, shared by every prompt teacher ---------------------------------------------------
# Keys a transformers CLIP checkpoint may hold that the model does not (a non-persistent buffer in newer versions).
_IGNORABLE_TEXT_ENCODER_KEYS = ("text_model.embeddings.position_ids",)


def load_clip_text_encoder(encoder_folder: Path, tokenizer_folder: Path, variant: str | None = None):
    """A frozen transformers ``CLIPTextModelWithProjection`` (float32, eval mode) and its tokenizer -> (encoder,
    tokenizer), loaded strictly: missing, unexpected or mis-shaped weights fail with the folder named.

    Args:
        encoder_folder: ``text_encoder/`` (config.json + model.safetensors, or model.fp16.safetensors).
        tokenizer_folder: ``tokenizer/`` (any transformers tokenizer folder; CLIPTokenizer for the released models).
        variant: None (the fp32 file; the fp16 one when only it exists) or "fp16".
    """
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    if variant is None and not (encoder_folder / "model.safetensors").is_file() and (
        (encoder_folder / "model.fp16.safetensors").is_file()
    ):
        variant = "fp16"
    try:
        encoder, info = CLIPTextModelWithProjection.from_pretrained(
            str(encoder_folder), variant=variant, dtype=torch.float32, output_loading_info=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the text encoder {encoder_folder} / tokenizer {tokenizer_folder}: {err}") \
            from err
    problems = {kind: [k for k in info.get(kind, []) if not (isinstance(k, str) and k in _IGNORABLE_TEXT_ENCODER_KEYS)]
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        listed = "; ".join(f"{len(keys)} {kind.replace('_', ' ')}: {', '.join(map(str, keys[:4]))}"
                           for kind, keys in problems.items())
        raise ValueError(f"text encoder {encoder_folder} does not match its config.json ({listed})")
    return encoder.eval().requires_grad_(False), tokenizer


def encode_with_clip(text_encoder: nn.Module, tokenizer: Any, prompts: list[str], max_length: int) -> TextCondition:
    """Prompts (B strings) -> TextCondition: ``hidden_states[-2]`` (B, max_length, D), the penultimate layer without
    the final LayerNorm, and the pooled projection ``text_embeds`` (B, Dp), as the Meissonic / aMUSEd pipelines feed
    their transformers. Prompts are padded and truncated to ``max_length`` tokens."""
    device = next(text_encoder.parameters()).device
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    was_training = text_encoder.training
    text_encoder.eval()  # frozen and deterministic, whatever mode the module around it is in
    try:
        out = text_encoder(input_ids=tokens["input_ids"].to(device), output_hidden_states=True)
    finally:
        text_encoder.train(was_training)
    return TextCondition(hidden_states=out.hidden_states[-2], pooled=out.text_embeds)
