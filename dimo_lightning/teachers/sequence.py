"""SequenceTeacher: the teacher contract for text masked-diffusion models (MDLM, LLaDA).

A text teacher's token grid is one row of L positions (``grid_shape`` (1, L)); its codes are token ids and decode to
strings (:meth:`SequenceTeacher.decode_text`), not images. Conditions are :class:`PrefixCondition` objects: none
(unconditional, every position generated) or a prompt written at positions [0, len) that stays fixed: the network
always sees it, the student's embedding noise never touches it, and every decoder keeps it.

The vocabulary the student and the targets see is the K ids below the mask id (``codebook_size`` = ``mask_id`` = K,
``logit_width`` = K): :meth:`SequenceTeacher.apply_network` returns the network's logits over ids [0, K). For MDLM
(mask id = the last id) this is exactly the "zero masking probability" half of the SUBS parameterisation
(:func:`dimo_lightning.core.subs.subs_log_probs`): the softmax over the K ids equals SUBS' softmax with the mask logit
at -inf. The slot is cut rather than set to -inf because an -inf logit in the student's output makes Di[M]O's surrogate
loss ``0.5 ||z - sg(z - g)||^2`` NaN (-inf - -inf). The other half of SUBS, carry-over unmasking (a position not
masked keeps its token with probability 1), is left to the decoders: Di[M]O reads the teacher only at masked positions,
and the student, a copy of the same network run through the same call, must predict every position of its hybrid
input, including the random tokens that carry-over would freeze.

Classifier-free guidance: the unconditional branch (``drop_condition``) masks the prompt positions, as LLaDA's own
"unsupervised CFG" (``generate.py``: ``un_x[prompt_index] = mask_id``; their scale s is w - 1 here, ``l_u + w (l_c -
l_u)``). An unconditional row has no prompt, so both branches agree and guidance is the identity there: set
``targets.cfg_scale`` to 1 for unconditional text (a scale other than 1 only costs a second pass).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dimo_lightning.core.conditions import PrefixCondition, condition_batch_size, repeat_condition
from dimo_lightning.core.sampling import cfg_combine, maskgit_decode
from dimo_lightning.teachers.base import MaskedTeacher
from dimo_lightning.tokenizers.text import decode_ids, encode_texts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SEQ_LEN_FLAG = "--model.init_args.teacher.init_args.seq_len"


def parse_dtype(dtype: str, argument: str = "dtype") -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` -> the torch dtype (a string, so that checkpoints can record the teacher)."""
    if dtype not in DTYPES:
        raise ValueError(f"{argument} must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]



def noisy_input_embeddings(network: nn.Module, codes: torch.Tensor, cond: Any,
                           emb_noise_sigma: float | torch.Tensor, emb_noise_scale: float,
                           generator: torch.Generator | None) -> torch.Tensor | None:
    """The student's perturbed input embeddings (B, L, D) for codes (B, L), or None when sigma is 0:
    ``e' = sigma * scale * eps + sqrt(1 - sigma^2) * e`` (docs/method.md#student-input) at the generated positions,
    the clean embedding at a PrefixCondition's fixed ones. ``network`` exposes ``token_embeddings()``; ``sigma`` is a
    scalar or (B,). Used by the sequence teachers and by exported text students, so both draw the same noise."""
    if not torch.is_tensor(emb_noise_sigma) and emb_noise_sigma == 0:
        return None
    # F.embedding (not indexing) so that the student's table gets its gradient as in the lookup.
    clean = F.embedding(codes, network.token_embeddings())  # (B, L, D)
    level = torch.as_tensor(emb_noise_sigma, dtype=clean.dtype, device=clean.device)
    level = level.reshape(-1, 1, 1) if level.ndim else level
    # Drawn for every position (the stream does not depend on the prompt), used at generated ones only.
    eps = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    noisy = level * emb_noise_scale * eps + torch.sqrt(1 - level * level) * clean
    return torch.where(cond.fixed[..., None], clean, noisy) if isinstance(cond, PrefixCondition) else noisy

class SequenceTeacher(MaskedTeacher):
    """Base of text teachers (see the module docstring for the conventions).

    Subclasses set, in ``__init__``: ``self.network`` (a module with ``token_embeddings()`` and an ``inputs_embeds``
    forward), ``self.text_tokenizer`` (a transformers tokenizer, frozen, never copied), then call
    :meth:`_set_sequence` with the length, the vocabulary and the decoding defaults; and implement
    :meth:`_forward` (the network call) and :meth:`_decode` (their own decoders besides ``maskgit``).
    """

    modality = "text"
    network: nn.Module
    text_tokenizer: Any
    # The decoders of :meth:`sample`; "maskgit" (confidence decoding) is every sequence teacher's.
    DECODINGS: tuple[str, ...] = ("maskgit",)

    def _set_sequence(self, seq_len: int, max_len: int, vocabulary: int, decoding: str,
                      skip_special_tokens: bool, source: str) -> None:
        """Record L, K (= the mask id) and the defaults; ``max_len`` is the network's length limit (for errors)."""
        if not 2 <= seq_len <= max_len:
            raise ValueError(f"{SEQ_LEN_FLAG} must lie in [2, {max_len}] (the length {source} was trained at; one "
                             f"position for a prompt token, one to generate), got {seq_len}")
        if decoding not in self.DECODINGS:
            raise ValueError(f"decoding must be one of {', '.join(self.DECODINGS)} for {type(self).__name__}, got "
                             f"{decoding!r}")
        self._seq_len = int(seq_len)
        self._vocabulary = int(vocabulary)
        self.decoding = decoding
        self.skip_special_tokens = bool(skip_special_tokens)

    # ---- vocabulary and grid -----------------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        """K: the ids the student draws, [0, K); the mask is K."""
        return self._vocabulary

    @property
    def mask_id(self) -> int:
        return self._vocabulary

    @property
    def logit_width(self) -> int:
        return self._vocabulary  # the mask slot is not scored (the module docstring says why)

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (1, self._seq_len)

    # ---- conditions --------------------------------------------------------------------------------------------------
    def encode_condition(self, batch: Any, source: str | None = None) -> PrefixCondition:
        """The DataModule's raw conditions -> :class:`PrefixCondition` of length L.

        Args:
            batch: a (B,) integer tensor (or list of ints, or a tuple whose first element is such a tensor) of
                per-sample seeds / indices: B unconditional rows (only the batch size matters); a list of B prompt
                strings: each tokenised (the tokenizer's default special tokens) and fixed at positions [0, len);
                or a PrefixCondition (returned as it is, after a length check).
            source: where the prompts come from (a file, a DataModule), named in errors.

        Raises:
            ValueError: a prompt longer than L - 1 tokens (the message names it, its index and ``source``), or a
                condition of the wrong length.
            TypeError: anything else.
        """
        if isinstance(batch, PrefixCondition):
            if batch.seq_len != self.seq_len:
                raise ValueError(f"the condition has length {batch.seq_len}; {type(self).__name__} generates "
                                 f"sequences of seq_len {self.seq_len}")
            return batch
        if isinstance(batch, str):
            raise TypeError(f"{type(self).__name__} expects a batch of prompts as a list of strings, got one string")
        if isinstance(batch, (list, tuple)) and batch and all(isinstance(p, str) for p in batch):
            return self.encode_prompts(list(batch), source)
        if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
            batch = batch[0]  # (indices, ...) as label DataModules yield them
        seeds = torch.as_tensor(batch)
        if seeds.ndim != 1 or seeds.is_floating_point() or seeds.dtype == torch.bool or not len(seeds):
            raise TypeError(f"{type(self).__name__} conditions are a (B,) integer tensor of seeds / indices "
                            f"(unconditional) or a list of prompt strings; got {type(batch).__name__} "
                            f"{list(seeds.shape) if seeds.ndim else ''}")
        return PrefixCondition.unconditional(len(seeds), self.seq_len, self.mask_id, seeds.device)

    def encode_prompts(self, prompts: Sequence[str], source: str | None = None) -> PrefixCondition:
        """Prompts -> PrefixCondition with each prompt's ids (of :meth:`prompt_texts`) fixed at positions [0, len)
        (CPU tensors)."""
        ids = encode_texts(self.text_tokenizer, self.prompt_texts(prompts))
        limit = self.seq_len - 1
        for i, row in enumerate(ids):
            if len(row) > limit:
                shown = prompts[i] if len(prompts[i]) <= 80 else prompts[i][:77] + "..."
                raise ValueError(
                    f"prompt {i}{' of ' + source if source else ''} ({shown!r}) is {len(row)} tokens long; "
                    f"{type(self).__name__} fits prompts of at most seq_len - 1 = {limit} tokens (at least one "
                    f"position must be generated): shorten the prompt or raise {SEQ_LEN_FLAG}"
                )
        tokens = torch.full((len(ids), self.seq_len), self.mask_id, dtype=torch.long)
        fixed = torch.zeros(len(ids), self.seq_len, dtype=torch.bool)
        for i, row in enumerate(ids):
            tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            fixed[i, : len(row)] = True
        return PrefixCondition(tokens=tokens, fixed=fixed)

    def prompt_texts(self, prompts: Sequence[str]) -> list[str]:
        """The texts that are tokenised for ``prompts`` (the prompts themselves; a chat model wraps them)."""
        return list(prompts)

    def condition_batch_size(self, cond: PrefixCondition) -> int:
        return condition_batch_size(cond)

    def repeat_condition(self, cond: PrefixCondition, repeats: int) -> PrefixCondition:
        return repeat_condition(cond, repeats)

    def fix_positions(self, codes: torch.Tensor, cond: Any) -> torch.Tensor:
        """Codes (B, L) with the prompt tokens written at the condition's fixed positions (a new tensor; codes
        without a PrefixCondition come back unchanged)."""
        if not isinstance(cond, PrefixCondition):
            return codes
        if codes.shape != cond.tokens.shape:
            raise ValueError(f"codes {list(codes.shape)} and the condition {list(cond.tokens.shape)} differ in shape")
        return torch.where(cond.fixed, cond.tokens.to(codes.dtype), codes)

    def _network_codes(self, codes: torch.Tensor, cond: Any, drop_condition: torch.Tensor | None) -> torch.Tensor:
        """What the network reads: the prompt written in; in rows of the unconditional branch, the mask instead."""
        codes = self.fix_positions(codes, cond)
        if drop_condition is not None and isinstance(cond, PrefixCondition):
            hidden = cond.fixed & drop_condition.to(codes.device, torch.bool)[:, None]
            codes = codes.masked_fill(hidden, self.mask_id)
        return codes

    # ---- the network -------------------------------------------------------------------------------------------------
    @abstractmethod
    def _forward(self, network: nn.Module, codes: torch.Tensor, embeds: torch.Tensor | None,
                 sigma: torch.Tensor | None) -> torch.Tensor:
        """The raw network call -> logits (B, L, V_net) with V_net > K.

        Args:
            network: teacher, student or aux.
            codes: (B, L) the ids the network reads.
            embeds: (B, L, D) the input embeddings to use instead of the table lookup (noisy student input), or None.
            sigma: (B,) the noise level of a time-conditioned network, or None (the network's own convention).
        """

    def _logits(self, network: nn.Module, codes: torch.Tensor, cond: Any, drop_condition: torch.Tensor | None = None,
                emb_noise_sigma: float | torch.Tensor = 0.0, emb_noise_scale: float = 1.0,
                generator: torch.Generator | None = None, sigma: torch.Tensor | None = None) -> torch.Tensor:
        codes = self._network_codes(codes, cond, drop_condition)
        embeds = noisy_input_embeddings(network, codes, cond, emb_noise_sigma, emb_noise_scale, generator)
        return self._forward(network, codes, embeds, sigma)[..., : self.codebook_size]

    def apply_network(
        self,
        network: nn.Module,
        codes: torch.Tensor,
        cond: PrefixCondition | None,
        drop_condition: torch.Tensor | None = None,
        emb_noise_sigma: float | torch.Tensor = 0.0,
        emb_noise_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Logits (B, L, K) of ``network`` (teacher, student or aux) on codes (B, L).

        The prompt of ``cond`` is written into the codes first (rows with ``drop_condition`` True get the mask there
        instead: the unconditional branch). ``emb_noise_sigma`` (scalar or (B,)) perturbs the input embeddings as
        ``e' = sigma * scale * eps + sqrt(1 - sigma^2) * e`` (docs/method.md#student-input) at the generated
        positions only; the prompt's embeddings stay clean. The logits cover the K ids below the mask (module
        docstring).
        """
        return self._logits(network, codes, cond, drop_condition, emb_noise_sigma, emb_noise_scale, generator)

    def embedding_rms(self, network: nn.Module | None = None) -> float:
        """RMS of the K token rows of the input embedding table (the mask row and ids past it excluded)."""
        net = self.network if network is None else network
        with torch.no_grad():
            rows = net.token_embeddings()[: self.codebook_size].float()
            return float(rows.pow(2).mean().sqrt())

    # ---- text --------------------------------------------------------------------------------------------------------
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} is a text teacher (modality 'text'): its codes decode to strings with "
            "decode_text(codes) or split_text(codes, cond), not to images"
        )

    def _strings(self, rows: list[list[int]], skip_special_tokens: bool | None) -> list[str]:
        skip = self.skip_special_tokens if skip_special_tokens is None else skip_special_tokens
        size = len(self.text_tokenizer)
        # Ids the tokenizer does not have (MDLM's appended mask) are dropped; LLaDA's mask is a special token.
        return decode_ids(self.text_tokenizer, rows, skip, drop_ids=[i for i in (self.mask_id,) if i >= size])

    def decode_text(self, codes: torch.Tensor, skip_special_tokens: bool | None = None) -> list[str]:
        """Codes (B, L) -> B strings of the whole sequence, prompt and completion together (:meth:`split_text`
        separates them). ``skip_special_tokens`` None uses the teacher's setting."""
        if codes.ndim != 2:
            raise ValueError(f"codes must be (B, L), got {list(codes.shape)}")
        return self._strings(codes.cpu().tolist(), skip_special_tokens)

    def split_text(self, codes: torch.Tensor, cond: PrefixCondition,
                   skip_special_tokens: bool | None = None) -> list[tuple[str, str]]:
        """Codes (B, L) and their condition -> B pairs (prompt, completion): the condition's fixed tokens and the
        codes at the other positions, decoded separately (an unconditional row has the prompt "")."""
        if not isinstance(cond, PrefixCondition) or codes.shape != cond.tokens.shape:
            raise ValueError("split_text needs codes (B, L) and the PrefixCondition they were generated for")
        fixed, tokens, codes = cond.fixed.cpu(), cond.tokens.cpu(), codes.cpu()
        prompts = self._strings([row[keep].tolist() for row, keep in zip(tokens, fixed)], skip_special_tokens)
        completions = self._strings([row[~keep].tolist() for row, keep in zip(codes, fixed)], skip_special_tokens)
        return list(zip(prompts, completions))

    # ---- sampling ----------------------------------------------------------------------------------------------------
    def _guided(self, cond: PrefixCondition, cfg_scale: float, cfg_batched: bool
                ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        """``(codes, sigma) -> logits (B, L, K)`` of the teacher, guided with a constant ``cfg_scale``."""
        b = cond.batch_size

        def logits(codes: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
            if cfg_scale == 1:
                return self._logits(self.network, codes, cond, sigma=sigma)
            if cfg_batched:
                drop = torch.arange(2 * b, device=codes.device) >= b
                both = self._logits(self.network, codes.repeat(2, 1), cond.repeat(2), drop,
                                    sigma=None if sigma is None else sigma.repeat(2))
                return cfg_combine(both[:b], both[b:], cfg_scale)
            drop = torch.ones(b, dtype=torch.bool, device=codes.device)
            return cfg_combine(self._logits(self.network, codes, cond, sigma=sigma),
                               self._logits(self.network, codes, cond, drop, sigma=sigma), cfg_scale)

        return logits

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
        decoding: str | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """The teacher's own multi-step decoding -> codes (B, L): the prompt kept, every other position a token in
        [0, K) (no mask left).

        Args:
            cond: a PrefixCondition (or raw conditions, encoded with :meth:`encode_condition`).
            steps: decoding steps (network passes, up to caching and guidance).
            cfg_scale: guidance w (prompt masked in the unconditional branch); rows without a prompt are unguided.
            cfg_ramp, schedule, choice_temperature: MaskGIT decoding only (``decoding="maskgit"``; see
                :func:`dimo_lightning.core.sampling.maskgit_decode`); the other decoders use a constant scale.
            softmax_temperature: every decoder divides the logits by it.
            generator: random source.
            cfg_batched: one pass of 2B per guided step, or two of B.
            decoding: one of :attr:`DECODINGS`; None uses the teacher's ``decoding``.
            options: the decoder's own settings (the subclass's :meth:`_decode` names them).
        """
        decoding = self.decoding if decoding is None else decoding
        if decoding not in self.DECODINGS:
            raise ValueError(f"decoding must be one of {', '.join(self.DECODINGS)} for {type(self).__name__}, got "
                             f"{decoding!r}")
        device = next(self.network.parameters()).device
        cond = self.encode_condition(cond).to(device)
        initial = torch.where(cond.fixed, cond.tokens, torch.full_like(cond.tokens, self.mask_id))
        if cfg_scale != 1 and not bool(cond.fixed.any()):
            cfg_scale = 1.0  # no prompt anywhere: both branches are the same pass
        was_training = self.network.training
        self.network.eval()
        try:
            if decoding == "maskgit":
                if options:
                    raise TypeError(f"maskgit decoding takes no options {sorted(options)}")
                b = cond.batch_size
                doubled = cond.repeat(2)

                def logits_fn(codes: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
                    return self.apply_network(self.network, codes, cond if codes.shape[0] == b else doubled, drop)

                return maskgit_decode(
                    logits_fn, b, self.seq_len, self.codebook_size, self.mask_id, steps=steps, schedule=schedule,
                    cfg_scale=cfg_scale, cfg_ramp=cfg_ramp, softmax_temperature=softmax_temperature,
                    choice_temperature=choice_temperature, device=device, generator=generator,
                    cfg_batched=cfg_batched, initial=initial,
                )
            return self._decode(decoding, self._guided(cond, cfg_scale, cfg_batched), initial, steps,
                                softmax_temperature, generator, **options)
        finally:
            self.network.train(was_training)

    @abstractmethod
    def _decode(self, decoding: str, logits_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                initial: torch.Tensor, steps: int, softmax_temperature: float,
                generator: torch.Generator | None, **options: Any) -> torch.Tensor:
        """Run the subclass's decoder ``decoding`` from ``initial`` (B, L) -> codes (B, L)."""
