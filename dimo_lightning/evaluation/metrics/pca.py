"""Frechet distance in a PCA of pixels: a metric-network-free yardstick for small grey images (MNIST)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)) between two Gaussians."""
    covmean, _ = linalg.sqrtm(cov1 @ cov2, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(cov1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def pca_frechet_distance(samples: torch.Tensor, reference: torch.Tensor, components: int = 32) -> float:
    """Frechet distance between ``samples`` and ``reference`` (M, ...) pixel arrays in the top ``components``
    principal directions of ``reference``."""
    ref = reference.reshape(len(reference), -1).double().numpy()
    gen = samples.reshape(len(samples), -1).double().numpy()
    mean = ref.mean(0)
    _, _, vt = np.linalg.svd(ref - mean, full_matrices=False)
    basis = vt[:components].T  # (D, components)
    a, b = (ref - mean) @ basis, (gen - mean) @ basis
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
