"""The text evaluation report: a sequence teacher at several step counts against the one-step student.

Rows: the teacher's own decoding (its ``sample(cond, steps=...)``) at each step count, the student at one step
(:class:`~dimo_lightning.inference.pipeline.OneStepPipeline`) and, when a held-out text file is given, a
``reference`` row of real text cut as the samples are. Each row holds the metrics of
:mod:`dimo_lightning.evaluation.metrics.text` (generative perplexity under a judge, unigram entropy, distinct-n,
Self-BLEU and corpus distinct-n on the first ``subset_size`` samples, copy rate against a reference corpus) and
tokens/s.

**What is scored.** A sample is the teacher's token row ``codes (L,)`` with its condition (a PrefixCondition:
``fixed`` marks the prompt positions; all False for unconditional text):

- the token metrics (entropy, distinct-n, Self-BLEU, copy rate) read the *generated* ids only, the positions that
  are not fixed, in order (the prompt's ids are the same in every row and would dilute them);
- the judge reads ``prompt + completion``, the two strings of the teacher's ``split_text(codes, cond)``: the
  completion is scored in the context of its prompt (the prompt's own tokens are scored too, identical in every row);
  unconditional samples have an empty prompt, so the judge reads the whole row as the teacher decodes it;
- tokens/s: generated ids per second of sampling (codes only: not decoding or scoring), the slowest rank's time.

**Sharding.** As the image report: batch ``i`` of the global batches is drawn from a generator seeded with
``derive_seed(seed, rank=i, modulus=SAMPLE_SEED_MODULUS)`` and each rank takes a contiguous block of batches
(:func:`~dimo_lightning.core.sharding.rank_batches`), so the samples do not depend on the world size. Each rank
scores its own samples into a :class:`~dimo_lightning.evaluation.metrics.text.TextMetricAccumulator`; only sums
travel: :func:`~dimo_lightning.evaluation.metrics.text.sharded_text_metrics` (one sum-reduction, the subset sums
from rank 0 only) and a second sum-reduction of ``[generated tokens, one slot of seconds per rank]`` for tokens/s.
No text leaves its rank: the sample texts written next to the report are rank 0's first ones (the first of the whole
set, since rank 0 holds the first batches).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dimo_lightning.assets import resolve_asset
from dimo_lightning.core.seeding import SAMPLE_SEED_MODULUS, derive_seed
from dimo_lightning.core.sharding import condition_count, rank_batches, slice_conditions
from dimo_lightning.data.text_corpus import CORPUS_NAME, load_split, split_rows, tokenize_documents
from dimo_lightning.evaluation.metrics.text import (
    DISTINCT_ORDERS,
    Judge,
    ReferenceNgrams,
    TextMetricAccumulator,
    load_judge,
    sharded_text_metrics,
)
from dimo_lightning.evaluation.report import timed_sample

TEXT_COLUMNS = ("gen_ppl", "entropy", "distinct_1", "distinct_2", "distinct_3", "distinct_4", "self_bleu",
                "copy_rate", "tokens_per_s")
SAMPLES_FILE = "samples_{label}.txt"  # one per row, next to eval.json
# Text settings that name a split of the shipped corpus instead of a file (copy_reference, reference_text).
CORPUS_SPLITS = {f"{CORPUS_NAME}-train": "train", f"{CORPUS_NAME}-val": "val"}

Reduce = Callable[[torch.Tensor, str], torch.Tensor]


# ---------------------------------------------------------------- modality


def teacher_modality(teacher: Any) -> str:
    """``teacher.modality`` ("image" | "text"); teachers written before the attribute existed are image teachers."""
    return getattr(teacher, "modality", "image")


def require_text_teacher(teacher: Any, flag: str) -> None:
    """Raise a clear error when ``teacher`` is not a sequence (text) teacher; ``flag`` names the callback."""
    modality = teacher_modality(teacher)
    if modality != "text":
        raise ValueError(f"{flag} evaluates text teachers (modality 'text'); {type(teacher).__name__} has modality "
                         f"{modality!r}: use EvaluationReport / FIDMonitor / SampleGrid instead")


# ---------------------------------------------------------------- the module's settings


def teacher_sample_settings(pl_module: Any, overrides: Mapping[str, Any] | None = None,
                            flag: str = "teacher_sampling") -> dict[str, Any]:
    """The keyword arguments the report passes to ``teacher.sample`` besides ``cond``, ``steps`` and ``generator``:
    the module's teacher sampling settings (``sampling.teacher``, as the image report and ``dimo predict`` use
    them), updated with ``overrides``, restricted to the names ``teacher.sample`` accepts (a text teacher's decoding
    has no classifier-free guidance or MaskGIT choice temperature, say).

    Raises:
        ValueError: an override that ``teacher.sample`` does not accept (names ``flag``).
    """
    kwargs = dict(pl_module.settings.teacher_sample_kwargs())
    accepted = sample_parameters(pl_module.teacher.sample)
    unknown = sorted(set(overrides or {}) - accepted) if accepted is not None else []
    if unknown:
        raise ValueError(f"{flag}: {type(pl_module.teacher).__name__}.sample takes no {', '.join(unknown)} "
                         f"(it takes {', '.join(sorted(accepted))})")
    kwargs.update(overrides or {})
    for name in ("steps", "generator", "cond"):
        kwargs.pop(name, None)
    return kwargs if accepted is None else {k: v for k, v in kwargs.items() if k in accepted}


def sample_parameters(sample: Callable) -> set[str] | None:
    """The keyword names a ``sample`` method accepts (None: it takes ``**kwargs``, so any)."""
    parameters = inspect.signature(sample).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                       inspect.Parameter.KEYWORD_ONLY)}


def max_generator_steps(pl_module: Any) -> int:
    """The module's ``optim.max_generator_steps``."""
    return int(pl_module.settings.optim.max_generator_steps)


