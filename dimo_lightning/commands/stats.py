"""``dimo stats``: precompute the reference statistics of FIDMonitor / EvaluationReport once.

    dimo stats --reference data/VIRTUAL_imagenet256_labeled.npz --extractor inception-local \\
        --weights_path weights/weights-inception-2015-12-05-6726825d.pth --output data/imagenet256_inception.npz

The images are streamed in batches (an ADM reference batch is never loaded whole); the output holds the mean and
covariance of all features (FID), the features of all images or of a seeded subset (KID, precision/recall) and
metadata (extractor, feature layer and size, image size, count), and is checked against the evaluation's extractor
when a run starts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dimo_lightning.evaluation.metrics.features import FeatureExtractor, ReferenceStats, compute_reference_stats
from dimo_lightning.evaluation.metrics.image_sources import open_image_source


def reference_stats(
    reference: str,
    extractor: str = "inception-local",
    weights_path: str | None = None,
    max_features: int | None = 50_000,
    seed: int = 0,
    batch_size: int = 100,
    device: str | None = None,
) -> ReferenceStats:
    """Statistics of an image set (see :mod:`dimo_lightning.evaluation.metrics.image_sources` for the specs).

    Args:
        reference: ``mnist-val``, an ``.npz`` of images (``images`` or ADM's ``arr_0``), an image folder or a
            ``dimo predict`` folder.
        extractor: registered torch-fidelity extractor (``inception-local``, ``mnist-cnn``).
        weights_path: the extractor's weights file.
        max_features: store the features of at most this many images, a seeded subset (None: all).
        seed: seed of the subset.
        batch_size: images per extractor forward.
        device: where the extractor runs (None: CUDA if available, else CPU).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = open_image_source(reference, "--reference")
    network = FeatureExtractor(extractor, weights_path, device, flag="--extractor")
    return compute_reference_stats(source.batches(batch_size), source.count, network, max_features, seed, reference)


def stats(
    reference: str,
    output: str,
    extractor: str = "inception-local",
    weights_path: str | None = None,
    max_features: int | None = 50_000,
    seed: int = 0,
    batch_size: int = 100,
    device: str | None = None,
) -> Path:
    """Compute the reference statistics of an image set and save them as ``.npz``.

    Args:
        reference: ``mnist-val``, an ``.npz`` of images (``images`` or ADM's ``arr_0``), an image folder or a
            ``dimo predict`` folder.
        output: the ``.npz`` to write.
        extractor: registered torch-fidelity extractor (``inception-local``, ``mnist-cnn``).
        weights_path: the extractor's weights file (Inception: the file or a folder holding it).
        max_features: store the features of at most this many images, a seeded subset (None: all).
        seed: seed of the subset.
        batch_size: images per extractor forward.
        device: where the extractor runs (None: CUDA if available, else CPU).
    """
    if not output.endswith(".npz"):
        raise ValueError(f"--output must end in .npz, got {output}")
    result = reference_stats(reference, extractor, weights_path, max_features, seed, batch_size, device)
    path = result.save(output)
    print(f"wrote {path}: {result.count} images {result.image_size[0]}x{result.image_size[1]}, extractor "
          f"{result.extractor} ({result.feature_dim}-d {result.feature_layer!r}), {len(result.features)} features kept")
    return path

