"""Export and Lightning-free sampling of *prompt* (text-to-image) students: the text side of ``dimo export``.

A prompt student (distilled from a :class:`~dimo_lightning.teachers.prompt.TextConditionalTeacher` with a CLIP text
encoder: :class:`~dimo_lightning.teachers.prompt.PromptTeacher`, the Meissonic / aMUSEd teachers) is exported in the
"dimo" format as a class student is (``model.safetensors``, ``config.json``, ``tokenizer.safetensors``), plus

* ``text_encoder/``: the teacher's frozen transformers ``CLIPTextModelWithProjection`` (``config.json`` +
  ``model.safetensors``, float32 as the teacher holds it), written by ``save_pretrained``;
* ``text_tokenizer/``: its tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ...), written by the tokenizer
  library's ``save_pretrained``;
* ``config.json["conditioning"]``: ``{"type": "prompt"}`` with how prompts become the network's inputs (token length,
  penultimate hidden states + pooled projection, micro-conditions, timestep, token grid).

Classifier-free guidance is not part of sampling: the one-step student takes the prompt alone (the teacher's CFG scale
and negative prompt shaped its training targets only; they are kept in the record for reference).

The text encoder is not in the Lightning checkpoint (the teacher never is): ``dimo export`` reads it from the teacher
folders recorded in the checkpoint, and checks that it still encodes the empty prompt as the one the student was
trained with. This module imports torch, safetensors, transformers and the network classes: never Lightning.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dimo_lightning.core.conditions import TextCondition
from dimo_lightning.core.weight_files import give_default_mode
from dimo_lightning.teachers.prompt import encode_with_clip, load_clip_text_encoder

TEXT_ENCODER_DIR = "text_encoder"
TEXT_TOKENIZER_DIR = "text_tokenizer"
CLIP_TEXT_ENCODER = "CLIPTextModelWithProjection"
# Relative L2 difference allowed between the empty prompt's pooled embedding at training and at export: another
# encoder is off by ~1; the same one on another device or held in bf16 (precision="bf16-true") by ~1e-2 at most.
NULL_EMBEDDING_TOLERANCE = 0.1
NO_GUIDANCE = ("none: the one-step student is conditioned on the prompt alone; the teacher's guidance "
               "(teacher_cfg_scale, teacher_negative_prompt) shaped its training targets only")


# ---- the record written into every checkpoint of a prompt student -------------------------------------------------
_NULL_POOLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # teacher -> its empty prompt's pooled embedding


def text_encoder_source(teacher: nn.Module) -> dict[str, Any] | None:
    """Where the teacher's text encoder and tokenizer were loaded from, or None when they cannot be exported (no
    transformers CLIP encoder loaded from a folder, e.g. a teacher with its own ``encode_prompts``)."""
    encoder = getattr(teacher, "text_encoder", None)
    tokenizer = getattr(teacher, "text_tokenizer", None)
    if encoder is None or tokenizer is None or type(encoder).__name__ != CLIP_TEXT_ENCODER:
        return None
    encoder_folder = Path(str(getattr(encoder.config, "name_or_path", "") or ""))
    tokenizer_folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if not (encoder_folder.is_dir() and tokenizer_folder.is_dir()):
        return None  # built in memory (or from a hub name): nothing to copy from
    return {"class_path": f"{type(encoder).__module__}.{type(encoder).__qualname__}",
            "text_encoder": str(encoder_folder.resolve()), "text_tokenizer": str(tokenizer_folder.resolve())}


def prompt_conditioning_record(teacher: nn.Module, device: torch.device, teacher_cfg_scale: float) -> dict[str, Any]:
    """The ``conditioning`` export record of a prompt teacher (called on every rank when a checkpoint is saved).

    ``null_pooled`` (Dp,) is the pooled embedding of the empty prompt (one encoder pass per teacher and process,
    outside autocast), the reference against which ``dimo export`` checks the encoder it reads back.
    """
    source = text_encoder_source(teacher)
    null_pooled = None
    if source is not None:
        if teacher not in _NULL_POOLED:
            with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
                _NULL_POOLED[teacher] = teacher.encode_prompts([""]).pooled[0].detach().float().cpu()
        null_pooled = _NULL_POOLED[teacher]
    return {
        "type": "prompt",
        "grid_size": int(teacher.grid_size),
        "max_length": int(getattr(teacher, "max_length", 0)) or None,
        "timestep": float(teacher.timestep),
        "micro_conds": teacher.micro_conds,
        "source": source,
        "null_pooled": null_pooled,
        "teacher_class": f"{type(teacher).__module__}.{type(teacher).__qualname__}",
        "teacher_cfg_scale": teacher_cfg_scale,
        "teacher_negative_prompt": teacher.negative_prompt,
    }


# ---- export -------------------------------------------------------------------------------------------------------
def export_prompt_conditioning(record: Mapping[str, Any], network: Mapping[str, Any], out: Path, ckpt_path: Any,
                               variant: str | None = None) -> dict[str, Any]:
    """Write ``out/text_encoder/`` and ``out/text_tokenizer/`` from the teacher folders in ``record``; return the
    ``conditioning`` entry of config.json.

    Args:
        record: the checkpoint's conditioning record (:func:`prompt_conditioning_record`).
        network: the student's network record (its text widths are checked against the encoder's).
        out: the export folder.
        ckpt_path: the checkpoint, for messages.
        variant: the teacher's weight variant ("fp16" or None), as its record gives it.
    """

    source = record.get("source")
    if source is None:
        raise ValueError(f"cannot export {ckpt_path}: its prompt teacher ({record.get('teacher_class')}) has no "
                         "transformers CLIPTextModelWithProjection + tokenizer loaded from folders, so its text "
                         "encoder cannot be exported")
    encoder_folder, tokenizer_folder = Path(source["text_encoder"]), Path(source["text_tokenizer"])
    for folder in (encoder_folder, tokenizer_folder):
        if not folder.is_dir():
            raise FileNotFoundError(f"cannot export {ckpt_path}: the teacher's text encoder folder {folder} (recorded "
                                    "at training) is gone; the export copies the text encoder from there")
    encoder, tokenizer = load_clip_text_encoder(encoder_folder, tokenizer_folder, variant)
    widths = dict(network.get("init_args") or {})
    config = encoder.config
    if (widths.get("joint_attention_dim"), widths.get("pooled_projection_dim")) != (config.hidden_size,
                                                                                     config.projection_dim):
        raise ValueError(f"the text encoder in {encoder_folder} gives widths {config.hidden_size} / "
                         f"{config.projection_dim}, the student of {ckpt_path} expects "
                         f"{widths.get('joint_attention_dim')} / {widths.get('pooled_projection_dim')}")
    max_length = record.get("max_length") or config.max_position_embeddings
    reference = record.get("null_pooled")
    if reference is not None:
        pooled = encode_with_clip(encoder, tokenizer, [""], max_length).pooled[0].float()
        difference = float((pooled - reference).norm() / reference.norm().clamp_min(1e-12))
        if difference > NULL_EMBEDDING_TOLERANCE:
            raise ValueError(f"the text encoder in {encoder_folder} is not the one the student of {ckpt_path} was "
                             f"trained with (the empty prompt's embedding differs by {difference:.3g} relative): the "
                             "teacher folder changed since training")
    encoder.save_pretrained(str(out / TEXT_ENCODER_DIR))
    give_default_mode((out / TEXT_ENCODER_DIR).glob("*.safetensors"))  # written 0600 by safetensors
    tokenizer.save_pretrained(str(out / TEXT_TOKENIZER_DIR))
    return {
        "type": "prompt",
        "text_encoder": TEXT_ENCODER_DIR,
        "text_encoder_class": source["class_path"],
        "text_tokenizer": TEXT_TOKENIZER_DIR,
        "max_length": int(max_length),
        "hidden_states": "penultimate",  # hidden_states[-2], no final LayerNorm, as Meissonic conditions on
        "pooled": "text_embeds",
        "micro_conds": record.get("micro_conds"),
        "timestep": float(record.get("timestep", 0.0)),
        "grid_size": int(record["grid_size"]),
        "guidance": NO_GUIDANCE,
        "teacher_cfg_scale": record.get("teacher_cfg_scale"),
        "teacher_negative_prompt": record.get("teacher_negative_prompt"),
        "source": {"text_encoder": str(encoder_folder), "text_tokenizer": str(tokenizer_folder)},
    }


# ---- loading ------------------------------------------------------------------------------------------------------
def load_prompt_encoder(conditioning: Mapping[str, Any], folder: Path) -> tuple[nn.Module, Any]:
    """The exported text encoder and tokenizer of an export folder -> (encoder, tokenizer)."""

    encoder_folder = folder / conditioning["text_encoder"]
    tokenizer_folder = folder / conditioning["text_tokenizer"]
    for part in (encoder_folder, tokenizer_folder):
        if not part.is_dir():
            raise FileNotFoundError(f"not a complete prompt-student export: {part} is missing (write it with "
                                    "`dimo export`)")
    return load_clip_text_encoder(encoder_folder, tokenizer_folder)


def check_prompts(prompts: Sequence[str] | str, flag: str = "prompts") -> list[str]:
    """A list of prompt strings (a single string is one prompt); a clear error naming ``flag`` otherwise."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
    if bad is not None:
        raise ValueError(f"{flag} must be strings (a text-to-image student); item {bad} is "
                         f"{type(prompts[bad]).__name__}")
    return prompts


