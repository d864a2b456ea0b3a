
"""Memory and speed of Di[M]O on a full-size Meissonic with random weights: bf16-mixed, gradient checkpointing,
batch 2, a few iterations, one device.

A random-weight folder in the published layout (1,006.9M-parameter transformer, CLIP-H text encoder, the released VQ
model; ``save_random_released`` in tests/fixtures/released_layouts.py) is written once and loaded through
:class:`~dimo_lightning.teachers.meissonic.MeissonicTeacher`, so the run exercises the real loading path and every
pass costs what the released model's does. The module uses the values of ``configs/meissonic.yaml`` (one micro-batch
of 2 per update instead of 8, so an iteration is one official micro-step). Prints one ``GPU_MEISSONIC {json}`` line
(peak memory, iterations/s, parameter counts) and writes ``OUT/result.json`` and ``OUT/samples.png`` (student samples
decoded by the VQ model, random weights: noise, not quality).

    python scripts/gpu_meissonic.py --out runs/gpu_meissonic
    python scripts/gpu_meissonic.py --tiny --accelerator cpu --out /tmp/dry     # CPU dry run (tiny architecture)

Run by scripts/gpu_meissonic.sh.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from dimo_lightning.data.prompts import PromptDataModule
from dimo_lightning.teachers.meissonic import MEISSONIC_NEGATIVE_PROMPT, MeissonicTeacher
from dimo_lightning.training.ema import StudentEMA
from dimo_lightning.training.module import DiMOModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # fixtures/: the random-weight layouts
from fixtures.released_layouts import save_random_released  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "configs" / "prompts" / "t2i_prompts.txt"


class Speed(Callback):
    """Wall time of each training iteration (the device is synchronised at batch ends: measurement only)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self._start = 0.0
        self.peak_memory_gib: float | None = None

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer, pl_module):
        if pl_module.device.type == "cuda":
            self.peak_memory_gib = torch.cuda.max_memory_allocated(pl_module.device) / 2**30

    def iterations_per_second(self) -> float:
        timed = self.times[self.warmup:] or self.times
        return len(timed) / sum(timed)


def run(args: argparse.Namespace) -> dict:
    """Build (or reuse) the random folder, distill ``warmup + iterations`` steps, return the measurements."""
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = args.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="random_meissonic_"))
    started = time.perf_counter()
    if not (folder / "transformer").is_dir():
        save_random_released(folder, "meissonic-tiny" if args.tiny else "meissonic-full", seed=0,
                             device="cuda" if cuda else "cpu")
    written = time.perf_counter()
    teacher = MeissonicTeacher(str(folder), resolution=8 if args.tiny else 1024,
                               negative_prompt=MEISSONIC_NEGATIVE_PROMPT, gradient_checkpointing=True,
                               decode_batch_size=2)
    loaded = time.perf_counter()
    steps = args.warmup + args.iterations
    module = DiMOModule(teacher, optimizer_gen=lambda p: torch.optim.Adam(p, lr=1e-6, eps=1e-6),
                        optimizer_aux=lambda p: torch.optim.Adam(p, lr=1e-6, eps=1e-6),
                        student={"r_init": 0.5, "emb_noise_sigma": 0.3},
                        targets={"mask_schedule": "cosine", "mask_ratio_clamp": [0.02, 0.98], "cfg_scale": 4.0},
                        aux={"mask_schedule": "cosine"},
                        optim={"max_generator_steps": steps, "fix_emb_layer": True},
                        run={"seed": 42})
    speed = Speed(args.warmup)
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, precision=args.precision, max_epochs=-1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[speed, StudentEMA(decay=0.9999)], default_root_dir=str(args.out),
    )
    data = PromptDataModule(train_prompts=str(PROMPTS), eval_prompts=None, batch_size=args.batch_size,
                            batches_per_epoch=steps, seed=42)
    trainer.fit(module, data)
    module.to("cuda" if cuda else "cpu")
    with torch.no_grad(), torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16,
                                         enabled=args.precision.startswith("bf16")):
        prompts = ["a red fox curled up asleep in fresh snow", "a lighthouse on a rocky coast during a storm"]
        codes = module.generate(teacher.encode_condition(prompts))
    images = teacher.decode(codes)
    save_grid(images, args.out / "samples.png")
    count = sum(p.numel() for p in teacher.network.parameters())
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "tiny": bool(args.tiny),
        "precision": args.precision,
        "batch_size": args.batch_size,
        "gradient_checkpointing": True,
        "transformer_parameters": count,
        "text_encoder_parameters": sum(p.numel() for p in teacher.text_encoder.parameters()),
        "vq_decoder_parameters": sum(p.numel() for p in teacher.tokenizer.parameters()),
        "iterations": len(speed.times),
        "warmup": args.warmup,
        "iterations_per_second": round(speed.iterations_per_second(), 4),
        "seconds_per_iteration": [round(t, 3) for t in speed.times],
        "peak_memory_gib": None if speed.peak_memory_gib is None else round(speed.peak_memory_gib, 2),
        "image_shape": list(images.shape),
        "image_range": [float(images.min()), float(images.max())],
        "write_random_folder_s": round(written - started, 1),
        "load_teacher_s": round(loaded - written, 1),
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print("GPU_MEISSONIC " + json.dumps(result), flush=True)
    return result


def save_grid(images: torch.Tensor, path: Path) -> None:
    """(B, 3, H, W) in [0, 1] -> one PNG row."""
    from dimo_lightning.commands.sample import image_grid, save_png

    save_png(image_grid(images.cpu(), ncol=images.shape[0]), path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--folder", type=Path, default=None, help="reuse a random folder (written there if empty)")
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=4, help="timed generator steps (one aux step each)")
    parser.add_argument("--warmup", type=int, default=2, help="iterations left out of the speed")
    parser.add_argument("--tiny", action="store_true", help="tiny architecture (CPU dry run of this script)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
