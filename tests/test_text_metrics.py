"""Text metrics: generative perplexity against an independent computation on a tiny random judge, chunking and EOS
rules, entropy / distinct-n / BLEU / copy rate against hand counts, and sums that merge across ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dimo_lightning.evaluation.metrics.text import (
    ReferenceNgrams,
    TextMetricAccumulator,
    add_text_sums,
    chunk_bounds,
    copy_rate_counts,
    corpus_distinct_ngrams,
    distinct_ngrams,
    generative_perplexity,
    judge_nll,
    load_judge,
    ngram_hashes,
    reduce_text_sums,
    scored_targets,
    self_bleu,
    sentence_bleu,
    sharded_text_metrics,
    sums_to_tensor,
    unigram_entropy,
)

CONTEXT = 8  # the tiny judge's n_positions
SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park and the cat ran too",
    "birds sing in the morning light",
    "the quick brown fox jumps over the lazy dog",
]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A word-level tokenizer trained on SENTENCES and a random 1-layer GPT-2 with an 8-token context, saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("judge")
    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=core.get_vocab_size(), n_positions=CONTEXT, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def judge(judge_dir):
    return load_judge(judge_dir)


def reference_chunk_nll(model, chunk: list[int], eos: int) -> tuple[float, int]:
    """One chunk alone, unpadded: NLL (float64 log-softmax) of the targets the documented rule scores."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([chunk])).logits[0].double()
    log_probs = torch.log_softmax(logits, -1)
    total, count, eos_seen = 0.0, 0, int(chunk[0] == eos)
    for j in range(1, len(chunk)):
        eos_seen += int(chunk[j] == eos)
        if chunk[j] != eos or eos_seen == 1:
            total -= float(log_probs[j - 1, chunk[j]])
            count += 1
    return total, count


def reference_sample_nll(judge, text: str, max_tokens: int | None = None) -> tuple[float, int]:
    ids = judge.tokenizer(text)["input_ids"][:max_tokens]
    parts = [reference_chunk_nll(judge.model, ids[a: a + CONTEXT], judge.eos_token_id)
             for a in range(0, len(ids), CONTEXT) if len(ids[a: a + CONTEXT]) > 1]
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


TEXTS = [
    "the cat sat on the mat",                                    # 6 ids: one chunk
    "a dog ran in the park and the cat ran too <eos> the end",   # 14 ids with an EOS: two chunks
    "birds sing <eos> <eos> in the morning light",               # two EOS in one chunk: the second not scored
    "the quick brown fox jumps over the lazy dog " * 2,          # 18 ids: chunks 8 + 8 + 2
    "dog",                                                       # one id: nothing scored
]


def test_generative_perplexity_equals_an_independent_computation(judge):
    """Pooled and per-sample-mean perplexities equal chunk-by-chunk single forwards in float64 (batched with padding:
    3 chunks per forward across sample boundaries)."""
    expected = [reference_sample_nll(judge, t) for t in TEXTS]
    total_nll, total_tokens = sum(e[0] for e in expected), sum(e[1] for e in expected)
    per_sample = [math.exp(nll / n) for nll, n in expected if n]
    result = generative_perplexity(judge, TEXTS, batch_size=3)
    assert result["gen_ppl"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)
    assert result["gen_nll"] == pytest.approx(total_nll / total_tokens, rel=1e-5)
    assert result["gen_ppl_sample_mean"] == pytest.approx(np.mean(per_sample), rel=1e-5)
    nll, counts = judge_nll(judge.model, judge.token_ids(TEXTS), CONTEXT, judge.eos_token_id, batch_size=3)
    assert counts.tolist() == [e[1] for e in expected]
    ids = judge.token_ids(TEXTS)
    assert ids[2].count(judge.eos_token_id) == 2 and len(ids[2]) == 8 and counts[2] == 6  # 7 targets, 2nd EOS out
    assert len(ids[1]) == 14 and counts[1] == 7 + 5 and counts[4] == 0
    assert nll == pytest.approx([e[0] for e in expected], rel=1e-5)