def encode_prompts(encoder: nn.Module, tokenizer: Any, prompts: list[str], conditioning: Mapping[str, Any],
                   device: torch.device) -> TextCondition:
    """Prompts (B strings) -> the TextCondition the student network consumes, as the teacher builds it:
    ``hidden_states`` (B, L, D), ``pooled`` (B, Dp), and the fixed ``micro_conds`` (B, 5) when the teacher set them."""

    cond = encode_with_clip(encoder, tokenizer, prompts, int(conditioning["max_length"]))
    micro = conditioning.get("micro_conds")
    if micro is not None:
        cond = TextCondition(cond.hidden_states, cond.pooled, cond.attention_mask,
                             torch.tensor(micro, device=cond.device).expand(cond.batch_size, -1))
    return cond.to(device)


class PromptConditioner(nn.Module):
    """Prompts and the tokenizer of an exported prompt student: prompts -> the frozen text encoder -> the
    TextCondition the student network consumes (as the teacher builds it); codes -> images.

    Args:
        tokenizer: decodes codes (B, h, w) to images (B, C, H, W) in [0, 1].
        text_encoder: the teacher's ``CLIPTextModelWithProjection``.
        text_tokenizer: its tokenizer.
        conditioning: the ``conditioning`` entry of config.json (``max_length``, ``micro_conds``, ``timestep``,
            ``grid_size``).
        codebook_size: K, the image codes.
        mask_id: id of the mask token.
    """

    conditioning_type = "prompt"  # what config.json["conditioning"]["type"] says

    def __init__(self, tokenizer: nn.Module, text_encoder: nn.Module, text_tokenizer: Any,
                 conditioning: Mapping[str, Any], codebook_size: int, mask_id: int) -> None:
        super().__init__()
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.text_tokenizer = text_tokenizer
        self.conditioning = dict(conditioning)
        self.codebook_size = int(codebook_size)
        self.mask_id = int(mask_id)

    @property
    def grid_size(self) -> int:
        return int(self.conditioning["grid_size"])

    @property
    def seq_len(self) -> int:
        return self.grid_size ** 2

    @property
    def timestep(self) -> float:
        return float(self.conditioning.get("timestep", 0.0))

    def encode(self, prompts: Sequence[str] | str) -> TextCondition:
        """Prompts (B strings) -> TextCondition on the text encoder's device."""
        prompts = check_prompts(prompts)
        device = next(self.text_encoder.parameters()).device
        return encode_prompts(self.text_encoder, self.text_tokenizer, prompts, self.conditioning, device)

    def encode_condition(self, conditions: Any) -> TextCondition:
        if isinstance(conditions, TextCondition):
            return conditions
        if isinstance(conditions, torch.Tensor):
            raise ValueError("this is a text-to-image student: give prompts (strings), not class labels")
        return self.encode(conditions)

    def condition_batch_size(self, cond: TextCondition) -> int:
        return cond.batch_size

    def apply_network(self, network: nn.Module, codes: torch.Tensor, cond: TextCondition,
                      drop_condition: torch.Tensor | None = None, emb_noise_sigma: float = 0.0,
                      emb_noise_scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        if drop_condition is not None:
            raise ValueError("an exported prompt student samples without guidance: no dropped conditions")
        return network(codes, cond.hidden_states, cond.pooled, cond.micro_conds, self.timestep, emb_noise_sigma,
                       emb_noise_scale, generator)

    def fix_positions(self, codes: torch.Tensor, cond: Any) -> torch.Tensor:
        """Codes (B, N) unchanged: no position of an image is fixed by its condition."""
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(codes.reshape(-1, self.grid_size, self.grid_size))

    def check_labels(self, labels: Any, flag: str = "labels") -> torch.Tensor:
        raise ValueError(f"{flag}: this is a text-to-image student; give prompts (--prompts FILE or --prompt TEXT)")
