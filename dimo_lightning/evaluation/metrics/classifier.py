"""The metric network of the embedded MNIST problem: a small CNN digit classifier.

Its 128-d penultimate features feed FID / KID / precision / recall (through the ``"mnist-cnn"`` torch-fidelity
extractor in :mod:`dimo_lightning.evaluation.metrics.extractors`) and its predictions give the conditional accuracy of
samples (does a sample drawn for class c look like a c). It is trained on the ``"train"`` split only, so the
``"val"`` split stays unseen by the teacher, the codebook and this network, and can serve as the FID reference.

The architecture is fixed (no config file): the asset holds only the weights, plus provenance in the safetensors
metadata. Rebuild it with ``make assets`` (``python scripts/build_assets.py classifier``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from dimo_lightning.assets import asset_path
from dimo_lightning.core.weight_files import save_safetensors
from dimo_lightning.data.captions import AttributeThresholds, _check_images, attribute_hits
from dimo_lightning.data.mnist import load_mnist_split

CLASSIFIER_ASSET = "mnist_classifier.safetensors"
FEATURE_DIM = 128
NUM_CLASSES = 10
IMAGE_SIZE = 28


def uint8_digits(x: torch.Tensor, extractor: str) -> torch.Tensor:
    """What torch-fidelity hands a feature extractor, uint8 images (B, 3, 28, 28) or (B, 1, 28, 28), as grey digits
    (B, 1, 28, 28) float in [0, 1]; anything else is a clear error naming ``extractor``."""
    if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] in (1, 3)):
        raise ValueError(
            f"{extractor} expects uint8 images (B, 3, H, W) or (B, 1, H, W), got "
            f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}"
        )
    if x.shape[2:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{extractor} expects {IMAGE_SIZE}x{IMAGE_SIZE} images, got {x.shape[2]}x{x.shape[3]}")
    # Grey images reach torch-fidelity as three equal channels: any one of them is the digit.
    return x[:, :1].float() / 255.0


class MNISTClassifier(nn.Module):
    """conv 32 -> pool -> conv 64 -> pool -> fc 128 (penultimate features) -> fc 10.

    Pooling after each convolution (rather than once after both) keeps a training epoch on one CPU thread at a few
    seconds while losing nothing measurable in accuracy at this data size.

    Args:
        dropout: dropout rate before each fully connected layer (training only).
    """

    def __init__(self, dropout: float = 0.25) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.dropout = nn.Dropout(dropout)
        # Root-mean-square of the penultimate features on the train split, set by build_classifier_asset. The metric
        # features are divided by it: KID's polynomial kernel (x.y / d + 1)^3 assumes features of order 1, and
        # raw ReLU features of size ~3 made KID swing by +-1 between two draws of real digits.
        self.register_buffer("feature_scale", torch.ones(()))

    @staticmethod
    def _check_input(x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[2:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"MNISTClassifier expects images (B, 1, 28, 28) in [0, 1], got {tuple(x.shape)}")
        return x.float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, 28, 28) or (B, 28, 28) float in [0, 1] -> penultimate features (B, 128), post-ReLU."""
        x = self._check_input(x)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 32, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 64, 7, 7)
        return F.relu(self.fc1(self.dropout(x.flatten(1))))  # (B, 128)

    def metric_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> penultimate features / ``feature_scale`` (B, 128): the features of FID / KID / PRC."""
        return self.features(x) / self.feature_scale

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, 128) -> logits (B, 10)."""
        return self.fc2(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, 28, 28) or (B, 28, 28) float in [0, 1] -> logits (B, 10)."""
        return self.classify(self.features(x))


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image by its own integer offset in [-max_shift, max_shift]^2, filling with zeros (background).

    Args:
        images: (B, 1, H, W).
        max_shift: largest shift in pixels along each axis.
        generator: RNG for the offsets.

    Returns:
        (B, 1, H, W) shifted images.
    """
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)  # (B, 1, H + 2s, W + 2s)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    rows = offsets[0][:, None] + torch.arange(h)  # (B, H)
    cols = offsets[1][:, None] + torch.arange(w)  # (B, W)
    batch = torch.arange(b)[:, None, None]
    return padded[:, 0][batch, rows[:, :, None], cols[:, None, :]][:, None]  # (B, 1, H, W)