# ---------------------------------------------------------------- conditions and references


def text_conditions(trainer: Any, num_samples: int, prompts: Sequence[str] | None = None) -> Any:
    """The ``num_samples`` raw conditions of a text evaluation, identical on every rank: ``prompts`` cycled
    (prompt ``i % len(prompts)`` for sample ``i``) when given, else the DataModule's
    ``evaluation_conditions(num_samples)`` when it has one, else the sample indices ``arange(num_samples)``
    (unconditional text: the teacher's ``encode_condition`` reads only their number)."""
    if prompts is not None:
        prompts = list(prompts)
        return [prompts[i % len(prompts)] for i in range(num_samples)]
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and callable(getattr(datamodule, "evaluation_conditions", None)):
        conditions = datamodule.evaluation_conditions(num_samples)
        if condition_count(conditions) != num_samples:
            raise ValueError(f"evaluation_conditions({num_samples}) returned {condition_count(conditions)} conditions")
        return conditions
    return torch.arange(num_samples)


def document_ids(path: str | Path, tokenizer: Any, flag: str) -> list[list[int]]:
    """The documents of a UTF-8 text file, one per non-blank line, or of a split of the shipped corpus
    (``kjv-train``, ``kjv-val``: one chapter a document), each tokenised without special tokens."""
    if str(path) in CORPUS_SPLITS:
        return tokenize_documents(load_split(CORPUS_SPLITS[str(path)]), tokenizer)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: text file not found: {path} (or a shipped corpus split: "
                                f"{', '.join(CORPUS_SPLITS)})")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{flag}: {path} holds no text")
    return [list(ids) for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]]


