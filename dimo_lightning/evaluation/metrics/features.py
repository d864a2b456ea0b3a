"""Sample-quality metrics from features: FID, KID, precision/recall and Inception Score, computed at scale.

The evaluation callbacks never move images between ranks: each rank extracts features of its own samples (through a
registered torch-fidelity extractor, :class:`FeatureExtractor`) and only the features are gathered. This module holds
the math (features in, numbers out), written to give torch-fidelity's numbers on the same features:

- :func:`frechet_distance` is torch-fidelity's ``fid_statistics_to_metric`` (eigenvalues of sigma1 @ sigma2);
- :func:`kernel_inception_distance` draws the same subsets (``RandomState(seed).choice``) and uses the same cubic
  polynomial kernel and unbiased MMD^2 estimate;
- :func:`precision_recall` is Kynkaanniemi et al.'s k-NN manifold test, with the pairwise distances computed in row
  chunks so that 50k x 50k distances never exist at once (memory: ``chunk_size`` x set size floats);
- :func:`inception_score` is torch-fidelity's split estimate over shuffled logits.

Reference statistics (:class:`ReferenceStats`) hold what the metrics need of the real set: the mean and covariance
of all its features (FID) and the features themselves, or a seeded subset (KID, precision/recall). They are
precomputed once (``dimo stats``, :func:`compute_reference_stats`) and saved as ``.npz``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

STATS_FORMAT = "dimo-reference-stats-v1"


# ---------------------------------------------------------------- the math (pure functions)


class MomentAccumulator:
    """Running sum and sum of outer products of feature rows (float64) -> mean and unbiased covariance.

    Memory is D + D^2 doubles (32 MB for Inception's 2,048 features) whatever the number of rows.
    """

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def update(self, features: torch.Tensor) -> None:
        """Add rows (B, D), on their device (a GPU does the D x D products of 50k rows in well under a second)."""
        x = features.detach().to(torch.float64)
        if self.total is None:
            self.total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        self.count += len(x)
        self.total += x.sum(0)
        self.outer += x.T @ x

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and covariance (D, D), both float64 (``np.cov``'s unbiased estimate)."""
        if self.count < 2:
            raise ValueError(f"feature statistics need at least 2 rows, got {self.count}")
        mean = self.total / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean.cpu().numpy(), cov.cpu().numpy()


def feature_moments(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, D) -> mean (D,) and covariance (D, D), float64."""
    accumulator = MomentAccumulator()
    accumulator.update(features)
    return accumulator.moments()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), the trace of the root from the eigenvalues of S1 S2
    (as torch-fidelity), all in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}")
    diff = mu1 - mu2
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)).real)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD^2 of two equal-size sets (m, D) under the kernel (x.y / D + coef0)^degree."""
    m, dim = x.shape
    k_xx = (x @ x.T / dim + coef0) ** degree
    k_yy = (y @ y.T / dim + coef0) ** degree
    k_xy = (x @ y.T / dim + coef0) ** degree
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    fake: torch.Tensor, real: torch.Tensor, subset_size: int = 1000, subsets: int = 100, seed: int = 2020
) -> tuple[float, float]:
    """KID: mean and std of the unbiased polynomial-kernel MMD^2 over random subsets.

    ``subset_size`` is clipped to the smaller set; when both sets have exactly that size every subset is both whole
    sets (MMD ignores order), so one subset is drawn.

    Args:
        fake: generated features (N, D).
        real: reference features (M, D).
        subset_size: rows per subset.
        subsets: number of subsets.
        seed: seed of the subset draws (``numpy.random.RandomState``, as torch-fidelity).
    """
    n, m = len(fake), len(real)
    size = min(subset_size, n, m)
    if size < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {n} and {m}")
    if size == n == m:
        subsets = 1
    x, y = fake.detach().cpu().float().numpy(), real.detach().cpu().float().numpy()
    rng = np.random.RandomState(seed)
    values = np.zeros(subsets)
    for i in range(subsets):
        values[i] = _polynomial_mmd2(x[rng.choice(n, size, replace=False)], y[rng.choice(m, size, replace=False)])
    return float(values.mean()), float(values.std())


