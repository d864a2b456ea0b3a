"""torch-fidelity feature extractors that work offline, registered by name on import.

- ``"mnist-cnn"``: the shipped MNIST classifier (:mod:`dimo_lightning.evaluation.metrics.classifier`); features
  ``"penultimate"`` (B, 128; the post-ReLU fc features divided by the classifier's fixed ``feature_scale``, their
  RMS on the train split), the default for FID / KID / precision-recall, and ``"logits"`` (B, 10), the default
  for the Inception Score.
- ``"mnist-dae"``: a denoising autoencoder of MNIST digits, a second feature space that sees strokes rather than
  classes (:mod:`dimo_lightning.evaluation.metrics.strokes`): ``"strokes"`` (B, 144; code + pooled conv statistics,
  standardised), the default for every metric, and ``"bottleneck"`` (B, 64; the code alone).
- ``"inception-local"``: torch-fidelity's own InceptionV3 (``"inception-v3-compat"``), but only from a local weights
  file: torch-fidelity would otherwise download them from GitHub, which fails (slowly) on offline machines.

torch-fidelity builds an extractor as ``cls(name, features_list, **kwargs)`` with all of ``calculate_metrics``'s
keyword arguments, and passes ``feature_extractor_weights_path`` through: both extractors read their weights from it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch_fidelity import FeatureExtractorBase, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from dimo_lightning.evaluation.metrics.classifier import IMAGE_SIZE, load_classifier, uint8_digits
from dimo_lightning.evaluation.metrics.strokes import StrokeFeatureExtractor

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"


class MNISTFeatureExtractor(FeatureExtractorBase):
    """The shipped MNIST CNN as a torch-fidelity feature extractor.

    Args:
        name: the registered name (``"mnist-cnn"``).
        features_list: requested features, a subset of ``("penultimate", "logits")``.
        feature_extractor_weights_path: classifier safetensors file; None uses the shipped asset.
        **kwargs: the rest of ``calculate_metrics``'s arguments (ignored).
    """

    def __init__(
        self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs
    ) -> None:
        super().__init__(name, features_list)
        self.classifier = load_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "penultimate", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        # Nothing to gain on a network this small, and compiling costs seconds on every calculate_metrics call.
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """uint8 images (B, 3, 28, 28) or (B, 1, 28, 28) -> the requested features, each (B, D) float32."""
        images = uint8_digits(x, "mnist-cnn")  # (B, 1, 28, 28)
        features = self.classifier.features(images)  # (B, 128)
        out = {"penultimate": features / self.classifier.feature_scale}
        if "logits" in self.features_list:
            out["logits"] = self.classifier.classify(features)  # (B, 10)
        return tuple(out[name] for name in self.features_list)


def default_inception_weights_path() -> Path:
    """Where torch-fidelity's own download would have cached the weights: ``$TORCH_HOME/hub/checkpoints/``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def resolve_inception_weights(path: str | Path | None) -> Path:
    """The local InceptionV3 weights file: ``path`` (a file, or a folder holding the file) or the hub cache.

    Raises:
        FileNotFoundError: no such file; the message names the file and where it is published.
    """
    candidate = Path(path) if path is not None else default_inception_weights_path()
    if candidate.is_dir():
        candidate = candidate / INCEPTION_WEIGHTS_FILE
    if not candidate.is_file():
        raise FileNotFoundError(
            f"InceptionV3 weights not found at {candidate}. The 'inception-local' feature extractor never downloads: "
            f"fetch {INCEPTION_WEIGHTS_FILE} (torch-fidelity GitHub releases: {INCEPTION_WEIGHTS_URL}) on a machine "
            f"with network access, then pass its path as weights_path= (feature_extractor_weights_path= in "
            f"torch-fidelity) or put it at {default_inception_weights_path()}."
        )
    return candidate


class InceptionLocalFeatureExtractor(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 (same features and defaults as ``"inception-v3-compat"``) from a local file.

    Args:
        name: the registered name (``"inception-local"``).
        features_list: requested features, a subset of ``("64", "192", "768", "2048", "logits_unbiased",
            "logits")``.
        feature_extractor_weights_path: the weights file ``weights-inception-2015-12-05-6726825d.pth`` or a folder
            holding it; None looks in ``$TORCH_HOME/hub/checkpoints/``.
        **kwargs: the rest of ``calculate_metrics``'s arguments (``feature_extractor_internal_dtype`` is used).

    Raises:
        FileNotFoundError: the weights file is missing (nothing is downloaded).
    """

    def __init__(
        self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs
    ) -> None:
        weights = resolve_inception_weights(feature_extractor_weights_path)
        super().__init__(name, features_list, feature_extractor_weights_path=str(weights), **kwargs)

    # The static methods (provided features, default layers, compile support) are torch-fidelity's own.


EXTRACTORS: dict[str, type[FeatureExtractorBase]] = {
    "mnist-cnn": MNISTFeatureExtractor,
    "inception-local": InceptionLocalFeatureExtractor,
    "mnist-dae": StrokeFeatureExtractor,  # the stroke distance (metrics/strokes.py)
}


def register_extractors() -> None:
    """Register this module's extractors with torch-fidelity; safe to call any number of times.

    A name already bound to a class of the same module and name (this module imported twice, or reloaded) is
    rebound to the current class; a name bound to someone else's class raises ``ValueError``.
    """
    for name, cls in EXTRACTORS.items():
        current = FEATURE_EXTRACTORS_REGISTRY.get(name)
        if current is None:
            register_feature_extractor(name, cls)
        elif current is not cls:
            if (current.__module__, current.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(f"torch-fidelity feature extractor {name!r} is already registered as {current!r}")
            # register_feature_extractor refuses a taken name, so rebind the reloaded class directly.
            FEATURE_EXTRACTORS_REGISTRY[name] = cls


register_extractors()