def reference_text_rows(path: str | Path, tokenizer: Any, seq_len: int, count: int,
                        flag: str = "reference_text") -> torch.Tensor:
    """Held-out real text as rows (R, seq_len) of the generator's ids, R <= ``count``: every non-blank line of the
    file is a document, tokenised without special tokens and followed by the EOS id (when the tokenizer has one);
    the documents are concatenated in file order and cut into consecutive rows of ``seq_len`` (the tail that does not
    fill a row is dropped), the first ``count`` kept.

    A shipped corpus split (``kjv-val``) is packed as the teacher's training rows instead
    (:func:`~dimo_lightning.data.text_corpus.split_rows`: ``[BOS] piece [EOS]``), the rows of the shipped reference
    figures.

    Raises:
        ValueError: fewer than 2 rows (Self-BLEU needs 2); the message names ``flag``.
    """
    if str(path) in CORPUS_SPLITS:
        return split_rows(CORPUS_SPLITS[str(path)], tokenizer, seq_len)[:count]
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for ids in document_ids(path, tokenizer, flag):
        stream += ids + ([eos] if eos is not None else [])
        if len(stream) >= seq_len * count:
            break
    rows = len(stream) // seq_len
    if rows < 2:
        raise ValueError(f"{flag}: {path} gives {rows} row(s) of {seq_len} tokens; the reference row needs at least "
                         "2 (give more text)")
    rows = min(rows, count)
    return torch.tensor(stream[: rows * seq_len], dtype=torch.long).reshape(rows, seq_len)


_JUDGES: dict[tuple, Judge] = {}
_COPY_REFERENCES: dict[tuple, ReferenceNgrams] = {}


def shared_judge(path: str | Path, device: torch.device, context_length: int | None = None) -> Judge:
    """One judge per (folder, device, context) and process (the report and the monitor share it); ``asset:text_judge``
    is the shipped one."""
    path = resolve_asset(path, "judge")
    key = (str(path.resolve()), str(device), context_length)
    if key not in _JUDGES:
        if not path.is_dir():
            raise FileNotFoundError(f"judge: folder not found: {path} (a local AutoModelForCausalLM folder with its "
                                    "tokenizer)")
        _JUDGES[key] = load_judge(path, device, context_length=context_length)
    return _JUDGES[key]


def shared_copy_reference(spec: str | Path, tokenizer: Any, n: int, flag: str = "copy_reference") -> ReferenceNgrams:
    """The reference n-grams of the copy rate: an ``.npz`` written by ``ReferenceNgrams.save`` (its own n), or a
    text file (every non-blank line a document, tokenised by the generator's tokenizer without special tokens;
    n-grams do not cross lines) or a shipped corpus split (``kjv-train``: chapters, n-grams do not cross them),
    hashed once per process. Large corpora: save the ``.npz`` once and give that."""
    path = Path(spec)
    key = (str(spec) if str(spec) in CORPUS_SPLITS else str(path.resolve()), id(tokenizer), n)
    if key not in _COPY_REFERENCES:
        if path.suffix == ".npz":
            if not path.is_file():
                raise FileNotFoundError(f"{flag}: reference n-gram file not found: {path}")
            _COPY_REFERENCES[key] = ReferenceNgrams.load(path)
        else:
            _COPY_REFERENCES[key] = ReferenceNgrams.from_sequences(document_ids(path, tokenizer, flag), n)
    return _COPY_REFERENCES[key]


# ---------------------------------------------------------------- one rank's samples


@dataclass
class TextBatch:
    """What the scorer reads of a batch: generated ids per sample, and each sample's prompt and completion."""

    tokens: list[np.ndarray]
    prompts: list[str]
    completions: list[str]

    @property
    def judge_texts(self) -> list[str]:
        return [p + c for p, c in zip(self.prompts, self.completions)]

    @property
    def generated(self) -> int:
        return int(sum(len(t) for t in self.tokens))


def describe_samples(teacher: Any, codes: torch.Tensor, cond: Any) -> TextBatch:
    """Codes (B, L) of a text teacher with their condition -> generated ids (the positions ``cond.fixed`` leaves
    free; all when the condition has no ``fixed``) and ``teacher.split_text``'s (prompt, completion) strings."""
    rows = codes.detach().cpu().numpy()
    fixed = getattr(cond, "fixed", None)
    if fixed is None:
        tokens = list(rows)
    else:
        free = ~fixed.detach().cpu().numpy().astype(bool)
        tokens = [row[keep] for row, keep in zip(rows, free)]
    pairs = teacher.split_text(codes, cond)
    return TextBatch(tokens, [p for p, _ in pairs], [c for _, c in pairs])


