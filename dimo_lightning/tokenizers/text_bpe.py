"""A GPT-2-style byte-level BPE tokenizer trained with Hugging Face ``tokenizers`` (the text main job's tokenizer).

The layout is GPT-2's, the one MDLM's released model uses: byte-level pre-tokenisation with GPT-2's split regex (no
prefix space), BPE merges, byte-level decoding, no normaliser, no post-processor (encoding adds no special token),
and one special token ``<|endoftext|>`` as the LAST id, which is the tokenizer's bos, eos and unk token. There is no
mask token in the tokenizer: MDLM appends the mask after it, so the diffusion model's vocabulary is
``len(tokenizer) + 1`` and the mask id is ``len(tokenizer)`` (GPT-2: 50257 + 1; here 4096 + 1), which is what
:func:`dimo_lightning.nn.mdlm.check_mdlm_tokenizer` checks. A causal judge uses the tokenizer as it is
(``len(tokenizer)`` rows).

Byte-level BPE is lossless: ``decode(encode(x)) == x`` for every string ``x`` (``clean_up_tokenization_spaces`` is
off, so no space before punctuation is removed). The corpus' own normalisation (whitespace runs -> one space) is
applied before training and is the only normalisation of the round trip.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

ENDOFTEXT = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Any:
    """Train the tokenizer on ``texts`` -> ``PreTrainedTokenizerFast`` of exactly ``vocab_size`` ids (the last one
    ``<|endoftext|>``).

    Args:
        texts: the training documents.
        vocab_size: ids in all: the 256 byte symbols, ``vocab_size - 257`` merges and ``<|endoftext|>``.
        min_frequency: a pair seen fewer times is never merged.

    Raises:
        ValueError: ``vocab_size`` <= 257, or the texts are too small to learn ``vocab_size - 257`` merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= 257:
        raise ValueError(f"vocab_size must exceed the 256 byte symbols plus <|endoftext|>, got {vocab_size}")
    inner = Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    inner.train_from_iterator(texts, trainer=trainer)
    if inner.get_vocab_size() != vocab_size - 1:
        raise ValueError(f"the texts gave {inner.get_vocab_size()} BPE ids, fewer than the {vocab_size - 1} asked "
                         f"for (vocab_size {vocab_size} - 1 for {ENDOFTEXT}): use more text or a smaller vocab_size")
    inner.add_special_tokens([ENDOFTEXT])
    return PreTrainedTokenizerFast(tokenizer_object=inner, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT,
                                   unk_token=ENDOFTEXT, clean_up_tokenization_spaces=False)


def save_bpe_tokenizer(tokenizer: Any, folder: str | Path) -> Path:
    """``save_pretrained`` into ``folder`` (``tokenizer.json`` + ``tokenizer_config.json``) -> the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return folder
