"""Write a random-weight teacher in the MNISTTeacher file layout, for speed benchmarks of any architecture size.

    python scripts/make_random_teacher.py OUT_DIR [--preset maskgit256|tiny] [--seed 0]

``maskgit256`` is the released MaskGIT ImageNet-256 transformer (1024 codes, 1000 classes, 16x16 tokens, width 768,
depth 24, 16 heads, MLP 3072: 174,160,874 parameters) with random weights, paired with a random 1024-code 4x4-patch
codebook, so ``MNISTTeacher(checkpoint=OUT_DIR/teacher.safetensors, codebook=OUT_DIR/codebook.safetensors)`` loads
it. Network passes cost exactly what the real teacher's do; decoding to pixels (not timed by ``dimo bench``) differs.
``tiny`` is a 2-layer, 32-wide version for dry runs on a CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dimo_lightning.nn.transformer import MaskTransformer, count_parameters
from dimo_lightning.tokenizers.patch_vq import PatchVQTokenizer

PRESETS = {
    "maskgit256": dict(codebook_size=1024, num_classes=1000, grid_size=16, hidden_dim=768, depth=24, heads=16,
                       mlp_dim=3072, dropout=0.1),
    "tiny": dict(codebook_size=1024, num_classes=1000, grid_size=16, hidden_dim=32, depth=2, heads=2, mlp_dim=64,
                 dropout=0.1),
}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="maskgit256")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    architecture = PRESETS[args.preset]
    network = MaskTransformer(**architecture)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights = args.out_dir / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(weights))
    weights.with_suffix(".json").write_text(json.dumps(architecture, indent=2) + "\n")
    PatchVQTokenizer(torch.rand(architecture["codebook_size"], 16)).save(args.out_dir / "codebook.safetensors")
    print(f"wrote {weights} ({args.preset}, {count_parameters(network):,} parameters) and codebook.safetensors")
    return weights


if __name__ == "__main__":
    main()
