"""Real token codes for the Soft-Di[M]O discriminator (opt-in: Di[M]O itself stays data-free).

:class:`RealCodesDataModule` yields training batches ``ConditionBatch(labels (B,), real=codes (B, N))`` of *real*
data: the labels are the conditions the student generates for (so real and fake batches share their classes), the
codes what the discriminator sees as real. Two sources:

* ``"mnist"``: the 4,000 digits of the MNIST ``"train"`` split, tokenized by the shipped PatchVQ codebook. The
  1,000 ``"val"`` digits, the reference of every FID in the report, are never drawn: the split is made by
  :func:`~dimo_lightning.data.mnist.split_indices`, checked disjoint, and the file indices of the rows are kept.
* a path to a ``.npz`` with ``codes`` (M, h, w) integers and ``labels`` (M,) (``dimo encode`` writes one from an
  image folder with a VQGAN). An uncompressed ``.npz`` (``np.savez``, what ``dimo encode`` writes) is memory-mapped:
  1.28M ImageNet code grids are never read into memory at once.

Batches are a pure function of (seed, rank, world size, position), like :mod:`dimo_lightning.data.labels`: every
pass over the data is a fresh seeded permutation, split into equal disjoint shards, one per rank; the loader's
position is saved in Lightning checkpoints, so a resumed run draws the batches an uninterrupted one would have.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from dimo_lightning.core.seeding import derive_seed
from dimo_lightning.data.batch import ConditionBatch
from dimo_lightning.data.labels import ClassLabelDataModule, ResumableLoader, _rank_and_world, check_counts
from dimo_lightning.data.mnist import load_mnist_digits, split_indices
from dimo_lightning.tokenizers.patch_vq import PatchVQTokenizer

MNIST_SOURCE = "mnist"


@dataclass
class RealCodes:
    """Real code grids and their labels.

    Attributes:
        codes: (M, h, w) integer array (numpy, possibly memory-mapped, or a tensor).
        labels: (M,) integer array.
        source: where they came from (a file path or the MNIST split), for error messages.
        file_indices: for MNIST, the row of each sample in the 5,000-digit file; None otherwise.
    """

    codes: np.ndarray | torch.Tensor
    labels: np.ndarray | torch.Tensor
    source: str
    file_indices: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)


def load_mnist_train_codes(codebook: str | None = None, val_fraction: float = 0.2, split_seed: int = 0) -> RealCodes:
    """The MNIST ``"train"`` digits tokenized by the PatchVQ codebook (None: the shipped one); never a val digit."""

    images, labels = load_mnist_digits()
    train_idx, val_idx = split_indices(labels, val_fraction, split_seed)
    overlap = np.intersect1d(train_idx.numpy(), val_idx.numpy())
    if overlap.size:  # by construction impossible; a change to split_indices must not leak the FID reference
        raise RuntimeError(f"MNIST train and val splits share {overlap.size} digits")
    codes = PatchVQTokenizer.from_file(codebook).encode(images[train_idx])  # (4000, 7, 7)
    return RealCodes(codes, labels[train_idx], f"MNIST train split (codebook {codebook or 'asset'})", train_idx)


def _npz_member_memmap(path: Path, name: str) -> np.ndarray | None:
    """Memory-map array ``name`` of an uncompressed ``.npz``; None if it is compressed (then load it normally)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local_header = handle.read(30)  # zip local file header: name and extra-field lengths at bytes 26..29
        name_length = int.from_bytes(local_header[26:28], "little")
        extra_length = int.from_bytes(local_header[28:30], "little")
        handle.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
        offset = handle.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: array {name!r} holds Python objects, not integers")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


def npz_array(path: str | Path, name: str) -> np.ndarray:
    """Array ``name`` of an ``.npz``: memory-mapped if stored uncompressed, else read whole (np.savez_compressed)."""
    mapped = _npz_member_memmap(Path(path), name)
    if mapped is not None:
        return mapped
    with np.load(path, allow_pickle=False) as archive:
        return archive[name]


