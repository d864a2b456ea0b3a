"""PatchVQTokenizer: vector quantization of non-overlapping image patches with a k-means codebook.

For 28x28 MNIST digits and 4x4 patches this gives a 7x7 grid of 49 tokens; the codebook (K, 16) is fitted with
scikit-learn's MiniBatchKMeans in seconds and ships as a safetensors asset.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from dimo_lightning.assets import asset_path
from dimo_lightning.core.soft_embedding import expected_codebook, grid_probabilities
from dimo_lightning.core.weight_files import save_safetensors


class PatchVQTokenizer(nn.Module):
    """Codes <-> images for single-channel images split into ``patch_size`` x ``patch_size`` patches.

    Args:
        codebook: (K, patch_size * patch_size) float tensor of patch centroids in [0, 1].
        patch_size: side of a square patch.
    """

    def __init__(self, codebook: torch.Tensor, patch_size: int = 4) -> None:
        super().__init__()
        if codebook.ndim != 2 or codebook.shape[1] != patch_size * patch_size:
            raise ValueError(
                f"codebook must have shape (K, {patch_size * patch_size}) for patch_size={patch_size}, "
                f"got {tuple(codebook.shape)}"
            )
        self.patch_size = patch_size
        self.register_buffer("codebook", codebook.float().contiguous())

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    @classmethod
    def fit(
        cls, images: torch.Tensor, codebook_size: int = 256, patch_size: int = 4, seed: int = 0
    ) -> PatchVQTokenizer:
        """k-means codebook of the patches of ``images`` (M, H, W) in [0, 1]."""
        from sklearn.cluster import MiniBatchKMeans

        patches = cls._patches(images, patch_size).reshape(-1, patch_size * patch_size)
        kmeans = MiniBatchKMeans(n_clusters=codebook_size, random_state=seed, batch_size=4096, n_init=3)
        kmeans.fit(patches.numpy())
        return cls(torch.from_numpy(kmeans.cluster_centers_).float().clamp(0, 1), patch_size)

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> PatchVQTokenizer:
        """Load a codebook saved by :meth:`save`; None loads the shipped MNIST codebook."""
        path = Path(path) if path is not None else asset_path("mnist_codebook.safetensors")
        if not path.is_file():
            raise FileNotFoundError(
                f"PatchVQ codebook not found: {path}. Rebuild the shipped assets with `make assets`."
            )
        tensors = load_file(str(path))
        if "codebook" not in tensors:
            raise ValueError(f"{path} holds no 'codebook' tensor (found: {sorted(tensors)})")
        codebook = tensors["codebook"]
        side = int(round(codebook.shape[1] ** 0.5)) if codebook.ndim == 2 else 0
        return cls(codebook, patch_size=max(side, 1))

    def export_record(self) -> dict:
        """How ``dimo export`` rebuilds this tokenizer: the codebook is small, so it travels with the student."""
        return {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "init_args": {"patch_size": self.patch_size},
            "tensors": {"codebook": self.codebook.detach().cpu().contiguous()},
        }

    def save(self, path: str | Path) -> None:
        save_safetensors({"codebook": self.codebook.cpu().contiguous()}, path)

    @staticmethod
    def _patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
        """(M, H, W) or (M, 1, H, W) -> (M, H/p, W/p, p*p)."""
        if images.ndim == 4:
            images = images[:, 0]
        m, h, w = images.shape
        if h % patch_size or w % patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of patch_size={patch_size}")
        x = images.float().reshape(m, h // patch_size, patch_size, w // patch_size, patch_size)
        return x.permute(0, 1, 3, 2, 4).reshape(m, h // patch_size, w // patch_size, patch_size * patch_size)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (M, H, W) or (M, 1, H, W) in [0, 1] -> codes (M, H/p, W/p) long (nearest centroid)."""
        patches = self._patches(images.to(self.codebook.device), self.patch_size)  # (M, h, w, d)
        flat = patches.reshape(-1, patches.shape[-1])
        distances = (
            flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.T + self.codebook.pow(2).sum(1)[None]
        )
        return distances.argmin(1).reshape(patches.shape[:-1])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (M, h, w) in [0, K) -> images (M, 1, h*p, w*p) in [0, 1]."""
        if codes.ndim != 3:
            raise ValueError(f"codes must have shape (M, h, w), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size - 1}] for this codebook; got "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )
        m, h, w = codes.shape
        p = self.patch_size
        patches = self.codebook[codes.to(self.codebook.device)].reshape(m, h, w, p, p)
        return patches.permute(0, 1, 3, 2, 4).reshape(m, 1, h * p, w * p).clamp(0, 1)

    def decode_soft(self, probs: torch.Tensor, grid_shape: tuple[int, int] | None = None) -> torch.Tensor:
        """Differentiable decode of code probabilities: the expected patch ``probs @ codebook`` at each position.

        Equals :meth:`decode` of the argmax codes when ``probs`` are one-hot. No clamping is needed: the codebook
        lies in [0, 1], so any convex combination of its rows does too (and a clamp would cut gradients).

        Args:
            probs: (B, N, K) or (B, h, w, K) probabilities over the K codes (e.g. a student's softmax).
            grid_shape: (h, w) for flat probs; None assumes a square grid.

        Returns:
            (B, 1, h*p, w*p) float32 images, differentiable in ``probs``.
        """

        grid = grid_probabilities(probs, grid_shape)  # (B, h, w, K)
        m, h, w, _ = grid.shape
        p = self.patch_size
        patches = expected_codebook(grid, self.codebook).reshape(m, h, w, p, p)
        return patches.permute(0, 1, 3, 2, 4).reshape(m, 1, h * p, w * p)
