"""GPU scale check: Di[M]O on a full-size MaskGIT-256 with random weights (the released architecture: 174M-parameter
MaskTransformer, f16 VQGAN with 1024 codes), one process, under DDP or FSDP2, bf16-mixed.

Prints one JSON line with peak GPU memory, training iterations/s, FID-1k evaluation throughput and writes a sample
grid. Random weights: the numbers are speed and memory, not quality (the FID uses torch-fidelity's InceptionV3
architecture with random weights, since no weights can be downloaded on the check machine).

    python scripts/gpu_check.py --strategy ddp  --out runs/gpu_check/ddp
    python scripts/gpu_check.py --strategy fsdp --out runs/gpu_check/fsdp
    python scripts/gpu_check.py --tiny --accelerator cpu --strategy fsdp --out /tmp/dry   # CPU dry run

Run by scripts/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from dimo_lightning.data.labels import ClassLabelDataModule
from dimo_lightning.evaluation.metrics.features import frechet_distance
from dimo_lightning.nn.transformer import MaskTransformer, count_parameters
from dimo_lightning.teachers.base import ClassConditionalTeacher
from dimo_lightning.tokenizers.vqgan import VQGANTokenizer
from dimo_lightning.training.ema import StudentEMA
from dimo_lightning.training.module import DiMOModule

TINY_NETWORK = dict(codebook_size=32, num_classes=10, grid_size=4, hidden_dim=32, depth=2, heads=2, mlp_dim=64)
TINY_VQGAN = dict(embed_dim=8, n_embed=32, z_channels=8, resolution=16, ch=32, ch_mult=[1, 1, 1, 1, 1],
                  num_res_blocks=1, attn_resolutions=[1])


class RandomMaskGITTeacher(ClassConditionalTeacher):
    """MaskGIT-256's architecture (or a tiny one) with random weights, frozen, in eval mode."""

    def __init__(self, tiny: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.network = MaskTransformer(**TINY_NETWORK) if tiny else MaskTransformer()
        self.tokenizer = VQGANTokenizer(**TINY_VQGAN) if tiny else VQGANTokenizer()
        with torch.no_grad():
            self.tokenizer.quantize.embedding.weight.normal_()  # unit-scale codes, as a trained codebook
        self.eval().requires_grad_(False)


class Evaluate(Callback):
    """The FID-1k check and the grid at the end of training, while the model is still on its device and sharded
    (Lightning moves it to the CPU in teardown)."""

    def __init__(self, num_samples: int, batch_size: int, precision: str, out: Path) -> None:
        self.args = (num_samples, batch_size, precision, out)
        self.result: dict = {}

    def on_train_end(self, trainer, pl_module):
        cuda = pl_module.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self.result = fid_check(pl_module, *self.args)
        peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30 if cuda else None
        self.result["peak_memory_eval_gib"] = peak


class Speed(Callback):
    """Wall time of each training iteration (synchronising the device at batch ends: measurement only)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer, pl_module):  # before Evaluate resets the peak
        cuda = pl_module.device.type == "cuda"
        self.peak_memory_gib = torch.cuda.max_memory_allocated(pl_module.device) / 2**30 if cuda else None

    def iterations_per_second(self) -> float:
        timed = self.times[self.warmup:] or self.times
        return len(timed) / sum(timed)


def random_inception(device: torch.device, scratch: Path):
    """An InceptionV3 with random weights (its real cost, no download) as ``uint8 (B, 3, H, W) -> (B, 2048)``:
    torch-fidelity's, or torchvision's where torch-fidelity is not installed (the GPU image lacks it)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        import torchvision

        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
        net.fc = torch.nn.Identity()
        net = net.eval().to(device)
        mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

        def torchvision_features(images: torch.Tensor) -> torch.Tensor:
            x = torch.nn.functional.interpolate(images.float() / 255, size=(299, 299), mode="bilinear")
            return net((x - mean) / std)

        return torchvision_features

    original = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, *args, **kwargs: None  # keep the random init
    try:
        path = scratch / "empty_inception.pth"
        torch.save({}, path)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
        path.unlink()
    finally:
        FeatureExtractorInceptionV3.load_state_dict = original
    net = net.eval().to(device)
    return lambda images: net(images)[0]


@torch.no_grad()
def features(extractor, images_uint8: torch.Tensor) -> np.ndarray:
    return extractor(images_uint8).double().cpu().numpy()


def statistics(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    feats = np.concatenate(rows)
    return feats.mean(0), np.cov(feats, rowvar=False)


@torch.no_grad()
def fid_check(module: DiMOModule, num_samples: int, batch_size: int, precision: str, out: Path) -> dict:
    """FID of ``num_samples`` one-step EMA samples against as many random reference images, in batches; the
    sample grid (8 classes x 4) is written to ``out/grid.png``."""
    device = module.device
    teacher = module.teacher
    extractor = random_inception(device, out)
    network = module.student_ema
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    generator = torch.Generator(device=device).manual_seed(0)
    fake, real = [], []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for first in range(0, num_samples, batch_size):
        labels = torch.arange(first, min(first + batch_size, num_samples), device=device) % teacher.num_classes
        with autocast:
            codes = module.generate(labels, network=network, generator=generator)
            images = teacher.decode(codes).float()
        fake.append(features(extractor, (images.clamp(0, 1) * 255).round().to(torch.uint8)))
        noise = torch.randint(0, 256, images.shape, generator=generator, device=device, dtype=torch.uint8)
        real.append(features(extractor, noise))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    fid = frechet_distance(*statistics(fake), *statistics(real))

    labels = torch.arange(8, device=device).repeat_interleave(4)
    with autocast:
        grid_images = teacher.decode(module.generate(labels, network=network, generator=generator)).float()
    save_grid(grid_images, out / "grid.png", columns=4)
    return dict(fid_1k_random_features=float(fid), fid_samples=num_samples, fid_seconds=seconds,
                fid_samples_per_second=num_samples / seconds, grid=str(out / "grid.png"))


def save_grid(images: torch.Tensor, path: Path, columns: int) -> None:
    from PIL import Image

    uint8 = (images.cpu().float().clamp(0, 1) * 255).round().to(torch.uint8)  # (B, C, H, W)
    b, c, h, w = uint8.shape
    rows = math.ceil(b / columns)
    canvas = torch.zeros(c, rows * h, columns * w, dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, columns)
        canvas[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = uint8[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas.permute(1, 2, 0).squeeze(-1).numpy()).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=12, help="generator steps (one aux step each)")
    parser.add_argument("--warmup", type=int, default=3, help="iterations left out of the speed")
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument("--tiny", action="store_true", help="tiny architecture (CPU dry run of this script)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    teacher = RandomMaskGITTeacher(tiny=args.tiny)
    module = DiMOModule(teacher, optimizer_gen=lambda p: torch.optim.Adam(p, lr=1e-5, eps=1e-6),
                        optimizer_aux=lambda p: torch.optim.Adam(p, lr=1e-5, eps=1e-6),
                        student={"r_init": 0.6, "emb_noise_sigma": 0.1},
                        targets={"cfg_scale": 2.0, "divergence_beta": 0.0},
                        aux={"label_smoothing": 0.1},
                        optim={"max_generator_steps": args.iterations, "gen_grad_clip": 1.0, "aux_grad_clip": 1.0},
                        run={"seed": 0})
    strategy = (ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1) if args.strategy == "fsdp"
                else DDPStrategy(find_unused_parameters=True))
    speed = Speed(args.warmup)
    evaluate = Evaluate(args.fid_samples, args.batch_size, args.precision, args.out)
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=1, strategy=strategy, precision=args.precision, max_epochs=-1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[StudentEMA(0.9999), speed, evaluate], default_root_dir=args.out,
    )
    cuda = args.accelerator == "gpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(module, ClassLabelDataModule(teacher.num_classes, args.batch_size, args.iterations + 1))
    fit_seconds = time.perf_counter() - start
    train_peak = speed.peak_memory_gib
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))  # multi-GB: checked that it writes, not kept
    start = time.perf_counter()
    trainer.save_checkpoint(scratch / "last.ckpt")  # a DCP directory under FSDP2
    checkpoint_seconds = time.perf_counter() - start
    shutil.rmtree(scratch, ignore_errors=True)
    result = dict(
        strategy=args.strategy, precision=args.precision, batch_size=args.batch_size, tiny=args.tiny,
        parameters_per_network=count_parameters(teacher.network), vqgan_parameters=count_parameters(teacher.tokenizer),
        generator_steps=module.generator_step, skipped_steps=module.skipped_steps,
        iterations_per_second=speed.iterations_per_second(),
        images_per_second=speed.iterations_per_second() * args.batch_size,
        peak_memory_train_gib=train_peak, fit_seconds=fit_seconds, checkpoint_seconds=checkpoint_seconds,
        loss_aux=float(trainer.callback_metrics["train/loss_aux"]),
        grad_norm_gen=float(trainer.callback_metrics["train/grad_norm_gen"]),
    )
    result.update(evaluate.result)
    if cuda:
        result["device"] = torch.cuda.get_device_name()
    print("GPU_CHECK " + json.dumps(result), flush=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
