"""One-step text generation without Lightning: the conditioner of an exported text student and a pipeline whose
call returns strings.

A text student (distilled from a sequence teacher: MDLM, LLaDA) generates a token row of the teacher's length ``L``
in one forward. Its condition is a prefix: the prompt's tokens at positions ``[0, n)``, fixed (neither the input
draw nor the sampled tokens change them), the rest generated; an unconditional sample fixes nothing.
:class:`TextConditioner` plays the teacher's part of that contract for an exported student (prompts -> prefix,
the network's forward, decoding to text); :class:`TextPipeline` is the
:class:`~dimo_lightning.inference.pipeline.OneStepPipeline` of such a student::

    pipeline = load_student("exported/")        # dimo_lightning.inference.export.load_student
    pipeline(["In the beginning"], seed=0)      # -> ["In the beginning God ..."] (prompt + completion)
    pipeline(4, seed=0)                         # -> 4 unconditional texts

Texts are decoded with the tokenizer's special tokens kept (``<|endoftext|>`` marks document ends), as the text
metrics and the teacher's samples read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dimo_lightning.core.conditions import PrefixCondition
from dimo_lightning.inference.pipeline import OneStepPipeline
from dimo_lightning.teachers.sequence import noisy_input_embeddings
from dimo_lightning.tokenizers.text import encode_texts


class TextConditioner(nn.Module):
    """Prompts, the network's forward and text decoding of an exported text student.

    Args:
        text_tokenizer: the teacher's tokenizer (a Hugging Face tokenizer).
        seq_len: L, tokens per sample (the teacher's length).
        codebook_size: K, the ids the student may generate (the vocabulary without the mask slot).
        mask_id: the mask id.
    """

    modality = "text"
    conditioning_type = "text"  # what config.json["conditioning"]["type"] says

    def __init__(self, text_tokenizer: Any, seq_len: int, codebook_size: int, mask_id: int) -> None:
        super().__init__()
        self.text_tokenizer = text_tokenizer
        self._seq_len = int(seq_len)
        self.codebook_size = int(codebook_size)
        self.mask_id = int(mask_id)

    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (1, self._seq_len)

    # ---- conditions ----------------------------------------------------------------------------------------------
    def unconditional(self, count: int) -> PrefixCondition:
        """``count`` unconditional samples: nothing fixed."""
        if count < 1:
            raise ValueError(f"the number of texts must be >= 1, got {count}")
        return PrefixCondition.unconditional(count, self._seq_len, self.mask_id)

    def encode_prompts(self, prompts: Sequence[str], flag: str = "prompts") -> PrefixCondition:
        """Prompts -> their ids (no special tokens added) at positions ``[0, n)``, fixed.

        Raises:
            ValueError: a prompt of more than ``L - 1`` ids (at least one position must be generated; the message
                names ``flag`` and the prompt), or one that is not a string.
        """
        prompts = list(prompts)
        bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
        if bad is not None:
            raise ValueError(f"{flag}: a text student takes prompt strings or a number of texts; item {bad} is "
                             f"{type(prompts[bad]).__name__}")
        ids = encode_texts(self.text_tokenizer, prompts)  # as the teacher tokenises them
        tokens = torch.full((len(prompts), self._seq_len), self.mask_id, dtype=torch.long)
        fixed = torch.zeros_like(tokens, dtype=torch.bool)
        for row, (prompt, prompt_ids) in enumerate(zip(prompts, ids)):
            if len(prompt_ids) > self._seq_len - 1:
                raise ValueError(f"{flag}: the prompt {prompt[:60]!r} has {len(prompt_ids)} tokens; at most "
                                 f"{self._seq_len - 1} fit ahead of a completion of this {self._seq_len}-token student")
            tokens[row, :len(prompt_ids)] = torch.as_tensor(prompt_ids, dtype=torch.long)
            fixed[row, :len(prompt_ids)] = True
        return PrefixCondition(tokens, fixed)

    def encode_condition(self, conditions: Any) -> Any:
        """A prefix condition from: a prepared one (returned as is), a number of unconditional texts (an int or a
        0-d tensor), a (B,) integer tensor (B unconditional texts: sample indices, as a DataModule yields them), a
        prompt string or a list of prompts."""
        if isinstance(conditions, PrefixCondition):
            return conditions
        if isinstance(conditions, bool):
            raise ValueError("give prompt strings or a number of texts, not a bool")
        if isinstance(conditions, int):
            return self.unconditional(conditions)
        if isinstance(conditions, torch.Tensor):
            if conditions.is_floating_point():
                raise ValueError("give prompt strings or a number of texts, not a float tensor")
            return self.unconditional(int(conditions) if conditions.ndim == 0 else len(conditions))
        if isinstance(conditions, str):
            conditions = [conditions]
        return self.encode_prompts(conditions)

    def condition_batch_size(self, cond: Any) -> int:
        return int(cond.batch_size)

    def fix_positions(self, codes: torch.Tensor, cond: Any) -> torch.Tensor:
        """Codes (B, L) with the condition's fixed tokens written in."""
        if not isinstance(cond, PrefixCondition):
            return codes
        return torch.where(cond.fixed.to(codes.device), cond.tokens.to(codes.device), codes)

    # ---- the network ---------------------------------------------------------------------------------------------
    def apply_network(self, network: nn.Module, codes: torch.Tensor, cond: Any,
                      drop_condition: torch.Tensor | None = None, emb_noise_sigma: float = 0.0,
                      emb_noise_scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Logits (B, L, K) of ``network`` (``forward(input_ids=..., inputs_embeds=...)``, ``token_embeddings()``)
        on codes (B, L) with the prompt written in; the embedding noise is the teachers' own
        (:func:`~dimo_lightning.teachers.sequence.noisy_input_embeddings`), at the generated positions only."""
        if drop_condition is not None and bool(drop_condition.any()):
            raise ValueError("an exported text student samples without guidance: no dropped conditions")
        codes = self.fix_positions(codes, cond)
        embeds = noisy_input_embeddings(network, codes, cond, emb_noise_sigma, emb_noise_scale, generator)
        logits = network(input_ids=codes) if embeds is None else network(inputs_embeds=embeds)
        return logits[..., : self.codebook_size]  # the K generated ids, as the teacher's apply_network

    # ---- text ------------------------------------------------------------------------------------------------------
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise ValueError("a text student decodes to strings: use decode_text(codes) or split_text(codes, cond)")

    def _decode(self, ids: Sequence[int]) -> str:
        return self.text_tokenizer.decode(list(ids), skip_special_tokens=False)

    def decode_text(self, codes: torch.Tensor) -> list[str]:
        """Codes (B, L) -> B strings of every position (prompt + completion), special tokens kept."""
        return [self._decode(row) for row in codes.detach().cpu().tolist()]

    def split_text(self, codes: torch.Tensor, cond: Any) -> list[tuple[str, str]]:
        """Codes (B, L) and their condition -> (prompt, completion) per sample: the fixed positions' text and the
        generated positions' text (in order; special tokens kept). No prefix: ("", the whole row)."""
        rows = codes.detach().cpu()
        if not isinstance(cond, PrefixCondition):
            return [("", self._decode(row.tolist())) for row in rows]
        fixed = cond.fixed.detach().cpu().bool()
        return [(self._decode(row[keep].tolist()), self._decode(row[~keep].tolist())) for row, keep in zip(rows, fixed)]


class TextPipeline(OneStepPipeline):
    """The one-step pipeline of a text student: ``__call__`` returns strings.

    Built by :func:`~dimo_lightning.inference.export.load_student` for an exported text student (with a
    :class:`TextConditioner`), or with :meth:`~OneStepPipeline.from_teacher` on a live sequence teacher; sampled codes
    always get the prompt written back (``fix_positions``).
    """

    @property
    def modality(self) -> str:
        return "text"

    def sample_codes(self, conditions: Any = None, generator: torch.Generator | None = None, *, cond: Any = None,
                     temperature: float | None = None, r_init: float | None = None,
                     emb_noise_sigma: float | None = None) -> torch.Tensor:
        """Codes (B, L): ids in [0, K) at the generated positions, the prompt's at the fixed ones."""
        cond = self._condition(conditions, cond)
        codes = super().sample_codes(cond=cond, generator=generator, temperature=temperature, r_init=r_init,
                                     emb_noise_sigma=emb_noise_sigma)
        return self.conditioner.fix_positions(codes, cond)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise ValueError("a text student decodes to strings: call the pipeline, or use texts() / "
                         "conditioner.decode_text(codes)")

    @torch.no_grad()
    def texts(self, conditions: Any, seed: int = 0, generator: torch.Generator | None = None,
              temperature: float | None = None, r_init: float | None = None,
              emb_noise_sigma: float | None = None) -> list[tuple[str, str]]:
        """(prompt, completion) for each condition (prompts, or a number of unconditional texts), from
        ``generator`` or else a generator seeded with ``seed``."""
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        cond = self.prepare(conditions)
        codes = self.sample_codes(cond=cond, generator=generator, temperature=temperature, r_init=r_init,
                                  emb_noise_sigma=emb_noise_sigma)
        return self.conditioner.split_text(codes, cond)

    @torch.no_grad()
    def __call__(self, conditions: Any, seed: int = 0, generator: torch.Generator | None = None,
                 temperature: float | None = None, r_init: float | None = None,
                 emb_noise_sigma: float | None = None, full_text: bool = True) -> list[str]:
        """Texts for B prompts (a string or a list) or for a number of unconditional samples (an int):
        ``prompt + completion`` each (``full_text=False``: the completion only)."""
        pairs = self.texts(conditions, seed, generator, temperature, r_init, emb_noise_sigma)
        return [p + c if full_text else c for p, c in pairs]
