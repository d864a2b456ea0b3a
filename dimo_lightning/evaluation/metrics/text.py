"""Text sample metrics as pure functions, and their accumulation across ranks as sums.

Every metric reduces to a few sums, so a rank scores its own samples and only the sums travel (no text leaves its
rank); :func:`reduce_text_sums` turns the summed dict into the numbers. The metrics and the protocol of each:

**Generative perplexity** (:func:`judge_nll`, :func:`generative_perplexity`) under a judge causal LM loaded from a
local folder (:func:`load_judge`: any ``AutoModelForCausalLM`` with its ``AutoTokenizer``, e.g. gpt2-large for
OpenWebText). This follows MDLM's ``compute_generative_perplexity`` (kuleshov-group/mdlm ``diffusion.py``, also
DUO's ``metrics.py``):

- the texts (the samples decoded by the generator's tokenizer, special tokens kept as text) are re-tokenised by the
  judge's tokenizer (its default special tokens: none for GPT-2, a BOS for Llama);
- the judge ids are split into consecutive, non-overlapping chunks of the judge's context length (the last one
  shorter), each chunk evaluated on its own (no context carried over); within a chunk every position predicts the
  next, so the first token of each chunk is never scored and a chunk of one token scores nothing;
- EOS: within a chunk, a target that is not the EOS id is scored, and so is the chunk's first EOS (counted from the
  chunk's first token); later EOS in the chunk are not (MDLM's ``first_eos[..., 1:] + token_mask[..., 1:]``);
- padding is never scored. MDLM pads a batch with EOS (GPT-2 has no pad token), so a sample shorter than its batch's
  longest gets one extra scored EOS (the first pad): a batch-composition effect this module does not reproduce;
- MDLM truncates the re-tokenised text to the generator's length (``max_length = model.length``, 1024 on OWT)
  before chunking; ``max_tokens`` does the same here (``None``: score every judge token);
- the per-token NLL (log-softmax of the judge's logits in float32) is summed in float64.

Two numbers come out: ``gen_ppl = exp(sum_nll / sum_tokens)``, the token-pooled perplexity that MDLM and DUO report
(their ``Perplexity`` metric: ``exp(mean_value / weight)`` over every scored token of every sample), and
``gen_ppl_sample_mean``, the mean over samples of ``exp(sample_nll / sample_tokens)``, which SEDD reports
(louaaron/Score-Entropy-Discrete-Diffusion ``run_train.py``: ``cross_entropy(...).mean(-1).exp().mean()`` over the
samples, on GPT-2 ids without re-tokenisation or EOS handling). With equal token counts per sample the sample
mean is the larger (Jensen); long samples weigh more in the pooled value.

**Unigram entropy** (:func:`unigram_entropy`): the entropy in nats of each sample's token-id histogram, averaged
over samples (DUO's ``record_entropy``: ``entr(counts / counts.sum()).sum()`` per sample, a mean over samples).
It is computed on the generator's own token ids, not the judge's.

**distinct-n** (:func:`distinct_ngrams`), n = 1..4 on token ids: the share of unique n-grams among a sample's
n-grams, averaged over samples (a sum and a count, exact across ranks). The corpus-level form (unique n-grams of a
set over all its n-grams, Li et al. 2016) needs the n-gram set of the whole set, which does not fit across 50k
samples and ranks; it is computed on the bounded subset below (``corpus_distinct_n``) and depends on the subset's
size, so compare it at equal ``subset_size`` only.

**Self-BLEU** (:func:`self_bleu`): each sample of the subset is a BLEU hypothesis against all the other samples of
the subset as references, and the scores are averaged. As Texygen's ``SelfBleu`` (geek-ai/Texygen; fast mode: the
first 500 samples; its n-gram order is a parameter, 3 by default, 4 here) with nltk's ``sentence_bleu``: BLEU-4
with uniform weights, modified precision clipped by the largest count in any one reference, brevity penalty against
the closest reference length (ties to the shorter), smoothing ``SmoothingFunction().method1`` (a precision with no
match becomes ``0.1 / n-gram count``), and 0 when no unigram matches.
The units are the generator's token ids, not nltk's word tokens: values are comparable between models that share a
tokenizer, not with word-level Self-BLEU in papers.

**Copy rate** (:class:`ReferenceNgrams`, :func:`copy_rate_counts`): the share of a sample's n-grams (n = 8 by
default; every position, repeats counted) that occur anywhere in a reference corpus (the training text, tokenised by
the generator's tokenizer), as (copied, total) sums. The reference's n-grams are kept as a sorted array of unique
64-bit hashes (8 bytes each: 5 million n-grams take 40 MB) and looked up with ``searchsorted``; a false hit needs a
64-bit collision (about ``len(reference) / 2**64`` per n-gram).

**The subset.** Self-BLEU and corpus distinct-n use the first ``subset_size`` samples a rank sees (Texygen's fast
mode takes the first 500 too; the samples are independent draws, so the first N are a random subset). The sharded
evaluation draws batch ``i`` from a seed of ``(seed, i)`` and gives each rank a contiguous block of batches, so
rank 0's first N samples are the first N of the whole set whatever the world size: :func:`sharded_text_metrics`
takes the subset sums from ``subset_rank`` (0) only, which makes every number here identical on 1 and on k ranks
(as long as rank 0 holds ``subset_size`` samples).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REFERENCE_FORMAT = "dimo-reference-ngrams-v1"
DISTINCT_ORDERS = (1, 2, 3, 4)

TokenRows = torch.Tensor | np.ndarray | Sequence[Sequence[int]]

# ---------------------------------------------------------------- n-gram hashes

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a bijection that scatters every input bit."""
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def ngram_hashes(tokens: np.ndarray | Sequence[int], n: int) -> np.ndarray:
    """64-bit hashes (..., L - n + 1) uint64 of the n-grams of token sequences (..., L), in order; the last axis is
    empty when L < n.

    The hash chains the finaliser over the n ids, ``h = mix(... mix(mix(n) ^ t0) ^ t1 ...)``, so it depends on the
    order of the ids and on n; the same n-gram hashes the same in every sequence, process and run.
    """
    if n < 1:
        raise ValueError(f"n-gram order must be >= 1, got {n}")
    ids = np.asarray(tokens).astype(np.uint64, copy=False)
    count = max(ids.shape[-1] - n + 1, 0)
    h = _mix64(np.full((*ids.shape[:-1], count), n, dtype=np.uint64))
    for k in range(n):
        h = _mix64(h ^ ids[..., k: k + count])
    return h


