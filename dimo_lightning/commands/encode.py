"""``dimo encode``: real images -> VQGAN token codes for the Soft-Di[M]O discriminator (``RealCodesDataModule``).

    dimo encode --images IMAGENET/train --vqgan pretrained_maskgit/VQGAN --output imagenet_codes.npz
    dimo encode --images images.npz --vqgan pretrained_maskgit/VQGAN --output codes.npz --batch_size 128

Inputs: an image folder with one subfolder per class (the ImageNet ``train`` layout; classes are the sorted
subfolder names, label = position), each image resized (shorter side) and centre-cropped to ``--resolution``; or a
``.npz`` with ``images`` uint8 (M, H, W, 3) or (M, 3, H, W) and ``labels`` (M,), used as they are.
Output: an uncompressed ``.npz`` with ``codes`` (M, h, w) (int16, or int32 for codebooks above 32,767 codes) and
``labels`` (M,) int64. Encoding is batched and streaming: images are read one batch at a time and codes go to a
memory-mapped file, so neither the images nor the codes of the whole set sit in memory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dimo_lightning.data.real_codes import npz_array
from dimo_lightning.tokenizers.vqgan import VQGANTokenizer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".JPEG")


def list_image_folder(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """Files and labels of an ImageFolder layout (one subfolder per class, sorted) -> (files, labels, classes)."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(
            f"--images {folder}: no class subfolders; expected one subfolder per class (the ImageNet train layout)"
        )
    files, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            if path.suffix.lower() in {s.lower() for s in IMAGE_SUFFIXES}:
                files.append(path)
                labels.append(label)
    if not files:
        raise ValueError(f"--images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in its class subfolders")
    return files, labels, classes


def load_image(path: Path, resolution: int) -> np.ndarray:
    """An RGB image resized so that its shorter side is ``resolution`` (bicubic), centre-cropped -> (R, R, 3) uint8."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.size[0] * scale)), max(resolution, round(image.size[1] * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        return np.asarray(image.crop((left, top, left + resolution, top + resolution)))


def _to_nchw(batch: np.ndarray, source: str) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (B, 3, H, W) -> float (B, 3, H, W) in [0, 1]."""
    if batch.dtype != np.uint8 or batch.ndim != 4 or 3 not in (batch.shape[1], batch.shape[-1]):
        raise ValueError(f"{source}: images must be uint8 (M, H, W, 3) or (M, 3, H, W), got {batch.dtype} "
                         f"{batch.shape}")
    tensor = torch.from_numpy(np.array(batch))  # a writable copy of one batch (memory maps are read-only)
    if tensor.shape[1] != 3:
        tensor = tensor.permute(0, 3, 1, 2)
    return tensor.float() / 255.0


class ImageFileDataset(torch.utils.data.Dataset):
    """Item i: (uint8 image (R, R, 3) resized and centre-cropped, label) of ``files[i]``, read when asked for."""

    def __init__(self, files: list[Path], labels: list[int], resolution: int) -> None:
        self.files, self.labels, self.resolution = files, labels, resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return load_image(self.files[i], self.resolution), self.labels[i]