def test_a_text_longer_than_the_context_is_chunked_as_documented(judge):
    """18 judge ids with an 8-token context: chunks [0, 8), [8, 16), [16, 18), each alone, first id of each unscored
    (7 + 7 + 1 targets); ``max_tokens`` cuts first (10 ids: chunks of 8 and 2, 7 + 1 targets)."""
    text = TEXTS[3]
    ids = judge.token_ids([text])[0]
    assert len(ids) == 18 and chunk_bounds(18, CONTEXT) == [(0, 8), (8, 16), (16, 18)]
    nll, counts = judge_nll(judge.model, [ids], CONTEXT, judge.eos_token_id)
    assert counts[0] == 15
    parts = [reference_chunk_nll(judge.model, ids[a:b], judge.eos_token_id) for a, b in chunk_bounds(18, CONTEXT)]
    assert nll[0] == pytest.approx(sum(p[0] for p in parts), rel=1e-5)
    # the second chunk does not see the first: scoring it alone gives the same as inside the long text
    alone, _ = judge_nll(judge.model, [ids[8:16]], CONTEXT, judge.eos_token_id)
    assert alone[0] == pytest.approx(parts[1][0], rel=1e-5)
    cut, cut_counts = judge_nll(judge.model, judge.token_ids([text], max_tokens=10), CONTEXT, judge.eos_token_id)
    assert cut_counts[0] == 8 and cut[0] == pytest.approx(reference_sample_nll(judge, text, 10)[0], rel=1e-5)


def test_eos_rule_scores_the_first_eos_of_each_chunk_only():
    eos = 9
    chunk = torch.tensor([[1, eos, 2, eos, 3, eos], [eos, 1, eos, 2, 3, 4]])
    # row 0 targets: eos (first: scored), 2, eos (second: not), 3, eos (third: not)
    # row 1: the first EOS is position 0, never a target, so the next EOS is the second and not scored
    assert scored_targets(chunk, eos).tolist() == [[True, True, False, True, False], [True, False, True, True, True]]
    assert scored_targets(chunk, None).all()


def test_unigram_entropy_equals_a_hand_computation():
    assert unigram_entropy([5, 5, 7, 9]) == pytest.approx(1.5 * math.log(2))  # p = 1/2, 1/4, 1/4
    assert unigram_entropy([3, 3, 3]) == 0.0
    assert unigram_entropy(list(range(8))) == pytest.approx(math.log(8))


def test_distinct_n_per_sample_and_over_a_set_equal_hand_counts():
    sample = [1, 2, 1, 2, 3]  # bigrams 12 21 12 23; trigrams 121 212 123; 4-grams 1212 2123
    assert [distinct_ngrams(sample, n) for n in (1, 2, 3, 4)] == [(3, 5), (3, 4), (3, 3), (2, 2)]
    assert distinct_ngrams([1, 2], 3) == (0, 0)
    # over the set: n-grams do not cross samples; [1, 2] and [2, 1] share no bigram but share unigrams
    assert corpus_distinct_ngrams([[1, 2], [2, 1], [1, 2]], 2) == (2, 3)
    assert corpus_distinct_ngrams([[1, 2], [2, 1], [1, 2]], 1) == (2, 6)


def test_ngram_hashes_identify_ngrams_by_content_and_order():
    h = ngram_hashes([4, 5, 6, 4, 5, 6, 5, 4], 3)
    assert h[0] == h[3] and len(set(h.tolist())) == 5  # 456 564 645 456 565 654
    assert ngram_hashes([4, 5], 2)[0] != ngram_hashes([5, 4], 2)[0]
    assert ngram_hashes([4, 5], 2)[0] != ngram_hashes([4, 5], 1)[0]


