"""Sample-quality metrics: FID / KID / precision / recall through torch-fidelity, and classifier accuracy.

Importing this package does not import torch-fidelity (about 2 s); :func:`compute_metrics` does, and registers the
``"mnist-cnn"`` and ``"inception-local"`` feature extractors (:mod:`dimo_lightning.evaluation.metrics.extractors`).
"""

from dimo_lightning.evaluation.metrics.classifier import MNISTClassifier, load_classifier
from dimo_lightning.evaluation.metrics.fidelity import class_accuracy, compute_metrics, load_real_reference

__all__ = ["MNISTClassifier", "class_accuracy", "compute_metrics", "load_classifier", "load_real_reference"]
