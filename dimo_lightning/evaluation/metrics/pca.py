"""Frechet distance in a PCA of pixels: a metric-network-free yardstick for small grey images (MNIST)."""

from __future__ import annotations

import numpy as np
import torch

from dimo_lightning.evaluation.metrics.features import frechet_distance


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
