"""Validate the stroke distance (``mnist-dae``) like the report's FID (``mnist-cnn``), and print a Markdown table.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/validate_strokes.py [--samples 1000] [--seed 0]

Rows, each scored against the 1,000 MNIST val digits (the report's reference) unless said otherwise: two halves of
the val digits (500 vs 500), 1,000 train digits, the PatchVQ reconstructions of the val and of 1,000 train digits,
and the teacher at 1, 4 and 16 steps (``cfg_scale=2.0, choice_temperature=16.0``, labels balanced over classes).
"""

from __future__ import annotations

import argparse
import time

import torch

from dimo_lightning.metrics.fidelity import compute_metrics, load_real_reference
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
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
    teacher = MNISTTeacher()
    for steps in (1, 4, 16):
        start = time.perf_counter()
        rows.append((f"teacher, {steps} step(s)", teacher_images(teacher, args.samples, steps, args.seed), val))
        print(f"sampled the teacher at {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    print("| images (vs the 1,000 val digits unless said) | FID mnist-cnn | FID mnist-dae | precision dae | "
          "recall dae |")
    print("|---|---|---|---|---|")
    for name, fake, real in rows:
        cnn = compute_metrics(fake, real, extractor="mnist-cnn")
        dae = compute_metrics(fake, real, extractor="mnist-dae")
        print(f"| {name} | {cnn['fid']:.2f} | {dae['fid']:.2f} | {dae['precision']:.2f} | {dae['recall']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
