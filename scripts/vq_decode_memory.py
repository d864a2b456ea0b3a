"""Peak host memory of decoding one image with the released Meissonic / aMUSEd VQ architecture (random weights, fp32,
no gradients): what ``decode_batch_size`` bounds.

    python scripts/vq_decode_memory.py 0 /tmp/vq/vqvae      # write the random VQ folder once
    python scripts/vq_decode_memory.py 64 /tmp/vq/vqvae     # 64x64 tokens = 1024 px, in a fresh process

Prints one JSON line: the increase of the peak resident set size (``ru_maxrss``) while decoding, and the time.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # fixtures/: the random-weight layouts


def main(argv: list[str]) -> None:
    side, folder = int(argv[0]), Path(argv[1])
    if side == 0:
        from diffusers import VQModel
        from fixtures.released_layouts import RELEASED_VQ

        torch.manual_seed(0)
        VQModel(**RELEASED_VQ).save_pretrained(str(folder))
        return
    from dimo_lightning.tokenizers.diffusers_vq import DiffusersVQTokenizer

    tokenizer = DiffusersVQTokenizer.from_pretrained(folder, decode_batch_size=1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    codes = torch.randint(0, tokenizer.codebook_size, (1, side, side))
    start = time.perf_counter()
    images = tokenizer.decode(codes)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"tokens": side, "pixels": side * tokenizer.downsample_factor,
                      "decoder_params": sum(p.numel() for p in tokenizer.parameters()),
                      "rss_before_gib": round(before, 2), "rss_peak_gib": round(peak, 2),
                      "decode_peak_increase_gib": round(peak - before, 2), "decode_s": round(seconds, 1),
                      "shape": list(images.shape)}))


if __name__ == "__main__":
    main(sys.argv[1:])
