"""Metrics from features (FID, KID, precision/recall, IS) against torch-fidelity, reference statistics, sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dimo_lightning.evaluation.metrics.features import (
    FeatureExtractor,
    check_reference_stats,
    compute_reference_stats,
    frechet_distance,
    inception_score,
    load_reference_stats,
    metrics_from_features,
    precision_recall,
)
from dimo_lightning.evaluation.metrics.fidelity import compute_metrics, load_real_reference
from dimo_lightning.evaluation.metrics.image_sources import open_image_source


@pytest.fixture(scope="module")
def mnist():
    images, _ = load_real_reference("val")  # (1000, 1, 28, 28)
    extractor = FeatureExtractor("mnist-cnn")
    source = open_image_source("mnist-val")
    reference = compute_reference_stats(source.batches(300), source.count, extractor, source="mnist-val")
    return images, extractor, reference


def noisy_subset(images: torch.Tensor, count: int, noise: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    picked = images[torch.randperm(len(images), generator=generator)[:count]]
    return (picked + noise * torch.randn(picked.shape, generator=generator)).clamp(0, 1)


@pytest.mark.parametrize("count, noise", [(600, 0.1), (1000, 0.3)])
def test_feature_metrics_equal_torch_fidelity_on_mnist(mnist, count, noise):
    """The feature path gives compute_metrics' numbers (torch-fidelity on the images) on the same images."""
    images, extractor, reference = mnist
    fake = noisy_subset(images, count, noise)
    old = compute_metrics(fake, images)  # 600: KID over 100 subsets of 600; 1000: one subset (equal sizes)
    features, logits = extractor(fake)
    new = metrics_from_features(features, reference, logits)
    assert new["fid"] == pytest.approx(old["fid"], rel=1e-5, abs=1e-6)
    assert new["kid"] == pytest.approx(old["kid"], rel=1e-4, abs=1e-7)
    assert new["kid_std"] == pytest.approx(old["kid_std"], rel=1e-3, abs=1e-7)
    assert new["precision"] == pytest.approx(old["precision"], abs=1.5e-3)  # one sample of 1000 on a tie at most
    assert new["recall"] == pytest.approx(old["recall"], abs=1.5e-3)
    assert new["fid"] > 1  # the noise shows: the comparison is not between zeros


def test_inception_score_equals_torch_fidelity(mnist):
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    images, extractor, _ = mnist
    _, logits = extractor(images)
    mean, std = inception_score(logits)
    expected = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    assert mean == pytest.approx(expected[KEY_METRIC_ISC_MEAN], rel=1e-9)
    assert std == pytest.approx(expected[KEY_METRIC_ISC_STD], rel=1e-6)
    assert 5 < mean <= 10  # 10 balanced, confidently classified digits: close to the 10-class maximum


def test_precision_recall_in_chunks_equals_full_distances():
    generator = torch.Generator().manual_seed(0)
    fake, real = torch.randn(300, 8, generator=generator), torch.randn(250, 8, generator=generator) + 0.5

    def full(a, b, k):  # the whole distance matrices at once
        radii_b = torch.cdist(b, b).kthvalue(k + 1, dim=1).values
        radii_a = torch.cdist(a, a).kthvalue(k + 1, dim=1).values
        return ((torch.cdist(a, b) <= radii_b).any(1).float().mean().item(),
                (torch.cdist(b, a) <= radii_a).any(1).float().mean().item())

    assert precision_recall(fake, real, 3, chunk_size=7) == pytest.approx(full(fake, real, 3))
    assert 0.2 < precision_recall(fake, real, 3)[0] < 0.95
    with pytest.raises(ValueError, match="prc_neighborhood"):
        precision_recall(fake[:3], real, 3)


def test_frechet_distance_of_gaussians():
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    sigma1, sigma2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 9.0])
    # diagonal covariances: ||dmu||^2 + sum (sqrt(a) - sqrt(b))^2
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(5 + 1 + 1 + 0)


def test_reference_stats_round_trip_and_validation(mnist, tmp_path):
    _, extractor, reference = mnist
    path = reference.save(tmp_path / "ref.npz")
    loaded = load_reference_stats(path)
    np.testing.assert_allclose(loaded.mu, reference.mu)
    np.testing.assert_allclose(loaded.sigma, reference.sigma)
    assert torch.equal(loaded.features, reference.features)
    assert (loaded.extractor, loaded.feature_dim, loaded.image_size, loaded.count) == ("mnist-cnn", 128, (28, 28), 1000)
    check_reference_stats(loaded, extractor)
    # a seeded subset of the features, same moments
    source = open_image_source("mnist-val")
    subset = compute_reference_stats(source.batches(128), source.count, extractor, max_features=100, seed=3)
    assert subset.features.shape == (100, 128)
    np.testing.assert_allclose(subset.mu, reference.mu, rtol=1e-6, atol=1e-9)
    assert any(torch.equal(subset.features[0], row) for row in reference.features)

    loaded.extractor = "inception-local"
    with pytest.raises(ValueError, match="inception-local") as err:
        check_reference_stats(loaded, extractor, flag="FIDMonitor.reference")
    assert "FIDMonitor.reference" in str(err.value) and str(path) in str(err.value)
    loaded.extractor, loaded.mu, loaded.sigma = "mnist-cnn", loaded.mu[:64], loaded.sigma[:64, :64]
    with pytest.raises(ValueError, match="64-d"):
        check_reference_stats(loaded, extractor)
    with pytest.raises(FileNotFoundError, match="dimo stats"):
        load_reference_stats(tmp_path / "missing.npz")


def test_npz_and_folder_sources_stream_the_same_images(tmp_path):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 12, 10, 3), dtype=torch.uint8, generator=generator)  # NHWC, like ADM
    np.savez_compressed(tmp_path / "adm.npz", arr_0=images.numpy(), arr_1=np.arange(7))
    np.savez(tmp_path / "float.npz", images=images.permute(0, 3, 1, 2).float().numpy() / 255)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.numpy()).save(folder / f"{i:03d}.png")
    expected = images.permute(0, 3, 1, 2)
    for spec in (tmp_path / "adm.npz", tmp_path / "float.npz", folder):
        source = open_image_source(str(spec))
        assert (source.count, source.image_size) == (7, (12, 10))
        batches = list(source.batches(3))
        assert [len(b) for b in batches] == [3, 3, 1]
        assert torch.equal(torch.cat(batches), expected), spec
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        open_image_source(str(tmp_path / "nope.npz"), "FIDMonitor.reference")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="arr_0"):
        open_image_source(str(tmp_path / "other.npz"))


def test_dimo_stats_command(capsys, tmp_path):
    from dimo_lightning.commands.cli import main

    output = tmp_path / "ref.npz"
    main(["stats", "--reference", "mnist-val", "--extractor", "mnist-cnn", "--output", str(output),
          "--max_features", "200"])
    stats = load_reference_stats(output)
    assert (stats.count, len(stats.features), stats.extractor) == (1000, 200, "mnist-cnn")
    with pytest.raises(SystemExit) as exit_info:  # a user error: one `dimo: error:` line, status 2
        main(["stats", "--reference", "mnist-val", "--extractor", "mnist-cnn", "--output", str(tmp_path / "x.txt")])
    assert exit_info.value.code == 2
    assert "dimo: error: --output must end in .npz" in capsys.readouterr().err