def test_bleu_equals_hand_computed_cases():
    # p1..p4 = 4/5, 3/4, 2/3, 1/2, equal lengths (no penalty): BLEU = (1/5)^(1/4)
    assert sentence_bleu([[1, 2, 3, 4, 5]], [1, 2, 3, 4, 6]) == pytest.approx(0.2 ** 0.25)
    # short hypothesis: p1..p3 = 1, no 4-gram (0 / 1 -> 0.1 / 1), brevity exp(1 - 5/3)
    assert sentence_bleu([[1, 2, 3, 4, 5]], [1, 2, 3]) == pytest.approx(math.exp(-2 / 3) * 0.1 ** 0.25)
    # clipping: 'a' four times against one 'a'; no bigram match (0.1 / 3), trigrams 0.1 / 2, 4-grams 0.1 / 1
    assert sentence_bleu([[7, 8]], [7, 7, 7, 7]) == pytest.approx((0.25 * 0.1 / 3 * 0.1 / 2 * 0.1) ** 0.25)
    # clipping takes the largest count in any ONE reference; brevity the closest length (tie: the shorter, 4)
    refs = [[7, 7, 9, 9], [7, 9, 9, 9, 9, 9]]
    hyp = [7, 7, 7, 9, 9]
    # 7: 3 in hyp, at most 2 in one reference (3 summed over both) -> 2 + 2 = 4 of 5; bigrams 77 77 79 99 -> 1 + 1
    # + 1 (99: 4 in ref 1) = 3 of 4; trigrams 777 779 799 -> 2 of 3; 4-grams 7779 7799 -> 1 of 2
    # lengths 4 and 6 are both 1 from 5: the shorter counts and 5 > 4 (no penalty; 6 would give exp(-0.2))
    assert sentence_bleu(refs, hyp) == pytest.approx(0.2 ** 0.25)
    assert sentence_bleu([[1, 2]], [3, 4]) == 0.0  # no unigram match


def test_bleu_matches_nltk_when_installed():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    rng = np.random.default_rng(0)
    smoothing = nltk_bleu.SmoothingFunction().method1
    for _ in range(20):
        refs = [rng.integers(0, 5, rng.integers(1, 12)).tolist() for _ in range(3)]
        hyp = rng.integers(0, 5, rng.integers(1, 12)).tolist()
        assert sentence_bleu(refs, hyp) == pytest.approx(
            nltk_bleu.sentence_bleu(refs, hyp, smoothing_function=smoothing), abs=1e-12)


def test_self_bleu_equals_sentence_bleu_against_the_others():
    rng = np.random.default_rng(1)
    samples = [rng.integers(0, 6, rng.integers(0, 15)) for _ in range(12)]  # small vocabulary: many matches
    samples[3] = samples[5].copy()  # a duplicate: the top count of its n-grams is shared
    expected = [sentence_bleu([s.tolist() for j, s in enumerate(samples) if j != i], samples[i].tolist())
                for i in range(len(samples))]
    assert self_bleu(samples) == pytest.approx(expected, abs=1e-12)
    assert self_bleu([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]]) == pytest.approx([0.2 ** 0.25] * 2)


def test_copy_rate_equals_an_independent_count(tmp_path):
    rng = np.random.default_rng(2)
    documents = [rng.integers(0, 4, rng.integers(2, 30)) for _ in range(20)]
    n = 3
    reference_grams = {tuple(d[i: i + n]) for d in documents for i in range(len(d) - n + 1)}
    reference = ReferenceNgrams.from_sequences(documents, n=n)
    assert len(reference) == len(reference_grams)
    assert len(ReferenceNgrams.from_sequences(documents, n=n, compact_every=5).hashes) == len(reference)
    reference.save(tmp_path / "ref.npz")
    loaded = ReferenceNgrams.load(tmp_path / "ref.npz")
    assert loaded.n == n and np.array_equal(loaded.hashes, reference.hashes)
    for sample in [rng.integers(0, 5, 40) for _ in range(5)] + [np.array([1, 2])]:
        grams = [tuple(sample[i: i + n]) for i in range(len(sample) - n + 1)]
        assert copy_rate_counts(sample, loaded) == (sum(g in reference_grams for g in grams), len(grams))