def as_token_rows(token_ids: TokenRows) -> list[np.ndarray]:
    """Samples as a list of 1-D int64 arrays: a (B, L) tensor or array, or a list of id lists of any lengths."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    if isinstance(token_ids, np.ndarray):
        if token_ids.ndim != 2:
            raise ValueError(f"token ids must be (B, L), got shape {token_ids.shape}")
        return [row.astype(np.int64, copy=False) for row in token_ids]
    return [np.asarray(row, dtype=np.int64).reshape(-1) for row in token_ids]


# ---------------------------------------------------------------- per-sample statistics


def unigram_entropy(tokens: np.ndarray | Sequence[int]) -> float:
    """Entropy in nats of one sample's token histogram, ``-sum p log p`` with ``p = count / L`` (float64); 0 for an
    empty sample."""
    ids = np.asarray(tokens).reshape(-1)
    if len(ids) == 0:
        return 0.0
    _, counts = np.unique(ids, return_counts=True)
    p = counts / len(ids)
    return float(-(p * np.log(p)).sum())


def distinct_ngrams(tokens: np.ndarray | Sequence[int], n: int) -> tuple[int, int]:
    """(unique n-grams, n-grams) of one sample; distinct-n is their ratio ((0, 0) when the sample is shorter than n)."""
    hashes = ngram_hashes(tokens, n)
    return len(np.unique(hashes)), len(hashes)


def corpus_distinct_ngrams(samples: Sequence[np.ndarray | Sequence[int]], n: int) -> tuple[int, int]:
    """(unique n-grams over the whole set, n-grams of all samples): corpus-level distinct-n is their ratio. N-grams
    do not cross sample boundaries."""
    hashes = [ngram_hashes(s, n) for s in samples]
    joined = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)
    return len(np.unique(joined)), len(joined)


def _rows_entropy(tokens: np.ndarray) -> np.ndarray:
    """:func:`unigram_entropy` of each row of (B, L), L > 0, in one pass: ``log L - sum(c log c) / L`` over the
    run lengths ``c`` of each sorted row."""
    rows, length = tokens.shape
    ordered = np.sort(tokens, axis=1)
    first = np.ones(ordered.shape, dtype=bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    counts = np.bincount(np.cumsum(first.ravel()) - 1).astype(np.float64)
    run_rows = np.repeat(np.arange(rows), first.sum(1))
    return math.log(length) - np.bincount(run_rows, weights=counts * np.log(counts), minlength=rows) / length


def _rows_unique(hashes: np.ndarray) -> np.ndarray:
    """The number of distinct values in each row of (B, C), C > 0."""
    ordered = np.sort(hashes, axis=1)
    return 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(1)


# ---------------------------------------------------------------- BLEU


def _ngram_counter(tokens: Sequence[Any], n: int) -> Counter:
    return Counter(tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu(references: Sequence[Sequence[Any]], hypothesis: Sequence[Any], max_n: int = 4,
                  epsilon: float = 0.1) -> float:
    """BLEU of one hypothesis against its references (any hashable units), nltk's ``sentence_bleu`` with uniform
    weights ``1 / max_n`` and ``SmoothingFunction(epsilon).method1``:

    - ``p_n`` = sum over the hypothesis' n-grams of ``min(count, max count in any one reference)`` divided by the
      number of hypothesis n-grams (at least 1);
    - a ``p_n`` with no match becomes ``epsilon / denominator``; no unigram match at all gives 0;
    - brevity penalty ``exp(1 - r / c)`` when the hypothesis length ``c`` is at most the closest reference length
      ``r`` (ties to the shorter reference), 1 when longer, 0 for an empty hypothesis.
    """
    if not references:
        raise ValueError("BLEU needs at least one reference")
    hypothesis = list(hypothesis)
    numerators, denominators = [], []
    for n in range(1, max_n + 1):
        counts = _ngram_counter(hypothesis, n)
        most: dict[tuple, int] = {}
        for reference in references:
            reference_counts = _ngram_counter(list(reference), n)
            for gram in counts:
                most[gram] = max(most.get(gram, 0), reference_counts[gram])
        numerators.append(sum(min(c, most[g]) for g, c in counts.items()))
        denominators.append(max(1, sum(counts.values())))
    if numerators[0] == 0:
        return 0.0
    closest = min((len(r) for r in references), key=lambda r: (abs(r - len(hypothesis)), r))
    bp = _brevity_penalty(len(hypothesis), closest)
    logs = [math.log((num if num else epsilon) / den) for num, den in zip(numerators, denominators)]
    return bp * math.exp(math.fsum(logs) / max_n)


def _brevity_penalty(hyp_len: int, closest: int) -> float:
    if hyp_len > closest:
        return 1.0
    if hyp_len == 0:
        return 0.0
    return math.exp(1 - closest / hyp_len)


def self_bleu(samples: Sequence[np.ndarray | Sequence[int]], max_n: int = 4, epsilon: float = 0.1) -> np.ndarray:
    """BLEU (M,) float64 of each sample against the M - 1 others, exactly :func:`sentence_bleu` (on token ids).

    The clipping count of a hypothesis n-gram is its largest count in any other sample: for each n-gram the largest
    count over all samples, its owner and the second largest are found in one sort, so the cost is the sort of all
    n-grams (``M * L`` per order), not M^2 comparisons. N-grams are compared by their 64-bit hashes.
    """
    rows = [np.asarray(s).reshape(-1) for s in samples]
    m = len(rows)
    if m < 2:
        raise ValueError(f"Self-BLEU needs at least 2 samples, got {m}")
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    log_precision = np.zeros((m, max_n))
    no_unigram_match = np.zeros(m, dtype=bool)
    for n in range(1, max_n + 1):
        keys, counts, owners = [], [], []
        for i, row in enumerate(rows):
            unique, count = np.unique(ngram_hashes(row, n), return_counts=True)
            keys.append(unique)
            counts.append(count)
            owners.append(np.full(len(unique), i, dtype=np.int64))
        key, count, owner = np.concatenate(keys), np.concatenate(counts), np.concatenate(owners)
        numerator = np.zeros(m)
        if len(key):
            order = np.lexsort((-count, key))  # by n-gram, then by count, largest first
            key, count, owner = key[order], count[order], owner[order]
            first = np.r_[True, key[1:] != key[:-1]]
            group = np.cumsum(first) - 1
            starts = np.flatnonzero(first)
            top = count[starts]
            sizes = np.diff(np.r_[starts, len(key)])
            second = np.where(sizes > 1, count[np.minimum(starts + 1, len(key) - 1)], 0)
            # each sample holds an n-gram once (unique above): the group's first entry is the top owner, whose best
            # other sample has the second count; every other entry's best other sample is the top
            best_other = np.where(first, second[group], top[group])
            numerator = np.bincount(owner, weights=np.minimum(count, best_other), minlength=m)
        denominator = np.maximum(lengths - n + 1, 1)
        if n == 1:
            no_unigram_match = numerator == 0
        log_precision[:, n - 1] = np.log(np.where(numerator > 0, numerator, epsilon) / denominator)
    scores = np.zeros(m)
    for i in range(m):
        if no_unigram_match[i]:
            continue
        others = np.delete(lengths, i)
        closest = int(others[np.lexsort((others, np.abs(others - lengths[i])))[0]])
        scores[i] = _brevity_penalty(int(lengths[i]), closest) * math.exp(math.fsum(log_precision[i]) / max_n)
    return scores


# ---------------------------------------------------------------- copy rate


class ReferenceNgrams:
    """The n-grams of a reference corpus as a sorted array of unique 64-bit hashes (8 bytes per distinct n-gram).

    Build it once from the training text tokenised by the generator's tokenizer (:meth:`from_sequences`; n-grams do
    not cross the given sequences' boundaries), save it (:meth:`save`, ``.npz``) and load it on every rank.
    """

    def __init__(self, hashes: np.ndarray, n: int) -> None:
        hashes = np.asarray(hashes, dtype=np.uint64)
        if len(hashes) > 1 and not (hashes[1:] > hashes[:-1]).all():
            hashes = np.unique(hashes)
        self.hashes = hashes
        self.n = int(n)

    @classmethod
    def from_sequences(cls, sequences: Iterable[np.ndarray | Sequence[int] | torch.Tensor], n: int = 8,
                       compact_every: int = 1 << 22) -> ReferenceNgrams:
        """Hash every n-gram of every sequence; duplicates are dropped every ``compact_every`` hashes, so memory
        stays near the number of distinct n-grams."""
        kept = np.zeros(0, dtype=np.uint64)
        pending: list[np.ndarray] = []
        pending_size = 0
        for sequence in sequences:
            if isinstance(sequence, torch.Tensor):
                sequence = sequence.detach().cpu().numpy()
            hashes = ngram_hashes(sequence, n)
            pending.append(hashes)
            pending_size += len(hashes)
            if pending_size >= compact_every:
                kept = np.unique(np.concatenate([kept, *pending]))
                pending, pending_size = [], 0
        kept = np.unique(np.concatenate([kept, *pending]))
        return cls(kept, n)

    def __len__(self) -> int:
        return len(self.hashes)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Bool, same shape: is each hash one of the reference's."""
        if len(self.hashes) == 0:
            return np.zeros(np.shape(hashes), dtype=bool)
        where = np.searchsorted(self.hashes, hashes)
        return self.hashes[np.minimum(where, len(self.hashes) - 1)] == hashes

    def save(self, path: str | Path) -> None:
        np.savez(path, format=np.array(REFERENCE_FORMAT), n=np.array(self.n), hashes=self.hashes)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceNgrams:
        with np.load(path) as data:
            if "format" not in data or str(data["format"]) != REFERENCE_FORMAT:
                raise ValueError(f"{path} is not a reference n-gram file ({REFERENCE_FORMAT})")
            return cls(data["hashes"], int(data["n"]))


