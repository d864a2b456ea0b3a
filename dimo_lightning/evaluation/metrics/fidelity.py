"""FID / KID / precision / recall through torch-fidelity, offline and on CPU, plus the classifier accuracy.

Reference set. The default real reference is the MNIST ``"val"`` split (1,000 digits, 100 per class): the
teacher, the PatchVQ codebook and the metric classifier are all fitted on the ``"train"`` split, so the reference is
unseen by every network in the loop, and a model that memorized its training digits earns no advantage. The price
is a smaller reference (1,000 rather than 5,000 images), which adds small-sample bias to FID: compare FIDs only at
equal sample counts, and read them against the yardstick ``FID(train subset, val)`` measured with the same sizes.

torch-fidelity is imported inside the functions: it costs about 2 s at import (torchvision), which callers that
only need :func:`class_accuracy` or the reference images should not pay.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch.utils.data import Dataset

from dimo_lightning.data.mnist import load_mnist_split
from dimo_lightning.evaluation.metrics.classifier import MNISTClassifier, load_classifier, predict


class UInt8ImageDataset(Dataset):
    """A fixed set of images as torch-fidelity wants them: item i is a uint8 tensor (3, H, W).

    Grey images are stored with one channel and expanded to three per item (a view, copied only when batched).

    Args:
        images: uint8 (M, 1, H, W) or (M, 3, H, W).
    """

    def __init__(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 (M, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.images[i]
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def to_uint8_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Float images in [0, 1] ((M, H, W), (M, 1, H, W) or (M, 3, H, W)) or uint8 -> uint8 (M, C, H, W) on CPU.

    Floats are clamped to [0, 1] and rounded, so 0.5 -> 128 as in torchvision's ``save_image``.
    """
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have shape (M, H, W) or (M, 1|3, H, W), got {tuple(images.shape)}")
    if len(images) == 0:
        raise ValueError(f"{name} is empty")
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"{name} must be float in [0, 1] or uint8, got {images.dtype}")
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


@lru_cache(maxsize=4)
def _reference(split: str) -> tuple[torch.Tensor, torch.Tensor]:

    images, labels = load_mnist_split(split)
    return images[:, None], labels