def test_two_halves_merge_to_the_whole(judge):
    """Two ranks' sums, added (by hand, and through sharded_text_metrics' one reduction), give the one-rank numbers;
    the subset comes from rank 0 only, whose first samples are the whole set's first."""
    rng = np.random.default_rng(3)
    vocab = judge.tokenizer.get_vocab()
    words = sorted(w for w in vocab if not w.startswith("<"))
    tokens = rng.integers(0, 12, (8, 14))
    texts = [" ".join(words[t % len(words)] for t in row) for row in tokens]
    reference = ReferenceNgrams.from_sequences(rng.integers(0, 12, (6, 40)), n=2)

    def accumulator():
        return TextMetricAccumulator(judge, reference, subset_size=4, judge_batch_size=3)

    whole = accumulator()
    whole.update(torch.as_tensor(tokens[:3]), texts[:3])
    whole.update(tokens[3:].tolist(), texts[3:])  # a list of id lists works too
    ranks = [accumulator(), accumulator()]
    ranks[0].update(tokens[:4], texts[:4])
    ranks[1].update(tokens[4:], texts[4:])
    expected = whole.compute()
    merged = reduce_text_sums(add_text_sums(ranks[0].sums(), ranks[1].sums(with_subset=False)))
    vectors = [sums_to_tensor(r.sums(rank == 0), r.keys) for rank, r in enumerate(ranks)]
    sharded = [sharded_text_metrics(r, lambda t, op: vectors[0] + vectors[1] if op == "sum" else None, rank)
               for rank, r in enumerate(ranks)]
    assert expected["samples"] == 8 and all(v is not None for v in expected.values())
    for result in (merged, *sharded):
        assert result.keys() == expected.keys()
        for key, value in expected.items():
            assert result[key] == pytest.approx(value, rel=1e-9), key
    # the pieces are the functions': the entropy is the mean of the rows', Self-BLEU the first 4 samples'
    assert expected["entropy"] == pytest.approx(np.mean([unigram_entropy(r) for r in tokens]))
    assert expected["self_bleu"] == pytest.approx(self_bleu(tokens[:4]).mean())
    assert expected["distinct_2"] == pytest.approx(np.mean([u / t for u, t in (distinct_ngrams(r, 2) for r in tokens)]))
    copied, total = np.sum([copy_rate_counts(r, reference) for r in tokens], axis=0)
    assert expected["copy_rate"] == pytest.approx(copied / total)


def test_metrics_without_judge_or_reference_are_none():
    acc = TextMetricAccumulator(subset_size=0)
    acc.update([[1, 2, 3], [4, 4]], texts=["a", "b"])  # texts without a judge: not scored
    result = acc.compute()
    assert result["gen_ppl"] is None and result["copy_rate"] is None and result["self_bleu"] is None
    assert result["entropy"] == pytest.approx((math.log(3) + 0.0) / 2)
    assert result["distinct_3"] == 1.0  # only the first sample has a trigram
    with pytest.raises(ValueError, match="token rows but"):
        acc.update([[1, 2]], texts=["a", "b"])


def test_batched_rows_give_the_per_sample_functions_numbers():
    """A (B, L) batch goes through the vectorised path, a list of rows through one row at a time: same sums, and
    those of unigram_entropy / distinct_ngrams / copy_rate_counts."""
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 9, (6, 11))
    reference = ReferenceNgrams.from_sequences(rng.integers(0, 9, (3, 50)), n=3)
    batched, listed = (TextMetricAccumulator(reference=reference, subset_size=0) for _ in range(2))
    batched.update(torch.as_tensor(tokens))
    listed.update(tokens.tolist())
    assert batched.sums() == pytest.approx(listed.sums(), rel=1e-12)
    result = batched.compute()
    assert result["entropy"] == pytest.approx(np.mean([unigram_entropy(r) for r in tokens]), rel=1e-12)
    for n in (1, 2, 3, 4):
        ratios = [u / t for u, t in (distinct_ngrams(r, n) for r in tokens)]
        assert result[f"distinct_{n}"] == pytest.approx(np.mean(ratios), rel=1e-12)
    copied, total = np.sum([copy_rate_counts(r, reference) for r in tokens], axis=0)
    assert result["copy_rate"] == pytest.approx(copied / total)
