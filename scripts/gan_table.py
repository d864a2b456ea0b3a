"""The Soft-Di[M]O ablation table from the arms' ``eval.json`` (written by ``scripts/gan_ablation.sh``).

    python scripts/gan_table.py [--runs runs/mnist_gan_ablation] [--main runs/mnist_dimo_gan/version_0/eval.json]
        [--start runs/mnist_gan_ablation/val_demo_t0.6/eval.json] [--arm dimo_cov=PATH/eval.json ...]

``--main`` adds the teacher rows of a full report (same seed and conditions); its student row stands for the
Di[M]O + coverage arm (``configs/mnist/dimo_gan.yaml`` as it is) when that arm has no run of its own (the main run
is that arm plus FIDMonitor, which does not touch the training draws).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ARMS = {
    "dimo_only": ("Di[M]O only (continued)", "-"),
    "dimo_gan": ("Di[M]O + GAN", "on"),
    "dimo_gan_noaug": ("Di[M]O + GAN", "off"),
    "gan_only": ("GAN only", "on"),
    "gan_only_noaug": ("GAN only", "off"),
    "dimo_gan_soft": ("Di[M]O + GAN, soft fake input (the paper's)", "on"),
    "dimo_cov": ("**Di[M]O + coverage** (`configs/mnist/dimo_gan.yaml`)", "-"),
    "dimo_gan_cov": ("Di[M]O + coverage + GAN", "on"),
    "dimo_gan_cov_noaug": ("Di[M]O + coverage + GAN", "off"),
}


def row_cells(row: dict) -> str:
    second = [row.get(k) for k in ("fid2", "recall2")]
    second = " | ".join(f"{v:.2f}" if v is not None else "-" for v in second)
    accuracy = f"{row['accuracy']:.3f}" if row.get("accuracy") is not None else "-"
    return f"{row['fid']:.2f} | {row['precision']:.3f} | {row['recall']:.3f} | {accuracy} | {second}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/mnist_gan_ablation")
    parser.add_argument("--main", default=None, help="a full report (eval.json) with teacher rows")
    parser.add_argument("--start", default=None, help="the report (eval.json) of the checkpoint the arms start from")
    parser.add_argument("--arm", action="append", default=[], metavar="ARM=EVAL_JSON",
                        help="the report of an arm run elsewhere (e.g. a full run of that arm with FIDMonitor)")
    args = parser.parse_args()
    print("| arm | mask augmentation | FID | precision | recall | accuracy | FID (mnist-dae) | recall (mnist-dae) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    if args.main:
        for row in json.loads(Path(args.main).read_text())["rows"]:
            if row["model"] == "teacher":
                print(f"| teacher, {row['steps']} steps | - | {row_cells(row)} |")
    if args.start:
        (row,) = [r for r in json.loads(Path(args.start).read_text())["rows"] if r["model"] == "student"]
        print(f"| start (the Di[M]O checkpoint) | - | {row_cells(row)} |")
    elsewhere = dict(item.split("=", 1) for item in args.arm)
    unknown = sorted(set(elsewhere) - set(ARMS))
    if unknown:
        parser.error(f"--arm: unknown arm(s) {', '.join(unknown)}; arms: {', '.join(ARMS)}")
    for arm, (name, augment) in ARMS.items():
        path = Path(elsewhere.get(arm, Path(args.runs) / arm / "eval.json"))
        if arm == "dimo_cov" and not path.is_file() and args.main:
            path = Path(args.main)  # the main run is this arm: configs/mnist/dimo_gan.yaml as it is
        if path.is_file():
            (row,) = [r for r in json.loads(path.read_text())["rows"] if r["model"] == "student"]
            print(f"| {name} | {augment} | {row_cells(row)} |")


if __name__ == "__main__":
    main()