def load_real_reference(split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
    """The real MNIST reference: images (M, 1, 28, 28) float in [0, 1] and labels (M,) (cached; copies returned).

    Args:
        split: ``"val"`` (default, 1,000 digits unseen by every trained network; see the module docstring),
            ``"train"`` or ``"all"``.
    """
    images, labels = _reference(split)
    return images.clone(), labels.clone()


def compute_metrics(
    fake_images: torch.Tensor,
    real_images: torch.Tensor,
    extractor: str = "mnist-cnn",
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    prc_neighborhood: int = 3,
    weights_path: str | None = None,
    feature_layer: str | None = None,
    cuda: bool = False,
    batch_size: int = 500,
    seed: int = 2020,
) -> dict[str, float]:
    """FID, KID, precision and recall of ``fake_images`` against ``real_images`` with torch-fidelity.

    Nothing is downloaded and nothing is cached on disk. About 1.3 s on one CPU thread for 1,000 vs 1,000 28x28
    images with ``"mnist-cnn"``; unequal sizes (KID over 100 subsets) cost about 3 s more.

    Args:
        fake_images: generated images, float (M, C, H, W) or (M, H, W) in [0, 1] (uint8 accepted), C in {1, 3}.
        real_images: reference images, same layout (see :func:`load_real_reference`).
        extractor: a registered torch-fidelity feature extractor: ``"mnist-cnn"`` (28x28 digits) or
            ``"inception-local"`` (needs ``weights_path``), or any other registered name.
        kid_subset_size: KID subset size, clipped to the smaller of the two sets.
        kid_subsets: number of KID subsets (1 when the clipped subset size equals both set sizes: see the code).
        prc_neighborhood: k of the k-NN balls of precision / recall.
        weights_path: the extractor's weights file (torch-fidelity's ``feature_extractor_weights_path``); None uses
            the shipped classifier for ``"mnist-cnn"``.
        feature_layer: feature used by all metrics; None uses the extractor's defaults.
        cuda: run the extractor on the GPU, if one is available (silently CPU otherwise).
        batch_size: images per extractor forward.
        seed: seed of the KID subset draws.

    Returns:
        ``fid``, ``kid`` (mean over subsets; slightly negative values mean "indistinguishable"), ``kid_std``,
        ``precision`` (share of fakes inside the real k-NN manifold), ``recall`` (share of reals inside the fake
        manifold) and ``f_score``.
    """
    import torch_fidelity

    from dimo_lightning.evaluation.metrics import extractors  # noqa: F401  (registers "mnist-cnn" / "inception-local")

    fake = to_uint8_images(fake_images, "fake_images")
    real = to_uint8_images(real_images, "real_images")
    if fake.shape[2:] != real.shape[2:]:
        raise ValueError(f"fake and real images differ in size: {tuple(fake.shape[2:])} vs {tuple(real.shape[2:])}")
    if min(len(fake), len(real)) < 2:
        raise ValueError("compute_metrics needs at least 2 fake and 2 real images (covariances, KID)")
    if prc_neighborhood < 1 or prc_neighborhood >= min(len(fake), len(real)):
        raise ValueError(f"prc_neighborhood must lie in [1, min set size - 1], got {prc_neighborhood}")
    if kid_subset_size < 2:
        raise ValueError(f"kid_subset_size must be >= 2, got {kid_subset_size}")

    subset_size = min(kid_subset_size, len(fake), len(real))
    if subset_size == len(fake) == len(real):
        # Every subset is then both whole sets in some order and the MMD estimate ignores order: one subset gives
        # the same mean as a hundred (kid_std is then 0), and KID was two thirds of the run time.
        kid_subsets = 1
    layers = {}
    if feature_layer is not None:
        layers = {f"feature_layer_{m}": feature_layer for m in ("fid", "kid", "prc")}
    raw = torch_fidelity.calculate_metrics(
        input1=UInt8ImageDataset(fake),  # torch-fidelity's convention: input1 is generated, input2 is real
        input2=UInt8ImageDataset(real),
        cuda=cuda and torch.cuda.is_available(),
        batch_size=batch_size,
        fid=True,
        kid=True,
        prc=True,
        feature_extractor=extractor,
        feature_extractor_weights_path=weights_path,
        kid_subset_size=subset_size,
        kid_subsets=kid_subsets,
        prc_neighborhood=prc_neighborhood,
        rng_seed=seed,
        save_cpu_ram=True,  # otherwise the DataLoader starts worker processes
        cache=False,  # no feature / statistics files under $TORCH_HOME
        verbose=False,
        **layers,
    )
    return {
        "fid": float(raw[torch_fidelity.KEY_METRIC_FID]),
        "kid": float(raw[torch_fidelity.KEY_METRIC_KID_MEAN]),
        "kid_std": float(raw[torch_fidelity.KEY_METRIC_KID_STD]),
        "precision": float(raw[torch_fidelity.KEY_METRIC_PRECISION]),
        "recall": float(raw[torch_fidelity.KEY_METRIC_RECALL]),
        "f_score": float(raw[torch_fidelity.KEY_METRIC_F_SCORE]),
    }


def class_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: MNISTClassifier | None = None) -> float:
    """Share of samples generated for class c that the classifier reads as c (over all samples).

    Args:
        images: (M, 28, 28) or (M, 1, 28, 28) float in [0, 1] (uint8 accepted; 3 equal channels accepted).
        labels: (M,) the classes the samples were generated for.
        classifier: None loads the shipped MNIST classifier.
    """
    if images.ndim == 4 and images.shape[1] == 3:
        images = images[:, :1]
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    labels = labels.reshape(-1).cpu()
    if len(images) != len(labels):
        raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
    if len(labels) == 0:
        raise ValueError("class_accuracy needs at least one image")
    classifier = classifier if classifier is not None else load_classifier()
    return (predict(classifier, images.detach().float()) == labels).float().mean().item()
