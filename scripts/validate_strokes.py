"""Validate the stroke distance (``mnist-dae``) like the report's FID (``mnist-cnn``), and print a Markdown table.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/validate_strokes.py [--samples 1000] [--seed 0] [--cache FILE.pt]

Rows, each scored against the 1,000 MNIST val digits (the report's reference) unless said otherwise: two halves of
the val digits (500 vs 500), 1,000 train digits, the PatchVQ reconstructions of the val and of 1,000 train digits,
and the teacher at 1, 4 and 16 steps (``cfg_scale=2.0, choice_temperature=16.0``, labels balanced over classes).
Then the same val halves with one half degraded (blur, pixel noise, jagged 4x4 patches). ``--cache`` keeps the
teacher's samples in a file (the 16-step ones take minutes on one thread) for reruns.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dimo_lightning.evaluation.metrics.fidelity import compute_metrics, load_real_reference
from dimo_lightning.teachers.mnist import MNISTTeacher
from dimo_lightning.tokenizers.patch_vq import PatchVQTokenizer


def teacher_images(teacher: MNISTTeacher, samples: int, steps: int, seed: int, batch: int = 250) -> torch.Tensor:
    labels = torch.arange(samples) % 10
    generator = torch.Generator().manual_seed(seed)
    codes = [
        teacher.sample(chunk, steps=steps, cfg_scale=2.0, choice_temperature=16.0, generator=generator)
        for chunk in labels.split(batch)
    ]
    return teacher.decode(torch.cat(codes))


def jagged(images: torch.Tensor, generator: torch.Generator, patch: int = 4) -> torch.Tensor:
    """Each patch x patch block of (M, 1, 28, 28) images rolled by its own offset in {-1, 0, 1}^2 (broken joins)."""
    m, _, h, w = images.shape
    rows, cols = h // patch, w // patch
    shift = torch.randint(-1, 2, (2, rows, cols), generator=generator)
    blocks = images.reshape(m, rows, patch, cols, patch).clone()
    for i in range(rows):
        for j in range(cols):
            offset = (int(shift[0, i, j]), int(shift[1, i, j]))
            blocks[:, i, :, j, :] = torch.roll(blocks[:, i, :, j, :], offset, dims=(1, 2))
    return blocks.reshape(images.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="file keeping the teacher's samples between runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    val, _ = load_real_reference("val")
    train, _ = load_real_reference("train")
    tokenizer = PatchVQTokenizer.from_file()
    generator = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(val), generator=generator)
    train_subset = train[torch.randperm(len(train), generator=generator)[: args.samples]]
    rows = [
        ("val half vs other val half (500 vs 500)", val[perm[:500]], val[perm[500:]]),
        (f"{args.samples} train digits", train_subset, val),
        ("PatchVQ reconstructions of the val digits", tokenizer.decode(tokenizer.encode(val)), val),
        (f"PatchVQ reconstructions of {args.samples} train digits", tokenizer.decode(tokenizer.encode(train_subset)),
         val),
    ]
    cache = Path(args.cache) if args.cache else None
    samples = torch.load(cache) if cache is not None and cache.is_file() else {}
    teacher = MNISTTeacher()
    for steps in (1, 4, 16):
        if steps not in samples:
            start = time.perf_counter()
            samples[steps] = teacher_images(teacher, args.samples, steps, args.seed)
            print(f"sampled the teacher at {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
        rows.append((f"teacher, {steps} step(s)", samples[steps], val))
    if cache is not None:
        torch.save(samples, cache)
    half, other = val[perm[:500]], val[perm[500:]]
    rows += [
        ("val half vs other half, 3x3 box blur", F.avg_pool2d(F.pad(other, (1,) * 4, mode="replicate"), 3, 1), half),
        ("val half vs other half, pixel noise std 0.15",
         (other + 0.15 * torch.randn(other.shape, generator=generator)).clamp(0, 1), half),
        ("val half vs other half, jagged (4x4 patches rolled by <= 1 px)", jagged(other, generator), half),
    ]
    print("| images (vs the 1,000 val digits unless said) | FID mnist-cnn | FID mnist-dae strokes | "
          "FID mnist-dae bottleneck | recall cnn | recall dae |")
    print("|---|---|---|---|---|---|")
    for name, fake, real in rows:
        cnn = compute_metrics(fake, real, extractor="mnist-cnn")
        dae = compute_metrics(fake, real, extractor="mnist-dae")
        code = compute_metrics(fake, real, extractor="mnist-dae", feature_layer="bottleneck")
        print(f"| {name} | {cnn['fid']:.2f} | {dae['fid']:.2f} | {code['fid']:.2f} | {cnn['recall']:.2f} | "
              f"{dae['recall']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