def knn_radii(features: torch.Tensor, k: int, chunk_size: int = 2048) -> torch.Tensor:
    """Distance (N,) of each row to its k-th nearest neighbour in ``features`` (itself excluded), in row chunks."""
    radii = [torch.cdist(chunk, features).kthvalue(k + 1, dim=1).values for chunk in features.split(chunk_size)]
    return torch.cat(radii)


def inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk_size: int = 2048
                    ) -> torch.Tensor:
    """Bool (P,): is each point within ``radii[j]`` of some ``centres[j]``; (chunk_size, C) distances at a time."""
    return torch.cat([(torch.cdist(chunk, centres) <= radii).any(dim=1) for chunk in points.split(chunk_size)])


def precision_recall(
    fake: torch.Tensor, real: torch.Tensor, k: int = 3, chunk_size: int = 2048
) -> tuple[float, float]:
    """Improved precision (share of fakes inside the real k-NN manifold) and recall (share of reals inside the
    fake manifold), Kynkaanniemi et al. 2019. Runs on the features' device; peak memory ``chunk_size`` x max(N, M).

    Args:
        fake: generated features (N, D).
        real: reference features (M, D).
        k: neighbourhood size of the k-NN balls.
        chunk_size: rows per distance block.
    """
    if k < 1 or k >= min(len(fake), len(real)):
        raise ValueError(f"prc_neighborhood must lie in [1, min set size - 1], got {k} for sets of "
                         f"{len(fake)} and {len(real)}")
    fake, real = fake.float(), real.float().to(fake.device)
    precision = inside_any_ball(fake, real, knn_radii(real, k, chunk_size), chunk_size).float().mean().item()
    recall = inside_any_ball(real, fake, knn_radii(fake, k, chunk_size), chunk_size).float().mean().item()
    return precision, recall


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """Inception Score: exp(E KL(p(y|x) || p(y))) per split of the (seeded, shuffled) samples -> (mean, std)."""
    n = len(logits)
    if n < splits:
        raise ValueError(f"inception_score needs at least {splits} samples, got {n}")
    logits = logits.detach().cpu()[np.random.RandomState(seed).permutation(n)].double()
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        part, log_part = p[i * n // splits : (i + 1) * n // splits], log_p[i * n // splits : (i + 1) * n // splits]
        marginal = part.mean(dim=0, keepdim=True)
        scores.append((part * (log_part - marginal.log())).sum(dim=1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------- reference statistics


@dataclass
class ReferenceStats:
    """What the metrics need of the real set.

    Attributes:
        mu: feature mean (D,) float64 over all ``count`` images.
        sigma: feature covariance (D, D) float64 over all ``count`` images.
        features: (M, D) float32 features for KID / precision / recall: all images or a seeded subset.
        extractor: the torch-fidelity extractor name that produced them.
        feature_layer: its feature layer (``"2048"`` for Inception).
        image_size: (H, W) of the reference images.
        count: number of reference images behind ``mu`` / ``sigma``.
        source: where the images came from (a spec or a path).
    """

    mu: np.ndarray
    sigma: np.ndarray
    features: torch.Tensor
    extractor: str
    feature_layer: str
    image_size: tuple[int, int]
    count: int
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return int(self.mu.shape[0])

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` (arrays plus a JSON ``meta`` string); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": STATS_FORMAT, "extractor": self.extractor, "feature_layer": self.feature_layer,
                "feature_dim": self.feature_dim, "image_size": list(self.image_size), "count": self.count,
                "num_features": len(self.features), "source": self.source, **self.meta}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma, features=self.features.cpu().float().numpy(),
                 meta=np.array(json.dumps(meta)))
        tmp.replace(path)
        return path


def is_stats_file(path: str | Path) -> bool:
    """Whether ``path`` is an ``.npz`` holding reference statistics (``mu``, ``sigma``)."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return False
    with np.load(path) as data:
        return "mu" in data.files and "sigma" in data.files


def load_reference_stats(path: str | Path, flag: str = "reference") -> ReferenceStats:
    """Read a file written by :meth:`ReferenceStats.save` (or ``mu``/``sigma``(/``features``) from elsewhere).

    Raises:
        FileNotFoundError / ValueError: naming the file and ``flag``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: reference statistics file not found: {path} (make one with "
                                f"`dimo stats --reference SPEC --extractor NAME --output {path.name}`)")
    with np.load(path) as data:
        missing = [key for key in ("mu", "sigma", "meta") if key not in data.files]
        if missing:
            raise ValueError(f"{flag}: {path} is not a `dimo stats` file: it lacks {missing} (found {data.files})")
        meta = json.loads(str(data["meta"]))
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        features = torch.from_numpy(data["features"]) if "features" in data.files else torch.zeros(0, len(mu))
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or features.ndim != 2 or features.shape[1] != len(mu):
        raise ValueError(f"{flag}: {path} has inconsistent shapes: mu {mu.shape}, sigma {sigma.shape}, features "
                         f"{tuple(features.shape)}")
    known = ("format", "extractor", "feature_layer", "feature_dim", "image_size", "count", "num_features", "source")
    return ReferenceStats(mu, sigma, features, meta.get("extractor", "?"), str(meta.get("feature_layer", "?")),
                          tuple(meta.get("image_size", (0, 0))), int(meta.get("count", 0)), str(path),
                          {k: v for k, v in meta.items() if k not in known})


def check_reference_stats(stats: ReferenceStats, extractor: FeatureExtractor, flag: str = "reference",
                          need_features: int = 0) -> None:
    """Raise ``ValueError`` (naming the file and ``flag``) when ``stats`` do not fit ``extractor``.

    Args:
        stats: the loaded statistics.
        extractor: the extractor the samples will go through.
        flag: the configuration key to name in errors.
        need_features: the least number of stored reference features (KID / precision-recall neighbourhoods).
    """
    where = f"{flag}={stats.source}"
    if stats.extractor != extractor.name:
        raise ValueError(f"{where} was computed with extractor {stats.extractor!r}, but the evaluation uses "
                         f"{extractor.name!r}: recompute it with `dimo stats --extractor {extractor.name}` or set "
                         f"extractor: {stats.extractor}")
    if stats.feature_dim != extractor.feature_dim:
        raise ValueError(f"{where} holds {stats.feature_dim}-d features, but extractor {extractor.name!r} gives "
                         f"{extractor.feature_dim}-d features ({extractor.feature_layer!r})")
    if stats.feature_layer != extractor.feature_layer:
        raise ValueError(f"{where} holds features of layer {stats.feature_layer!r}, the evaluation uses "
                         f"{extractor.feature_layer!r}")
    if len(stats.features) < need_features:
        raise ValueError(f"{where} stores {len(stats.features)} features, at least {need_features} are needed "
                         f"for KID / precision-recall: recompute it with a larger --max_features")


# ---------------------------------------------------------------- feature extraction


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (B, C, H, W) float, or uint8, on any device -> uint8 (B, 3, H, W) on the same device.

    Rounds as torchvision's ``save_image`` (0.5 -> 128), as
    :func:`dimo_lightning.evaluation.metrics.fidelity.to_uint8_images`.
    """
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (B, H, W) or (B, 1|3, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class FeatureExtractor:
    """A registered torch-fidelity feature extractor, built once, on one device: images -> (features, logits).

    The features are the extractor's default layer for FID (also used for KID and precision/recall, as
    torch-fidelity does); the logits are its default layer for the Inception Score when it has one, else None.

    Args:
        name: registered name (``mnist-cnn``, ``inception-local`` or any other torch-fidelity extractor).
        weights_path: its weights file (``feature_extractor_weights_path``).
        device: where it runs.
        flag: the configuration key to name in errors.
    """

    def __init__(self, name: str, weights_path: str | None = None, device: str | torch.device = "cpu",
                 flag: str = "extractor") -> None:
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
        from torch_fidelity.utils import create_feature_extractor

        from dimo_lightning.evaluation.metrics import extractors  # noqa: F401  (registers mnist-cnn / inception-local)

        if name not in FEATURE_EXTRACTORS_REGISTRY:
            raise ValueError(f"{flag}: unknown feature extractor {name!r}; registered: "
                             f"{sorted(FEATURE_EXTRACTORS_REGISTRY)}")
        cls = FEATURE_EXTRACTORS_REGISTRY[name]
        self.name = name
        self.feature_layer = cls.get_default_feature_layer_for_metric("fid")
        try:
            self.logits_layer: str | None = cls.get_default_feature_layer_for_metric("isc")
        except (KeyError, NotImplementedError, ValueError):  # no logits layer (mnist-dae raises ValueError)
            self.logits_layer = None
        layers = [self.feature_layer] + ([self.logits_layer] if self.logits_layer else [])
        self.network = create_feature_extractor(name, layers, cuda=False, feature_extractor_weights_path=weights_path,
                                                verbose=False, feature_extractor_compile=False)
        self.device = torch.device(device)
        self.network.to(self.device)
        self._dims: tuple[int, int] | None = None

    def _probe(self) -> tuple[int, int]:
        """(feature width, logits width or 0) from a forward on one dummy image, the first time."""
        if self._dims is None:
            dummy = self.network.get_dummy_input_for_compile().to(self.device)
            features, logits = self(dummy)
            self._dims = int(features.shape[1]), int(logits.shape[1]) if logits is not None else 0
        return self._dims

    @property
    def feature_dim(self) -> int:
        """Width D of the features."""
        return self._probe()[0]

    @property
    def logits_dim(self) -> int:
        """Width of the logits (0 without)."""
        return self._probe()[1]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images (B, C, H, W) in [0, 1] or uint8 -> features (B, D) float32 and logits (B, L) or None, on device."""
        batch = to_uint8(images.to(self.device))
        with torch.autocast(self.device.type, enabled=False):  # extractor numerics independent of the trainer's
            outputs = self.network(batch)
        features = outputs[0].float()
        logits = outputs[1].float() if self.logits_layer else None
        return features, logits


def compute_reference_stats(
    batches: Iterable[torch.Tensor],
    count: int,
    extractor: FeatureExtractor,
    max_features: int | None = None,
    seed: int = 0,
    source: str = "",
) -> ReferenceStats:
    """Stream image batches through ``extractor`` -> :class:`ReferenceStats` (nothing but features kept).

    Args:
        batches: uint8 or [0, 1] float image batches (B, C, H, W), ``count`` images in all.
        count: number of images the batches hold.
        extractor: the feature extractor.
        max_features: keep the features of at most this many images, a seeded uniform subset (None: all).
        seed: seed of that subset.
        source: recorded in the statistics.
    """
    keep = None
    if max_features is not None and max_features < count:
        chosen = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:max_features]
        keep = torch.zeros(count, dtype=torch.bool)
        keep[chosen] = True
    accumulator, kept, seen, size = MomentAccumulator(), [], 0, None
    for images in batches:
        size = tuple(images.shape[-2:])
        features, _ = extractor(images)
        accumulator.update(features)
        rows = features.cpu() if keep is None else features.cpu()[keep[seen : seen + len(features)]]
        kept.append(rows)
        seen += len(features)
    if seen != count:
        raise ValueError(f"reference {source}: expected {count} images, read {seen}")
    mu, sigma = accumulator.moments()
    return ReferenceStats(mu, sigma, torch.cat(kept), extractor.name, extractor.feature_layer, size, count, source)


def metrics_from_features(
    fake_features: torch.Tensor,
    reference: ReferenceStats,
    fake_logits: torch.Tensor | None = None,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    prc_neighborhood: int = 3,
    seed: int = 2020,
    chunk_size: int = 2048,
) -> dict[str, float | None]:
    """All metrics of generated features (N, D) against reference statistics.

    Returns:
        ``fid``, ``kid``, ``kid_std``, ``precision``, ``recall``, ``f_score`` and ``is`` / ``is_std`` (None without
        logits or with fewer than 10 samples).
    """
    if len(fake_features) < 2:
        raise ValueError(f"metrics need at least 2 generated samples, got {len(fake_features)}")
    if fake_features.shape[1] != reference.feature_dim:
        raise ValueError(f"generated features are {fake_features.shape[1]}-d, the reference's "
                         f"{reference.feature_dim}-d ({reference.source})")
    mu, sigma = feature_moments(fake_features)
    kid, kid_std = kernel_inception_distance(fake_features, reference.features, kid_subset_size, kid_subsets, seed)
    precision, recall = precision_recall(fake_features, reference.features, prc_neighborhood, chunk_size)
    with_is = fake_logits is not None and len(fake_logits) >= 10  # IS averages over 10 splits
    isc, isc_std = inception_score(fake_logits, seed=seed) if with_is else (None, None)
    return {
        "fid": frechet_distance(mu, sigma, reference.mu, reference.sigma),
        "kid": kid,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "f_score": 2 * precision * recall / max(1e-5, precision + recall),
        "is": isc,
        "is_std": isc_std,
    }
