"""LLaDATeacher: LLaDA (``GSAI-ML/LLaDA-8B-Base`` / ``-Instruct``, Nie et al. 2025) as a Di[M]O teacher.

Weights: the Hub folder (``config.json``, ``model.safetensors.index.json`` and its bf16 shards, MIT), loaded strictly
by :func:`dimo_lightning.nn.llada.load_llada`; the tokenizer files sit in the same folder. The mask id is the config's
``mask_token_id`` (126336, ``<|mdm_mask|>``); the network has no timestep input.

Vocabulary: the student and the targets see the ids below the mask, [0, 126336) (``codebook_size`` = ``mask_id``, as
every teacher here): the ids past it, the special tokens from ``<|mdm_mask|>`` on (``<|start_header_id|>``,
``<|end_header_id|>``, ``<|eot_id|>``) and the untrained padding rows up to the embedding size 126464, are never
generated (LLaDA's ``generate.py`` takes its argmax over all 126464 ids). They may still appear in a prompt (an Instruct
chat template), which the network reads as it is. Completions end in ``<|endoftext|>`` (126081, inside the range)
padding, as LLaDA's are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dimo_lightning.core.text_decoding import REMASKING, block_decode
from dimo_lightning.nn.llada import LAYOUT, LLaDA, load_llada
from dimo_lightning.teachers.sequence import SequenceTeacher, parse_dtype
from dimo_lightning.tokenizers.text import load_text_tokenizer


class LLaDATeacher(SequenceTeacher):
    """LLaDA teacher: an :class:`~dimo_lightning.nn.llada.LLaDA` transformer (frozen, eval mode) and its tokenizer.

    Args:
        checkpoint: the model folder (config.json, model.safetensors.index.json, shards; the released layout).
        tokenizer: the tokenizer folder; None: the checkpoint folder (where the release keeps it).
        seq_len: L, the generated length (prompt included); None: the config's ``max_sequence_length`` (4096).
        dtype: parameter dtype, "bfloat16" (the release; 16 GB for 8B) or "float32". The copies (student, aux)
            share it.
        gradient_checkpointing: recompute each block in backward: the student and aux copies inherit the flag (with
            FSDP's own activation checkpointing leave it off); the frozen teacher never recomputes.
        decoding: the default decoder of :meth:`sample`: "block" (LLaDA's remasking with semi-autoregressive blocks)
            or "maskgit".
        block_length: block decoding's block size in tokens; None: one block over the whole generated part.
        remasking: block decoding's choice of positions to reveal, "low_confidence" or "random".
        temperature: block decoding's Gumbel temperature (0, LLaDA's default: greedy).
        skip_special_tokens: drop special tokens (``<|endoftext|>`` padding, ``<|eot_id|>``) when decoding text,
            as LLaDA's ``generate.py`` does.
        chat_template: wrap each prompt in the tokenizer's chat template as one user turn with the generation prompt
            (``apply_chat_template``), as ``generate.py`` does for LLaDA-8B-Instruct; off for the Base model.
    """

    DECODINGS = ("block", "maskgit")
    network: LLaDA

    def __init__(
        self,
        checkpoint: str,
        tokenizer: str | None = None,
        seq_len: int | None = None,
        dtype: str = "bfloat16",
        gradient_checkpointing: bool = False,
        decoding: str = "block",
        block_length: int | None = None,
        remasking: str = "low_confidence",
        temperature: float = 0.0,
        skip_special_tokens: bool = True,
        chat_template: bool = False,
    ) -> None:
        super().__init__()
        torch_dtype = parse_dtype(dtype)
        self.block_length, self.remasking, self.temperature = _block_options(block_length, remasking, temperature)
        folder = Path(checkpoint)
        if not folder.is_dir():
            raise FileNotFoundError(f"LLaDA checkpoint folder {folder} not found. Expected {LAYOUT}")
        tokenizer_folder = folder if tokenizer is None else Path(tokenizer)
        self.text_tokenizer = load_text_tokenizer(tokenizer_folder, "the tokenizer files of the LLaDA release "
                                                                    "(tokenizer.json, tokenizer_config.json)")
        if chat_template and not getattr(self.text_tokenizer, "chat_template", None):
            raise ValueError(f"chat_template is on but the tokenizer in {tokenizer_folder} has no chat template (the "
                             "LLaDA-8B-Instruct release has one in tokenizer_config.json; Base prompts go as they are)")
        self.chat_template = chat_template
        self.network = load_llada(folder, self.text_tokenizer, dtype=torch_dtype,
                                  gradient_checkpointing=gradient_checkpointing)
        config = self.network.config
        self._set_sequence(config.max_sequence_length if seq_len is None else seq_len, config.max_sequence_length,
                           config.mask_token_id, decoding, skip_special_tokens, f"the LLaDA in {folder}")
        self.eval().requires_grad_(False)

    def prompt_texts(self, prompts: Sequence[str]) -> list[str]:
        if not self.chat_template:
            return list(prompts)
        return [self.text_tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                        tokenize=False) for p in prompts]

    def _forward(self, network: nn.Module, codes: torch.Tensor, embeds: torch.Tensor | None,
                 sigma: torch.Tensor | None) -> torch.Tensor:
        return network(input_ids=codes) if embeds is None else network(inputs_embeds=embeds)

    def frozen_parameter_names(self) -> list[str]:
        # The input table and the (untied) output projection: 2 x 518M of the 8B parameters.
        return ["model.transformer.wte.weight", "model.transformer.ff_out.weight"]

    def _decode(self, decoding: str, logits_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                initial: torch.Tensor, steps: int, softmax_temperature: float,
                generator: torch.Generator | None, block_length: int | None = None, remasking: str | None = None,
                temperature: float | None = None, **options: Any) -> torch.Tensor:
        """``decoding="block"``: :func:`~dimo_lightning.core.text_decoding.block_decode`; its options
        ``block_length``, ``remasking``, ``temperature`` (None: the teacher's)."""
        if options:
            raise TypeError(f"LLaDA's block decoding has no options {sorted(options)} (it takes block_length, "
                            "remasking, temperature)")
        block, remask, temp = _block_options(self.block_length if block_length is None else block_length,
                                             self.remasking if remasking is None else remasking,
                                             self.temperature if temperature is None else temperature)
        return block_decode(lambda codes: logits_fn(codes, None), initial, self.mask_id, steps,
                            block or self.seq_len, remasking=remask, temperature=temp,
                            softmax_temperature=softmax_temperature, generator=generator)


def _block_options(block_length: int | None, remasking: str, temperature: float) -> tuple[int | None, str, float]:
    if block_length is not None and block_length < 1:
        raise ValueError(f"block_length must be >= 1 (or None: one block), got {block_length}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {', '.join(REMASKING)}, got {remasking!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    return block_length, remasking, float(temperature)