@dataclass
class RankTexts:
    """One rank's share of one row: its metric sums, generated ids, sampling seconds and first samples.

    Attributes:
        accumulator: the sums of this rank's samples (its subset: its first ``subset_size``).
        tokens: generated ids sampled on this rank.
        seconds: this rank's sampling time (codes only).
        examples: (global index, prompt, completion) of this rank's first ``keep`` samples.
    """

    accumulator: TextMetricAccumulator
    tokens: int = 0
    seconds: float = 0.0
    examples: list[tuple[int, str, str]] = field(default_factory=list)


def score_rank_texts(
    sample: Callable[[Any, torch.Generator], tuple[torch.Tensor, Any]],
    describe: Callable[[torch.Tensor, Any], TextBatch],
    conditions: Any,
    accumulator: TextMetricAccumulator,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    device: torch.device | str,
    keep: int = 0,
) -> RankTexts:
    """Sample and score ``rank``'s batches of ``conditions``. Every rank runs as many forwards as the busiest one
    (a rank with fewer repeats batch 0 and drops it): a sharded (FSDP) network gathers its parameters in every
    forward, and a rank that skipped one would leave the others waiting.

    Args:
        sample: ``(raw conditions, generator) -> (codes (B, L), cond)``; timed.
        describe: ``(codes, cond) -> TextBatch``; not timed.
        conditions: all N raw conditions, identical on every rank.
        accumulator: this rank's (empty) accumulator.
        batch_size: conditions per forward.
        seed: base seed; batch ``i`` uses ``derive_seed(seed, rank=i, modulus=SAMPLE_SEED_MODULUS)``.
        rank, world_size: this rank and the number of ranks.
        device: where the generators live.
        keep: samples whose texts are kept in :attr:`RankTexts.examples` (this rank's first ones).
    """
    device = torch.device(device)
    total = condition_count(conditions)
    mine = rank_batches(total, batch_size, rank, world_size)
    most = max(len(rank_batches(total, batch_size, r, world_size)) for r in range(world_size))
    out = RankTexts(accumulator)
    for step in range(most):
        padding = step >= len(mine)
        index, (start, stop) = mine[step] if not padding else (0, (0, min(batch_size, total)))
        batch = slice_conditions(conditions, start, stop)
        generator = torch.Generator(device=device).manual_seed(
            derive_seed(seed, rank=index, modulus=SAMPLE_SEED_MODULUS))
        (codes, cond), seconds = timed_sample(sample, batch, generator, device)
        if padding:
            continue
        described = describe(codes, cond)
        out.seconds += seconds
        out.tokens += described.generated
        lengths = {len(t) for t in described.tokens}
        tokens = np.stack(described.tokens) if len(lengths) == 1 else described.tokens  # equal: vectorised
        accumulator.update(tokens, described.judge_texts)
        room = keep - len(out.examples)
        if room > 0:
            out.examples += [(start + i, p, c) for i, (p, c) in
                             enumerate(zip(described.prompts[:room], described.completions[:room]))]
    return out


# ---------------------------------------------------------------- rows


@dataclass
class TextEvalRow:
    """One row of the text report: ``model`` (teacher / student / reference), ``steps`` (None for the reference),
    the metrics of :func:`~dimo_lightning.evaluation.metrics.text.reduce_text_sums` and ``tokens_per_s`` (None
    for the reference)."""

    model: str
    steps: int | None
    metrics: dict[str, float | None]
    tokens_per_s: float | None = None

    @property
    def label(self) -> str:
        """``teacher_16``, ``student_1``, ``reference``: the row's name in file names and TensorBoard tags."""
        return self.model if self.steps is None else f"{self.model}_{self.steps}"

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "steps": self.steps, **self.metrics, "tokens_per_s": self.tokens_per_s}