def _stack_items(items: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    # Module level (not a lambda) so that spawned DataLoader workers can pickle it.
    return np.stack([item[0] for item in items]), np.array([item[1] for item in items])


def image_batches(
    images: str | Path, batch_size: int, resolution: int, num_workers: int = 0
) -> tuple[int, Iterator[tuple]]:
    """(M, iterator of (images (B, 3, H, W) float in [0, 1], labels (B,) int64)) over a folder or an ``.npz``.

    Folder images are decoded by ``num_workers`` DataLoader processes (0: in this process), in file order.
    """
    path = Path(images)
    if path.is_dir():
        files, labels, _ = list_image_folder(path)
        loader = torch.utils.data.DataLoader(
            ImageFileDataset(files, labels, resolution), batch_size=batch_size, num_workers=num_workers,
            collate_fn=_stack_items,
        )

        def folder_batches():
            for stacked, batch_labels in loader:
                yield _to_nchw(stacked, str(path)), batch_labels.astype(np.int64)

        return len(files), folder_batches()
    if path.suffix == ".npz" and path.is_file():

        with np.load(path, allow_pickle=False) as archive:
            names = archive.files
        if not {"images", "labels"} <= set(names):
            raise ValueError(f"--images {path}: an .npz input needs 'images' and 'labels' (found {names})")
        array, labels = npz_array(path, "images"), np.asarray(npz_array(path, "labels")).astype(np.int64)
        if len(array) != len(labels):
            raise ValueError(f"--images {path}: {len(array)} images but {len(labels)} labels")

        def npz_batches():
            for start in range(0, len(array), batch_size):
                chunk = np.asarray(array[start : start + batch_size])  # one batch read from the memory map
                yield _to_nchw(chunk, str(path)), labels[start : start + batch_size]

        return len(labels), npz_batches()
    raise FileNotFoundError(f"--images {path}: neither an image folder nor an .npz file")


def encode_images(
    images: str | Path,
    vqgan: str | Path,
    output: str | Path,
    batch_size: int = 64,
    resolution: int = 256,
    device: str = "cpu",
    num_workers: int = 0,
    verbose: bool = True,
) -> Path:
    """Encode real images with a VQGAN's encoder and write ``codes`` and ``labels`` to an uncompressed ``.npz``.

    Args:
        images: image folder (one subfolder per class) or ``.npz`` with ``images`` and ``labels``.
        vqgan: the taming VQGAN folder (``model.yaml`` + ``last.ckpt``), loaded with its encoder.
        output: the ``.npz`` to write.
        batch_size: images per encoder forward.
        resolution: folder images are resized and centre-cropped to this size (a multiple of the VQGAN's stride).
        device: where the VQGAN runs.
        num_workers: processes decoding folder images (DataLoader workers).
        verbose: print progress.

    Returns:
        The path written.
    """

    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    tokenizer = VQGANTokenizer.from_folder(vqgan, keep_encoder=True).to(device)
    if resolution % tokenizer.downsample_factor:
        raise ValueError(
            f"--resolution {resolution} is not a multiple of the VQGAN stride {tokenizer.downsample_factor}"
        )
    total, batches = image_batches(images, batch_size, resolution, num_workers)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    code_dtype = np.int16 if tokenizer.codebook_size <= np.iinfo(np.int16).max else np.int32
    start_time = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        codes_file, labels_file = Path(tmp) / "codes.npy", Path(tmp) / "labels.npy"
        codes_out = labels_out = None
        written = 0
        for pixels, labels in batches:
            codes = tokenizer.encode(pixels.to(device)).cpu().numpy()  # (B, h, w)
            if codes_out is None:
                codes_out = np.lib.format.open_memmap(codes_file, "w+", code_dtype, (total, *codes.shape[1:]))
                labels_out = np.lib.format.open_memmap(labels_file, "w+", np.int64, (total,))
            codes_out[written : written + len(codes)] = codes
            labels_out[written : written + len(codes)] = labels
            written += len(codes)
            if verbose and (written == total or written % (50 * batch_size) == 0):
                rate = written / (time.perf_counter() - start_time)
                print(f"encoded {written}/{total} images ({rate:.1f} images/s)", flush=True)
        codes_out.flush()
        labels_out.flush()
        del codes_out, labels_out
        # Stored, not deflated: RealCodesDataModule memory-maps the members of an uncompressed npz.
        partial = output.with_name(output.name + ".partial")
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            archive.write(codes_file, "codes.npy")
            archive.write(labels_file, "labels.npy")
        partial.replace(output)
    return output


def main(args: list[str] | None = None) -> None:
    """``dimo encode`` command line."""
    parser = argparse.ArgumentParser(prog="dimo encode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="image folder (one subfolder per class) or .npz")
    parser.add_argument("--vqgan", required=True, help="taming VQGAN folder (model.yaml + last.ckpt)")
    parser.add_argument("--output", required=True, help="the .npz to write (codes, labels)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num_workers", type=int, default=0, help="processes decoding folder images")
    ns = parser.parse_args(sys.argv[2:] if args is None else args)
    try:
        path = encode_images(ns.images, ns.vqgan, ns.output, ns.batch_size, ns.resolution, ns.device,
                             ns.num_workers)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"dimo encode: {err}") from err
    print(f"wrote {path}")
