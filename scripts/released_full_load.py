"""Load a full-size random-weight Meissonic or aMUSEd (the published layout, fp16 files as released) through its
teacher class on the CPU: strict loading at the released sizes, load time, one teacher forward at the released
resolution, peak resident memory.

    python scripts/released_full_load.py /tmp/meissonic_full write meissonic-full   # about 3 GB of .fp16 files, once
    python scripts/released_full_load.py /tmp/meissonic_full load meissonic-full    # in a fresh process
    python scripts/released_full_load.py /tmp/amused_512 write amused-512            # (or amused-256)

Prints one JSON line.
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
    folder, action = Path(argv[0]), argv[1]
    preset = argv[2] if len(argv) > 2 else "meissonic-full"
    if action == "write":
        from fixtures.released_layouts import save_random_released

        start = time.perf_counter()
        save_random_released(folder, preset, seed=0, fp16=True)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(json.dumps({"write_s": round(time.perf_counter() - start, 1), "folder_gb": round(size / 1e9, 2)}))
        return
    from dimo_lightning.teachers.amused import AmusedTeacher
    from dimo_lightning.teachers.meissonic import MeissonicTeacher

    start = time.perf_counter()
    teacher = (MeissonicTeacher if preset.startswith("meissonic") else AmusedTeacher)(str(folder))
    load = time.perf_counter() - start
    cond = teacher.encode_condition(["a red fox curled up asleep in fresh snow"])
    start = time.perf_counter()
    with torch.no_grad():  # one conditional pass on an all-mask grid
        logits = teacher.apply_network(teacher.network, torch.full((1, teacher.seq_len), teacher.mask_id), cond)
    forward = time.perf_counter() - start
    print(json.dumps({
        "preset": preset, "load_s": round(load, 1), "keys": len(teacher.network.state_dict()),
        "transformer_params": sum(p.numel() for p in teacher.network.parameters()),
        "text_encoder_params": sum(p.numel() for p in teacher.text_encoder.parameters()),
        "vq_decoder_params": sum(p.numel() for p in teacher.tokenizer.parameters()),
        "grid": list(teacher.grid_shape), "resolution": teacher.resolution, "logits": list(logits.shape),
        "one_forward_s": round(forward, 1),
        "max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
