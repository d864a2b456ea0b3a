"""MDLMTeacher: MDLM (``kuleshov-group/mdlm-owt``, Sahoo et al. 2024) as a Di[M]O teacher over GPT-2 tokens.

Weights: the Hub folder ``kuleshov-group/mdlm-owt`` (``config.json`` + ``model.safetensors``, apache-2.0), loaded
strictly by :func:`dimo_lightning.nn.mdlm.load_mdlm`; tokenizer: GPT-2's (a separate folder, e.g. a download of
``gpt2``), whose 50257 ids are followed by MDLM's appended mask (id 50257, vocabulary 50258).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dimo_lightning.assets import resolve_asset
from dimo_lightning.core.text_decoding import SAMPLING_PRECISIONS, ancestral_decode, loglinear_sigma
from dimo_lightning.nn.mdlm import LAYOUT, MDLM, load_mdlm
from dimo_lightning.teachers.sequence import SequenceTeacher, parse_dtype
from dimo_lightning.tokenizers.text import load_text_tokenizer

TOKENIZER_LAYOUT = ("a GPT-2 tokenizer folder (tokenizer.json, or vocab.json + merges.txt), e.g. a download of the "
                    "Hugging Face repo gpt2, given as --model.init_args.teacher.init_args.tokenizer (the mdlm-owt "
                    "release has none); MDLM's vocabulary is its ids plus one appended mask")


class MDLMTeacher(SequenceTeacher):
    """MDLM teacher: an :class:`~dimo_lightning.nn.mdlm.MDLM` DiT (frozen, eval mode) and its GPT-2 tokenizer.

    Logits: the network's raw logits over the K = vocab_size - 1 non-mask ids, the SUBS distribution at masked
    positions (:mod:`dimo_lightning.teachers.sequence` says why the mask slot is cut rather than set to -inf). A
    time-conditioned MDLM (``time_conditioning`` true in config.json; the released model is not) gets, outside its own
    sampler, the log-linear sigma of each row's share of masked positions.

    Args:
        checkpoint: the model folder (config.json + model.safetensors, the mdlm-owt layout); ``asset:text_teacher``
            is the shipped Bible teacher.
        tokenizer: the tokenizer folder; None: the checkpoint folder (``asset:text_teacher/tokenizer``: the shipped
            BPE).
        seq_len: L, the generated length (prompt included), at most the model's ``model_length`` (1024 for
            mdlm-owt, its default).
        dtype: parameter dtype, "float32" (the released file) or "bfloat16". The copies (student, aux) share it.
        bf16_autocast: run the blocks under bf16 autocast on CUDA, as the reference does (off: the parameters'
            dtype throughout).
        gradient_checkpointing: recompute each block in backward (the student and aux copies inherit the flag; the
            frozen teacher, run without gradients, never recomputes).
        decoding: the default decoder of :meth:`sample`: "ancestral" (MDLM's sampler) or "maskgit".
        sampling_precision: the ancestral sampler's precision, "float64" (default) or "float32" (the original
            code's; it lowers the samples' entropy, arXiv:2409.02908).
        skip_special_tokens: drop special tokens (GPT-2's <|endoftext|>) when decoding text; MDLM's own sample
            decoding keeps them (False).
    """

    DECODINGS = ("ancestral", "maskgit")
    network: MDLM

    def __init__(
        self,
        checkpoint: str,
        tokenizer: str | None = None,
        seq_len: int | None = None,
        dtype: str = "float32",
        bf16_autocast: bool = True,
        gradient_checkpointing: bool = False,
        decoding: str = "ancestral",
        sampling_precision: str = "float64",
        skip_special_tokens: bool = False,
    ) -> None:
        super().__init__()
        torch_dtype = parse_dtype(dtype)
        if sampling_precision not in SAMPLING_PRECISIONS:
            raise ValueError(f"sampling_precision must be one of {', '.join(SAMPLING_PRECISIONS)}, got "
                             f"{sampling_precision!r}")
        folder = resolve_asset(checkpoint, "MDLMTeacher.checkpoint")
        if not folder.is_dir():
            raise FileNotFoundError(f"MDLM checkpoint folder {folder} not found. Expected {LAYOUT}")
        tokenizer_folder = folder if tokenizer is None else resolve_asset(tokenizer, "MDLMTeacher.tokenizer")
        self.text_tokenizer = load_text_tokenizer(tokenizer_folder, TOKENIZER_LAYOUT)
        self.network = load_mdlm(folder, self.text_tokenizer, dtype=torch_dtype,
                                 gradient_checkpointing=gradient_checkpointing)
        self.network.bf16_autocast_on_cuda = bf16_autocast
        config = self.network.config
        self.sampling_precision = sampling_precision
        self._set_sequence(config.model_length if seq_len is None else seq_len, config.model_length,
                           config.mask_id, decoding, skip_special_tokens, f"the MDLM in {folder}")
        self.eval().requires_grad_(False)

    def _forward(self, network: nn.Module, codes: torch.Tensor, embeds: torch.Tensor | None,
                 sigma: torch.Tensor | None) -> torch.Tensor:
        if sigma is None and network.config.time_conditioning:
            sigma = loglinear_sigma((codes == self.mask_id).float().mean(dim=1))
        if embeds is None:
            return network(input_ids=codes, sigma=sigma)
        return network(sigma=sigma, inputs_embeds=embeds)

    def frozen_parameter_names(self) -> list[str]:
        # What maps tokens to and from the hidden space: the input table and the (untied) output projection. The
        # final layer's norm and adaLN modulation stay trainable.
        return ["backbone.vocab_embed.embedding", "backbone.output_layer.linear.weight",
                "backbone.output_layer.linear.bias"]

    def _decode(self, decoding: str, logits_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                initial: torch.Tensor, steps: int, softmax_temperature: float,
                generator: torch.Generator | None, sampling_precision: str | None = None,
                **options: Any) -> torch.Tensor:
        """``decoding="ancestral"``: :func:`~dimo_lightning.core.text_decoding.ancestral_decode`; its option
        ``sampling_precision`` (None: the teacher's)."""
        if options:
            raise TypeError(f"MDLM's ancestral decoding has no options {sorted(options)} (it takes "
                            "sampling_precision)")
        return ancestral_decode(
            logits_fn, initial, self.mask_id, steps,
            precision=self.sampling_precision if sampling_precision is None else sampling_precision,
            softmax_temperature=softmax_temperature, cache=not self.network.config.time_conditioning,
            generator=generator,
        )