def copy_rate_counts(tokens: np.ndarray | Sequence[int], reference: ReferenceNgrams) -> tuple[int, int]:
    """(n-grams found in the reference, n-grams) of one sample, n = ``reference.n``, every position counted."""
    hashes = ngram_hashes(tokens, reference.n)
    return int(reference.contains(hashes).sum()), len(hashes)


# ---------------------------------------------------------------- generative perplexity


@dataclass
class Judge:
    """A causal LM that scores texts: the model (eval mode), its tokenizer and the context length of its chunks."""

    model: torch.nn.Module
    tokenizer: Any
    context_length: int

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def token_ids(self, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
        """The judge's ids of each text (its default special tokens), cut to ``max_tokens`` when given."""
        ids = self.tokenizer(list(texts), verbose=False)["input_ids"]
        return [list(row[:max_tokens]) if max_tokens is not None else list(row) for row in ids]


def load_judge(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               context_length: int | None = None) -> Judge:
    """Load a judge from a local folder (``AutoModelForCausalLM`` and ``AutoTokenizer``, no download).

    ``context_length`` defaults to the model's ``n_positions`` (GPT-2: 1024) or ``max_position_embeddings``; set it
    for models whose position table is longer than the context they were trained on (MDLM uses 4096 for Llama 2).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs, **({"dtype": dtype} if dtype else {}))
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    if context_length is None:
        config = model.config
        context_length = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if context_length is None:
            raise ValueError(f"the judge at {path} names no context length (n_positions / max_position_embeddings): "
                             "pass context_length")
    return Judge(model.to(device).eval(), tokenizer, int(context_length))


def chunk_bounds(length: int, context_length: int) -> list[tuple[int, int]]:
    """[start, stop) of the consecutive chunks of ``context_length`` ids that cover ``length`` ids (last shorter)."""
    if context_length < 2:
        raise ValueError(f"a judge context of {context_length} tokens scores nothing")
    return [(start, min(start + context_length, length)) for start in range(0, length, context_length)]


def scored_targets(chunk: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """Bool (..., C - 1): which targets ``chunk[..., 1:]`` of a chunk (..., C) are scored: every non-EOS id and the
    chunk's first EOS (counted from position 0, as MDLM)."""
    if eos_token_id is None:
        return torch.ones_like(chunk[..., 1:], dtype=torch.bool)
    is_eos = chunk == eos_token_id
    first_eos = is_eos & (is_eos.cumsum(-1) == 1)
    return (~is_eos | first_eos)[..., 1:]


@torch.no_grad()
def judge_nll(model: torch.nn.Module, token_ids: Sequence[Sequence[int]], context_length: int,
              eos_token_id: int | None, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample summed NLL (N,) float64 and scored token counts (N,) int64 of judge ids under a causal LM.

    Each sample is cut into chunks (:func:`chunk_bounds`); ``batch_size`` chunks at a time are right-padded, run
    with an attention mask, and their scored targets (:func:`scored_targets`; padding never) summed per sample.
    """
    device = next(model.parameters()).device
    chunks = [(i, ids[a:b]) for i, ids in enumerate(token_ids) for a, b in chunk_bounds(len(ids), context_length)]
    chunks = [(i, c) for i, c in chunks if len(c) > 1]
    nll = np.zeros(len(token_ids), dtype=np.float64)
    counts = np.zeros(len(token_ids), dtype=np.int64)
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start: start + batch_size]
        width = max(len(c) for _, c in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (_, chunk) in enumerate(batch):
            ids[row, : len(chunk)] = torch.as_tensor(chunk, dtype=torch.long)
            mask[row, : len(chunk)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        token_nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").double()
        scored = scored_targets(ids, eos_token_id) & mask[:, 1:].bool()
        sums = (token_nll * scored).sum(1).cpu().numpy()
        scored_counts = scored.sum(1).cpu().numpy()
        for row, (sample, _) in enumerate(batch):
            nll[sample] += sums[row]
            counts[sample] += scored_counts[row]
    return nll, counts


def generative_perplexity(judge: Judge, texts: Sequence[str], batch_size: int = 8,
                          max_tokens: int | None = None) -> dict[str, float]:
    """Both perplexities of a set of texts in one process: ``gen_ppl`` (token-pooled, MDLM) and
    ``gen_ppl_sample_mean`` (mean of per-sample perplexities, SEDD); see the module docstring for the protocol."""
    nll, counts = judge_nll(judge.model, judge.token_ids(texts, max_tokens), judge.context_length,
                            judge.eos_token_id, batch_size)
    sums = _perplexity_sums(nll, counts)
    return {key: value for key, value in reduce_text_sums(sums).items() if key.startswith("gen_")}


def _perplexity_sums(nll: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    scored = counts > 0
    return {"gen_nll_sum": float(nll.sum()), "gen_tokens": float(counts.sum()),
            "gen_ppl_sum": float(np.exp(nll[scored] / counts[scored]).sum()), "gen_ppl_samples": float(scored.sum())}


# ---------------------------------------------------------------- accumulation and reduction


def text_sum_keys(distinct_orders: Sequence[int] = DISTINCT_ORDERS) -> tuple[str, ...]:
    """The keys of the sums dict, in the order they travel (the same on every rank for the same orders)."""
    keys = ["samples", "gen_nll_sum", "gen_tokens", "gen_ppl_sum", "gen_ppl_samples", "entropy_sum",
            "entropy_samples"]
    keys += [f"distinct_{n}_{part}" for n in distinct_orders for part in ("sum", "samples")]
    keys += ["copy_hits", "copy_ngrams", "self_bleu_sum", "self_bleu_samples"]
    keys += [f"corpus_distinct_{n}_{part}" for n in distinct_orders for part in ("unique", "total")]
    return tuple(keys)


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def reduce_text_sums(sums: dict[str, float]) -> dict[str, float | None]:
    """Summed sums -> the metrics (None where nothing was measured: no judge, no reference, a subset under 2).

    ``gen_ppl`` = exp(gen_nll), ``gen_nll`` the mean NLL per scored judge token (nats), ``gen_ppl_sample_mean``,
    ``entropy`` (nats), ``distinct_n`` (per-sample mean), ``corpus_distinct_n`` (over the subset), ``self_bleu``,
    ``copy_rate``, ``samples``.
    """
    nll = _ratio(sums.get("gen_nll_sum", 0.0), sums.get("gen_tokens", 0.0))
    out: dict[str, float | None] = {
        "samples": sums.get("samples", 0.0),
        "gen_ppl": math.exp(nll) if nll is not None else None,
        "gen_nll": nll,
        "gen_ppl_sample_mean": _ratio(sums.get("gen_ppl_sum", 0.0), sums.get("gen_ppl_samples", 0.0)),
        "entropy": _ratio(sums.get("entropy_sum", 0.0), sums.get("entropy_samples", 0.0)),
    }
    orders = sorted(int(k.split("_")[1]) for k in sums if k.startswith("distinct_") and k.endswith("_sum"))
    for n in orders:
        out[f"distinct_{n}"] = _ratio(sums[f"distinct_{n}_sum"], sums[f"distinct_{n}_samples"])
    for n in orders:
        out[f"corpus_distinct_{n}"] = _ratio(sums.get(f"corpus_distinct_{n}_unique", 0.0),
                                             sums.get(f"corpus_distinct_{n}_total", 0.0))
    out["self_bleu"] = _ratio(sums.get("self_bleu_sum", 0.0), sums.get("self_bleu_samples", 0.0))
    out["copy_rate"] = _ratio(sums.get("copy_hits", 0.0), sums.get("copy_ngrams", 0.0))
    return out


def add_text_sums(*parts: dict[str, float]) -> dict[str, float]:
    """Key-wise sum of sums dicts (what the ranks' reduction does, in one process)."""
    keys = list(dict.fromkeys(k for part in parts for k in part))
    return {k: float(sum(part.get(k, 0.0) for part in parts)) for k in keys}


class TextMetricAccumulator:
    """One rank's running sums of the text metrics over the samples it is fed.

    Args:
        judge: the generative-perplexity judge (None: no perplexity).
        reference: the training text's n-grams for the copy rate (None: no copy rate).
        distinct_orders: the n of distinct-n.
        subset_size: samples kept (the first ones fed) for Self-BLEU and corpus distinct-n; 0 keeps none.
        bleu_order: the largest n-gram order of Self-BLEU (uniform weights).
        judge_batch_size: judge chunks per forward.
        judge_max_tokens: cut the judge ids of each text to this many before chunking (MDLM: the generator's
            sequence length); None scores them all.

    Memory: ``subset_size`` token rows (500 x 1024 int64 = 4 MB) besides the judge and the reference.
    """

    def __init__(self, judge: Judge | None = None, reference: ReferenceNgrams | None = None,
                 distinct_orders: Sequence[int] = DISTINCT_ORDERS, subset_size: int = 500, bleu_order: int = 4,
                 judge_batch_size: int = 8, judge_max_tokens: int | None = None) -> None:
        self.judge = judge
        self.reference = reference
        self.distinct_orders = tuple(int(n) for n in distinct_orders)
        self.subset_size = int(subset_size)
        self.bleu_order = int(bleu_order)
        self.judge_batch_size = int(judge_batch_size)
        self.judge_max_tokens = judge_max_tokens
        self.keys = text_sum_keys(self.distinct_orders)
        self._sums = dict.fromkeys(self.keys, 0.0)
        self.subset: list[np.ndarray] = []
        self._subset_sums: dict[str, float] | None = None

    def update(self, token_ids: TokenRows | None = None, texts: Sequence[str] | None = None) -> None:
        """Score a batch of samples: token ids (the generator's ids: entropy, distinct-n, copy rate, the subset) and/or
        their decoded texts (generative perplexity, when there is a judge). Give both for the same samples."""
        rows = as_token_rows(token_ids) if token_ids is not None else None
        if rows is not None and texts is not None and len(rows) != len(texts):
            raise ValueError(f"{len(rows)} token rows but {len(texts)} texts")
        if rows is None and texts is None:
            raise ValueError("update needs token_ids, texts or both")
        s = self._sums
        s["samples"] += len(rows) if rows is not None else len(texts)
        if texts is not None and self.judge is not None:
            nll, counts = judge_nll(self.judge.model, self.judge.token_ids(texts, self.judge_max_tokens),
                                    self.judge.context_length, self.judge.eos_token_id, self.judge_batch_size)
            for key, value in _perplexity_sums(nll, counts).items():
                s[key] += value
        if rows is None:
            return
        if isinstance(token_ids, (torch.Tensor, np.ndarray)) and len(rows):
            self._update_rows(np.stack(rows))
        else:
            for row in rows:
                self._update_rows(row[None])
        room = self.subset_size - len(self.subset)
        if room > 0:
            self.subset.extend(row.copy() for row in rows[:room])
            self._subset_sums = None

    def _update_rows(self, tokens: np.ndarray) -> None:
        """Entropy, distinct-n and copy counts of equal-length rows (B, L), vectorised over the rows."""
        s = self._sums
        rows, length = tokens.shape
        if length == 0:
            return
        s["entropy_sum"] += float(_rows_entropy(tokens).sum())
        s["entropy_samples"] += rows
        for n in self.distinct_orders:
            if length >= n:
                s[f"distinct_{n}_sum"] += float((_rows_unique(ngram_hashes(tokens, n)) / (length - n + 1)).sum())
                s[f"distinct_{n}_samples"] += rows
        if self.reference is not None:
            hashes = ngram_hashes(tokens, self.reference.n)
            s["copy_hits"] += int(self.reference.contains(hashes).sum())
            s["copy_ngrams"] += hashes.size

    def subset_sums(self) -> dict[str, float]:
        """Self-BLEU and corpus distinct-n sums of the kept subset (zeros under 2 samples); computed once per subset."""
        if self._subset_sums is None:
            sums = {k: 0.0 for k in self.keys if k.startswith(("self_bleu", "corpus_distinct"))}
            if len(self.subset) >= 2:
                scores = self_bleu(self.subset, self.bleu_order)
                sums["self_bleu_sum"], sums["self_bleu_samples"] = float(scores.sum()), float(len(scores))
                for n in self.distinct_orders:
                    unique, total = corpus_distinct_ngrams(self.subset, n)
                    sums[f"corpus_distinct_{n}_unique"], sums[f"corpus_distinct_{n}_total"] = unique, total
            self._subset_sums = sums
        return dict(self._subset_sums)

    def sums(self, with_subset: bool = True) -> dict[str, float]:
        """Every key of :attr:`keys` (floats): this rank's sums, the subset's included or zero."""
        out = dict(self._sums)
        if with_subset:
            out.update(self.subset_sums())
        return out

    def compute(self) -> dict[str, float | None]:
        """The metrics of this accumulator alone (one process)."""
        return reduce_text_sums(self.sums())


def sums_to_tensor(sums: dict[str, float], keys: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """The sums as a float64 vector in ``keys`` order (exact for counts below 2**53)."""
    return torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device)


def tensor_to_sums(vector: torch.Tensor, keys: Sequence[str]) -> dict[str, float]:
    return dict(zip(keys, vector.detach().double().cpu().tolist()))


def sharded_text_metrics(accumulator: TextMetricAccumulator, reduce: Callable[[torch.Tensor, str], torch.Tensor],
                         rank: int, subset_rank: int | None = 0,
                         device: torch.device | str = "cpu") -> dict[str, float | None]:
    """Sum every rank's sums with one ``reduce(vector, "sum")`` and give the metrics. A collective: call it on every
    rank (the same ``keys`` everywhere: same distinct orders).

    ``reduce`` is a strategy's sum-reduction, e.g. ``lambda t, op: trainer.strategy.reduce(t, reduce_op=op)``
    (``device`` then the rank's device: NCCL reduces CUDA tensors). ``subset_rank``: the one rank whose subset
    (Self-BLEU, corpus distinct-n) counts; with contiguous sample blocks rank 0's first samples are the set's first,
    so the numbers do not depend on the world size. ``None``: every rank's subset counts (Self-BLEU is then the mean
    over world-size subsets of ``subset_size``; corpus distinct-n the n-gram-weighted mean of theirs).
    """
    with_subset = subset_rank is None or rank == subset_rank
    vector = sums_to_tensor(accumulator.sums(with_subset), accumulator.keys, device)
    return reduce_text_sums(tensor_to_sums(reduce(vector, "sum"), accumulator.keys))