def text_row(name: str, steps: int | None, part: RankTexts, reduce: Reduce, rank: int, world_size: int,
             device: torch.device | str = "cpu", timed: bool = True) -> TextEvalRow:
    """The row from every rank's :class:`RankTexts`: two sum-reductions, collectives (call on every rank): the
    metric sums (:func:`sharded_text_metrics`, the subset from rank 0) and ``[tokens, seconds of rank 0, ...,
    seconds of rank W-1]`` (tokens/s: all ranks' generated ids / the slowest rank's seconds)."""
    metrics = sharded_text_metrics(part.accumulator, reduce, rank, subset_rank=0, device=device)
    timing = torch.zeros(1 + world_size, dtype=torch.float64, device=device)
    timing[0] = float(part.tokens)
    timing[1 + rank] = float(part.seconds)
    timing = reduce(timing, "sum").double().cpu()
    tokens_per_s = float(timing[0]) / max(float(timing[1:].max()), 1e-9) if timed else None
    return TextEvalRow(name, steps, metrics, tokens_per_s)


# ---------------------------------------------------------------- files


def _number(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def format_text_table(rows: Sequence[TextEvalRow], distinct_orders: Sequence[int] = DISTINCT_ORDERS) -> str:
    """A Markdown table of the rows: gen PPL, entropy, distinct-n, Self-BLEU, copy rate, tokens/s ("-": not
    measured: no judge, no copy reference, the reference row's speed)."""
    distinct = [f"distinct-{n}" for n in distinct_orders]
    header = ["model", "steps", "gen PPL", "entropy", *distinct, "Self-BLEU", "copy rate", "tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in rows:
        m = r.metrics
        cells = [r.model, "-" if r.steps is None else str(r.steps), _number(m.get("gen_ppl"), 2),
                 _number(m.get("entropy"), 3), *(_number(m.get(f"distinct_{n}"), 3) for n in distinct_orders),
                 _number(m.get("self_bleu"), 3), _number(m.get("copy_rate"), 4), _number(r.tokens_per_s, 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """JSON-ready: NaN becomes None."""
    return None if isinstance(value, float) and math.isnan(value) else value


def write_text_report(rows: Sequence[TextEvalRow], directory: str | Path, meta: Mapping[str, Any] | None = None,
                      distinct_orders: Sequence[int] = DISTINCT_ORDERS) -> tuple[Path, Path]:
    """Write ``eval.json`` (``{"rows": [...], **meta}``) and ``eval.md`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / "eval.json", directory / "eval.md"
    payload = {"rows": [{k: _plain(v) for k, v in r.as_dict().items()} for r in rows], **(meta or {})}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md = "# Di[M]O text evaluation\n\n" + format_text_table(rows, distinct_orders) + "\n"
    if meta:
        md += "\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n"
    md_path.write_text(md)
    return json_path, md_path


def format_examples(examples: Sequence[tuple[int, str, str]]) -> str:
    """Plain text of the sample texts: a ``=== sample i ===`` header, the prompt (when there is one) and the
    completion, for each."""
    parts = []
    for index, prompt, completion in examples:
        head = f"=== sample {index} ===\n"
        parts.append(head + (f"[prompt] {prompt}\n[completion] " if prompt else "") + completion + "\n")
    return "\n".join(parts)


def markdown_examples(examples: Sequence[tuple[int, str, str]]) -> str:
    """The sample texts as Markdown for TensorBoard's text plugin: a bold header and a fenced block each (the text
    shown as it is, whatever Markdown it holds)."""
    parts = []
    for index, prompt, completion in examples:
        body = (f"[prompt] {prompt}\n[completion] " if prompt else "") + completion
        parts.append(f"**sample {index}**\n\n```\n{body.replace('```', '` ` `')}\n```")
    return "\n\n".join(parts)


def write_examples(directory: str | Path, label: str, examples: Sequence[tuple[int, str, str]]) -> Path:
    """``samples_<label>.txt`` in ``directory`` (see :func:`format_examples`)."""
    path = Path(directory) / SAMPLES_FILE.format(label=label)
    path.write_text(format_examples(examples), encoding="utf-8")
    return path


def log_examples(trainer: Any, tag: str, examples: Sequence[tuple[int, str, str]], step: int) -> None:
    """The sample texts as TensorBoard text ``tag`` (``SummaryWriter.add_text`` of every logger that has it)."""
    if not examples:
        return
    text = markdown_examples(examples)
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text(tag, text, global_step=step)


# ---------------------------------------------------------------- the scoring setup of the callbacks


class TextScoring:
    """What the text callbacks score with: the judge, the copy reference and the accumulator settings. Built from
    plain arguments at construction, loaded in the callbacks' ``setup`` (:meth:`load`) on every rank.

    Args:
        judge: a local folder with a causal LM and its tokenizer (``AutoModelForCausalLM``), or None: no generative
            perplexity.
        judge_context_length: the judge's chunk length (None: its ``n_positions`` / ``max_position_embeddings``).
        judge_batch_size: judge chunks per forward.
        judge_max_tokens: cut each text's judge ids to this many before chunking (MDLM: the generator's length).
        copy_reference: the copy rate's reference corpus: an ``.npz`` of ``ReferenceNgrams`` or a text file (one
            document a line), or None: no copy rate.
        copy_n: n of the copy rate's n-grams (a text reference; an ``.npz`` carries its own).
        subset_size: samples (the first) of Self-BLEU and corpus distinct-n.
        bleu_order: largest n-gram order of Self-BLEU.
        distinct_orders: the n of distinct-n.
    """

    def __init__(self, judge: str | None = None, judge_context_length: int | None = None, judge_batch_size: int = 8,
                 judge_max_tokens: int | None = None, copy_reference: str | None = None, copy_n: int = 8,
                 subset_size: int = 500, bleu_order: int = 4,
                 distinct_orders: Sequence[int] = DISTINCT_ORDERS, flag: str = "TextEvaluationReport") -> None:
        if judge_batch_size < 1 or copy_n < 1 or subset_size < 0 or bleu_order < 1:
            raise ValueError(f"{flag}: judge_batch_size, copy_n and bleu_order must be >= 1 and subset_size >= 0, got "
                             f"{judge_batch_size}, {copy_n}, {bleu_order}, {subset_size}")
        if not distinct_orders or min(distinct_orders) < 1:
            raise ValueError(f"{flag}.distinct_orders must be positive n-gram orders, got {list(distinct_orders)}")
        self.judge_path = judge
        self.judge_context_length = judge_context_length
        self.judge_batch_size = judge_batch_size
        self.judge_max_tokens = judge_max_tokens
        self.copy_reference_spec = copy_reference
        self.copy_n = copy_n
        self.subset_size = subset_size
        self.bleu_order = bleu_order
        self.distinct_orders = tuple(int(n) for n in distinct_orders)
        self.flag = flag
        self.judge: Judge | None = None
        self.copy_reference: ReferenceNgrams | None = None

    def load(self, tokenizer: Any, device: torch.device) -> None:
        """Load the judge (on ``device``) and the copy reference (``tokenizer``: the generator's): fails before the
        first step on a wrong path."""
        if self.judge_path is not None:
            self.judge = shared_judge(self.judge_path, device, self.judge_context_length)
        if self.copy_reference_spec is not None:
            self.copy_reference = shared_copy_reference(self.copy_reference_spec, tokenizer, self.copy_n,
                                                        f"{self.flag}.copy_reference")

    def accumulator(self) -> TextMetricAccumulator:
        """An empty accumulator of one row on one rank."""
        return TextMetricAccumulator(self.judge, self.copy_reference, self.distinct_orders, self.subset_size,
                                     self.bleu_order, self.judge_batch_size, self.judge_max_tokens)

    def meta(self) -> dict[str, Any]:
        """The scoring settings, for ``eval.json``."""
        return {"judge": self.judge_path, "judge_context_length": self.judge.context_length if self.judge else None,
                "judge_max_tokens": self.judge_max_tokens, "copy_reference": self.copy_reference_spec,
                "copy_n": self.copy_reference.n if self.copy_reference is not None else None,
                "subset_size": self.subset_size, "bleu_order": self.bleu_order,
                "distinct_orders": list(self.distinct_orders)}
