"""Sample an exported student and write a grid, without Lightning (torch, safetensors and PIL only).

    python examples/sample_exported.py --student runs/python_api/student --labels 0,1,2,3 --num 8 --output grid.png

``load_student`` rebuilds the network and the tokenizer from ``config.json``; the teacher is never loaded. The
script ends by listing the Lightning modules it imported (there are none).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the custom tokenizer of custom_teacher.py, if used

from dimo_lightning.commands.sample import image_grid, parse_labels, save_png  # noqa: E402
from dimo_lightning.inference.export import load_student  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", required=True, help="folder written by `dimo export`")
    parser.add_argument("--labels", default="0,1,2,3", help="comma-separated class labels (a grid row each)")
    parser.add_argument("--num", type=int, default=8, help="samples per label (grid columns)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("grid.png"))
    args = parser.parse_args(argv)

    pipeline = load_student(args.student)
    labels = torch.tensor(parse_labels(args.labels)).repeat_interleave(args.num)
    images = pipeline(labels, seed=args.seed)  # (M, C, H, W) in [0, 1]
    save_png(image_grid(images, ncol=args.num), args.output)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning"))
    print(f"wrote {len(images)} samples to {args.output}; Lightning modules imported: {loaded or 'none'}")
    return args.output


if __name__ == "__main__":
    main()