def load_code_file(path: str | Path) -> RealCodes:
    """Read ``codes`` (M, h, w) and ``labels`` (M,) from a ``.npz`` (memory-mapped when stored uncompressed).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable npz, arrays missing, or wrong shapes / dtypes; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"real codes file not found: {path} (write one with `dimo encode`)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz archive (expected codes (M, h, w) and labels (M,), see `dimo encode`)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
        arrays = {name: npz_array(path, name) for name in ("codes", "labels") if name in names}
    except (zipfile.BadZipFile, OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path} is not a readable .npz of codes and labels: {err}") from err
    missing = {"codes", "labels"} - set(arrays)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)} (found {sorted(names)}); expected codes (M, h, w) and "
                         "labels (M,)")
    codes, labels = arrays["codes"], arrays["labels"]
    if codes.ndim != 3 or labels.ndim != 1 or len(codes) != len(labels):
        raise ValueError(
            f"{path}: codes must be (M, h, w) and labels (M,) of the same M; got {codes.shape} and {labels.shape}"
        )
    for name, array in (("codes", codes), ("labels", labels)):
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{path}: {name} must be integers, got {array.dtype}")
    return RealCodes(codes, labels, str(path))


def check_real_codes(
    data: RealCodes, codebook_size: int, grid_shape: tuple[int, int], num_classes: int, chunk: int = 65536
) -> None:
    """Raise ``ValueError`` (naming the source) if the codes do not fit the teacher's vocabulary, grid or classes.

    The range checks scan the arrays in chunks, so memory-mapped files are not loaded whole.
    """
    if len(data) == 0:
        raise ValueError(f"{data.source} holds no samples")
    grid = tuple(data.codes.shape[1:])
    if grid != tuple(grid_shape):
        raise ValueError(
            f"{data.source}: code grids are {grid[0]}x{grid[1]} but the teacher's token grid is "
            f"{grid_shape[0]}x{grid_shape[1]} (wrong tokenizer or image resolution?)"
        )
    for name, array, high in (("codes", data.codes, codebook_size), ("labels", data.labels, num_classes)):
        low_seen, high_seen = None, None
        for start in range(0, len(array), chunk):
            part = np.asarray(array[start : start + chunk])
            low_seen = part.min() if low_seen is None else min(low_seen, part.min())
            high_seen = part.max() if high_seen is None else max(high_seen, part.max())
        if low_seen < 0 or high_seen >= high:
            what = f"the teacher's codebook of {high} codes" if name == "codes" else f"{high} classes"
            raise ValueError(
                f"{data.source}: {name} span [{int(low_seen)}, {int(high_seen)}] but must lie in [0, {high}) "
                f"({what}); was it encoded with another tokenizer?"
            )


def shard_indices(seed: int, rank: int, world_size: int, position: int, batch_size: int, num_samples: int,
                  ) -> torch.Tensor:
    """Dataset rows (batch_size,) of batch ``position`` on ``rank``.

    Rank r's stream is the concatenation over passes k = 0, 1, ... of shard r of a seeded permutation of all rows
    (shard r = rows [r S, (r + 1) S) of the permutation, S = num_samples // world_size; the remainder of each pass is
    left out so that shards are equal and disjoint). Batch p is items [p B, (p + 1) B) of that stream.
    """
    shard = num_samples // world_size
    if shard < 1:
        raise ValueError(f"{num_samples} real samples cannot be sharded over {world_size} ranks")
    start, end = position * batch_size, (position + 1) * batch_size
    pieces = []
    for epoch in range(start // shard, (end - 1) // shard + 1):
        generator = torch.Generator().manual_seed(derive_seed(seed, step=epoch))
        rows = torch.randperm(num_samples, generator=generator)[rank * shard : (rank + 1) * shard]
        lo, hi = max(start - epoch * shard, 0), min(end - epoch * shard, shard)
        pieces.append(rows[lo:hi])
    return torch.cat(pieces)


class RealCodeStream(IterableDataset):
    """Yields ``batches_per_epoch`` batches ``(labels (B,), codes (B, h * w))`` per pass from a global position.

    Args:
        data: the real codes.
        batch_size: samples per batch (per rank).
        batches_per_epoch: batches per Lightning epoch.
        seed: base seed of the permutations (the same on every rank: ranks take disjoint shards of them).
    """

    def __init__(self, data: RealCodes, batch_size: int, batches_per_epoch: int, seed: int) -> None:
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.position = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def rows(self, position: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """The dataset rows of batch ``position`` of ``rank``."""
        return shard_indices(self.seed, rank, world_size, position, self.batch_size, len(self.data))

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels (B,) long, codes (B, h * w) long) of dataset rows."""
        if torch.is_tensor(self.data.codes):
            codes, labels = self.data.codes[rows], self.data.labels[rows]
        else:
            order = np.argsort(rows.numpy())  # sorted reads from a memory map, then back to the drawn order
            sorted_rows = rows.numpy()[order]
            inverse = np.argsort(order)
            codes = torch.from_numpy(np.asarray(self.data.codes[sorted_rows])[inverse].astype(np.int64))
            labels = torch.from_numpy(np.asarray(self.data.labels[sorted_rows])[inverse].astype(np.int64))
        return labels.long(), codes.reshape(len(rows), -1).long()

    def __iter__(self):
        rank, world_size = _rank_and_world()
        for _ in range(self.batches_per_epoch):
            rows = self.rows(self.position, rank, world_size)
            self.position += 1
            yield self.batch(rows)


