"""Prompt-faithfulness table of a captioned-MNIST text-to-image teacher (docs/text-to-image.md#the-shipped-teacher).

    python scripts/t2i_teacher_table.py                                   # the shipped asset
    python scripts/t2i_teacher_table.py --teacher runs/mnist_t2i_teacher/version_0/t2i_teacher
    python scripts/t2i_teacher_table.py --checkpoint runs/.../checkpoints/last.ckpt --steps 16

The held-out prompts of the validation digits (``eval_prompts()``, the first ``--num-samples``; every prefix is
class-balanced), MaskGIT decoding at each step count with CFG (unconditional branch: the empty prompt, or
``--negative-prompt``), decoded to pixels, then class / thickness / slant accuracy against the prompts
(``attribute_hits``, counts summed over batches) and FID / precision / recall against mnist-val with the mnist-cnn
features. Prints a Markdown table; ``--out`` also writes it with a JSON of the rows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def load_teacher(teacher: str | None, checkpoint: str | None, negative_prompt: str | None):
    """A PromptTeacher from an exported folder, a TextMaskedDiffusionModule checkpoint, or the shipped asset."""
    from dimo_lightning.teachers.prompt import PromptTeacher

    if checkpoint is None:
        return PromptTeacher(path=teacher, negative_prompt=negative_prompt)
    from dimo_lightning.pretraining.text_to_image import TextMaskedDiffusionModule

    module = TextMaskedDiffusionModule.load_from_checkpoint(checkpoint, map_location="cpu")
    with tempfile.TemporaryDirectory() as folder:  # the same export path as the end of fit
        return PromptTeacher(path=str(module.export(folder)), negative_prompt=negative_prompt)


@torch.no_grad()
def evaluate_steps(teacher, prompts: list[str], steps: int, cfg_scale: float, choice_temperature: float,
                   batch_size: int, seed: int, classifier, cfg_ramp: bool = True,
                   ) -> tuple[dict[str, tuple[int, int]], torch.Tensor, float]:
    """Sample one image per prompt -> (attribute hit counts, uint8 images (M, 1, 28, 28), images/s of sampling)."""
    from dimo_lightning.data.captions import attribute_hits
    from dimo_lightning.evaluation.metrics.classifier import predict
    from dimo_lightning.evaluation.metrics.fidelity import to_uint8_images

    generator = torch.Generator().manual_seed(seed)
    totals = {"class": [0, 0], "thickness": [0, 0], "slant": [0, 0]}
    images_u8, elapsed = [], 0.0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        t0 = time.perf_counter()
        cond = teacher.encode_condition(batch)
        codes = teacher.sample(cond, steps=steps, cfg_scale=cfg_scale, cfg_ramp=cfg_ramp,
                               choice_temperature=choice_temperature, generator=generator)
        elapsed += time.perf_counter() - t0
        images = teacher.decode(codes).float().reshape(len(batch), 28, 28).clamp(0, 1)
        for name, (hits, judged) in attribute_hits(images, batch, predict(classifier, images)).items():
            totals[name][0] += hits
            totals[name][1] += judged
        images_u8.append(to_uint8_images(images[:, None]))  # kept as uint8 only: 784 bytes a sample
    hits = {name: (h, n) for name, (h, n) in totals.items()}
    return hits, torch.cat(images_u8), len(prompts) / max(elapsed, 1e-9)


def format_rows(rows: list[dict]) -> str:
    lines = ["| steps | FID | precision | recall | class acc. | thickness acc. | slant acc. | images/s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['fid']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['class_accuracy']:.3f} | {r['thickness_accuracy']:.3f} | {r['slant_accuracy']:.3f} | "
                     f"{r['images_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--teacher", help="exported teacher folder (default: the shipped asset)")
    source.add_argument("--checkpoint", help="a TextMaskedDiffusionModule Lightning checkpoint")
    parser.add_argument("--steps", default="1,2,4,8,16", help="comma-separated MaskGIT step counts")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--cfg-ramp", action=argparse.BooleanOptionalAction, default=True,
                        help="ramp the guidance from 1 at the first step to --cfg-scale at the last (default)")
    parser.add_argument("--choice-temperature", type=float, default=16.0)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)

    from dimo_lightning.data.captions import eval_prompts
    from dimo_lightning.evaluation.metrics.classifier import load_classifier
    from dimo_lightning.evaluation.metrics.fidelity import compute_metrics, load_real_reference

    try:
        step_counts = [int(s) for s in args.steps.split(",")]
    except ValueError:
        parser.error(f"--steps must be comma-separated integers, got {args.steps!r}")
    if any(s < 1 for s in step_counts):
        parser.error(f"--steps must all be >= 1, got {args.steps!r}")
    prompts = eval_prompts()
    if not 2 <= args.num_samples <= len(prompts):
        parser.error(f"--num-samples must lie in [2, {len(prompts)}] (the held-out prompts), got {args.num_samples}")
    prompts = prompts[: args.num_samples]
    teacher = load_teacher(args.teacher, args.checkpoint, args.negative_prompt)
    classifier = load_classifier()
    reference, _ = load_real_reference("val")
    rows = []
    for steps in step_counts:
        hits, images, speed = evaluate_steps(teacher, prompts, steps, args.cfg_scale, args.choice_temperature,
                                             args.batch_size, args.seed, classifier, args.cfg_ramp)
        metrics = compute_metrics(images, reference, extractor="mnist-cnn")
        row = {"steps": steps, "fid": metrics["fid"], "precision": metrics["precision"],
               "recall": metrics["recall"], "images_per_s": speed,
               **{f"{name}_accuracy": h / n if n else float("nan") for name, (h, n) in hits.items()},
               "judged": {name: n for name, (_, n) in hits.items()}}
        rows.append(row)
        print(f"steps {steps}: FID {row['fid']:.3f} class {row['class_accuracy']:.3f} thickness "
              f"{row['thickness_accuracy']:.3f} slant {row['slant_accuracy']:.3f}", flush=True)
    unconditional = f"the negative prompt {args.negative_prompt!r}" if args.negative_prompt else "the empty prompt"
    settings = (f"{args.num_samples} held-out prompts (eval_prompts), CFG {args.cfg_scale} "
                f"{'ramped from 1' if args.cfg_ramp else 'constant'} "
                f"(unconditional branch: {unconditional}), choice temperature {args.choice_temperature}, seed "
                f"{args.seed}; FID / precision / recall against mnist-val with the mnist-cnn features")
    table = format_rows(rows)
    print(table + "\n\n" + settings)
    if args.out:
        out = Path(args.out)
        out.with_suffix(".md").write_text(table + "\n\n" + settings + "\n")
        out.with_suffix(".json").write_text(json.dumps({"rows": rows, "settings": vars(args)}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