@torch.no_grad()
def predict(classifier: MNISTClassifier, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted classes (M,) of images (M, 1, 28, 28) or (M, 28, 28) in [0, 1], in eval mode."""
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    preds = [classifier(chunk.to(device)).argmax(1).cpu() for chunk in images.split(batch_size)]
    classifier.train(was_training)
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def train_classifier(
    seed: int = 0,
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    max_shift: int = 2,
    verbose: bool = True,
) -> tuple[MNISTClassifier, float]:
    """Train an :class:`MNISTClassifier` on the ``"train"`` split and measure it on the ``"val"`` split.

    About 2 s per epoch on one CPU thread (4,000 images; 12 epochs in about 25 s). Training is seeded (global
    generator for the initialization and dropout, an explicit one for batches and shifts), so a rerun on the same
    machine gives the same weights.

    Args:
        seed: seeds the initialization, the batch order, dropout and the augmentation.
        epochs: passes over the 4,000 training images.
        batch_size: images per step.
        lr: peak AdamW learning rate (one-cycle cosine schedule).
        weight_decay: AdamW weight decay.
        max_shift: augmentation: random translations of up to this many pixels (0 turns it off). Generated digits
            are less centred than the data, and the shift makes the features robust to that.
        verbose: print one line per epoch.

    Returns:
        The trained classifier (eval mode, frozen, ``feature_scale`` set on the train split) and its accuracy on
        the val split.
    """

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    train_x, train_y = load_mnist_split("train")
    val_x, val_y = load_mnist_split("val")
    train_x = train_x[:, None]  # (N, 1, 28, 28)

    torch.manual_seed(seed)  # the initialization and dropout draw from the global generator
    generator = torch.Generator().manual_seed(seed)
    model = MNISTClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)

    val_acc = float("nan")
    for epoch in range(epochs):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        total_loss = 0.0
        for idx in order.split(batch_size):
            x = random_shift(train_x[idx], max_shift, generator)
            loss = F.cross_entropy(model(x), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(idx)
        val_acc = (predict(model, val_x) == val_y).float().mean().item()
        if verbose:
            print(
                f"epoch {epoch + 1}/{epochs}: train loss {total_loss / len(train_x):.4f}, "
                f"val accuracy {val_acc:.4f} ({time.perf_counter() - start:.1f} s)"
            )
    model.eval().requires_grad_(False)
    model.feature_scale.fill_(feature_rms(model, train_x))
    return model, val_acc


@torch.no_grad()
def feature_rms(classifier: MNISTClassifier, images: torch.Tensor, batch_size: int = 1000) -> float:
    """Root-mean-square of the raw penultimate features of ``images`` (M, 1, 28, 28) in [0, 1], in eval mode."""
    classifier.eval()
    total = sum(classifier.features(chunk).pow(2).sum().item() for chunk in images.split(batch_size))
    return math.sqrt(total / (len(images) * FEATURE_DIM))


def save_classifier(classifier: MNISTClassifier, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the classifier's weights as safetensors (string ``metadata`` goes into the file header)."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    save_safetensors(tensors, path, metadata=metadata)
    return path


def build_classifier_asset(seed: int = 0, path: str | Path | None = None) -> Path:
    """Train the classifier with the fixed recipe and save it as the shipped asset; returns the file written.

    Args:
        seed: training seed.
        path: output file; None writes ``dimo_lightning/assets/mnist_classifier.safetensors``.
    """
    model, val_acc = train_classifier(seed=seed)
    out = Path(path) if path is not None else asset_path(CLASSIFIER_ASSET)
    metadata = {
        "architecture": "MNISTClassifier",
        "seed": str(seed),
        "val_accuracy": f"{val_acc:.4f}",
        "feature_scale": f"{model.feature_scale.item():.6f}",
    }
    save_classifier(model, out, metadata)
    print(f"MNIST classifier val accuracy: {val_acc:.4f}")
    return out


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> MNISTClassifier:
    """Load a classifier saved by :func:`save_classifier`, in eval mode with frozen weights.

    Args:
        path: safetensors file; None loads the shipped asset.
        device: where to put the weights.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is unreadable or its tensors do not match the architecture (missing, unexpected or
            mis-shaped entries); the message names the file.
    """
    path = Path(path) if path is not None else asset_path(CLASSIFIER_ASSET)
    if not path.is_file():
        raise FileNotFoundError(
            f"MNIST classifier weights not found: {path}. Rebuild the shipped assets with `make assets` "
            f"(or `python scripts/build_assets.py classifier`)."
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    model = MNISTClassifier()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not hold MNISTClassifier weights: missing {missing}, unexpected {unexpected}. "
            f"Rebuild it with `make assets`."
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, MNISTClassifier expects "
                f"{tuple(expected[name].shape)}. Rebuild it with `make assets`."
            )
    model.load_state_dict(tensors)
    return model.to(device).eval().requires_grad_(False)


def prompt_faithfulness(images: torch.Tensor, prompts: list[str], classifier=None,
                        thresholds: AttributeThresholds | None = None) -> dict[str, float]:
    """Class, thickness and slant accuracy of images (M, 28, 28) against their prompts.

    ``classifier``: an :class:`~dimo_lightning.evaluation.metrics.classifier.MNISTClassifier` (None loads the shipped
    one).
    Returns ``{"class_accuracy", "thickness_accuracy", "slant_accuracy"}`` (NaN where nothing was judged).
    """

    classifier = classifier if classifier is not None else load_classifier()
    hits = attribute_hits(images, prompts, predict(classifier, _check_images(images)), thresholds)
    return {f"{name}_accuracy": (h / n if n else float("nan")) for name, (h, n) in hits.items()}