class RealCodesDataModule(ClassLabelDataModule):
    """Real training batches ``ConditionBatch(labels, real=codes)`` for the discriminator and the coverage term;
    validation and prediction yield labels as the parent does.

    Args:
        codes: ``"mnist"`` (the MNIST train split tokenized by ``codebook``) or the path of a ``.npz`` with
            ``codes`` (M, h, w) and ``labels`` (M,) (see ``dimo encode``).
        codebook_size: the teacher's K; codes must lie in [0, K).
        grid_size: the teacher's token grid, one side or [h, w]; the code grids must match it.
        num_classes: number of classes; labels must lie in [0, num_classes).
        batch_size: samples per batch per rank.
        batches_per_epoch: batches in one Lightning epoch.
        seed: seed of the permutations.
        predict_samples: labels ``dimo predict`` samples (balanced), as in :class:`ClassLabelDataModule`.
        codebook: PatchVQ codebook for ``"mnist"``; None uses the shipped asset.
        val_fraction: the MNIST val share that is held out (must match the report's reference split).
        split_seed: the MNIST split seed (idem).
    """

    def __init__(
        self,
        codes: str = MNIST_SOURCE,
        codebook_size: int = 256,
        grid_size: int | list[int] = 7,
        num_classes: int = 10,
        batch_size: int = 64,
        batches_per_epoch: int = 100,
        seed: int = 0,
        predict_samples: int = 1000,
        codebook: str | None = None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
    ) -> None:
        super().__init__(num_classes, batch_size, batches_per_epoch, seed, predict_samples)
        check_counts(codebook_size=codebook_size)
        grid = [grid_size, grid_size] if isinstance(grid_size, int) else list(grid_size)
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid_size must be a positive side or [h, w], got {grid_size!r}")
        self.codes = codes
        self.codebook_size = codebook_size
        self.grid_shape = (int(grid[0]), int(grid[1]))
        self.codebook = codebook
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.data: RealCodes | None = None
        self._code_stream: RealCodeStream | None = None

    def load(self) -> RealCodes:
        """Load and check the real codes (once)."""
        if self.data is None:
            if self.codes == MNIST_SOURCE:
                data = load_mnist_train_codes(self.codebook, self.val_fraction, self.split_seed)
            else:
                data = load_code_file(self.codes)
            check_real_codes(data, self.codebook_size, self.grid_shape, self.num_classes)
            self.data = data
        return self.data

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.load()

    def train_dataloader(self) -> DataLoader:
        if self._code_stream is None:
            self._code_stream = RealCodeStream(self.load(), self.batch_size, self.batches_per_epoch, self.seed)
        return ResumableLoader(self._code_stream, batch_size=None, collate_fn=_condition_batch)


def _condition_batch(pair: tuple[torch.Tensor, torch.Tensor]) -> ConditionBatch:
    """A stream item ``(labels, codes)`` as the training batch."""
    return ConditionBatch(pair[0], real=pair[1])
