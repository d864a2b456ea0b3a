"""Metrics: the shipped MNIST classifier, the torch-fidelity extractors (offline) and compute_metrics."""

from __future__ import annotations

import importlib

import pytest
import torch
from safetensors.torch import save_file

from dimo_lightning.evaluation.metrics import MNISTClassifier, class_accuracy, compute_metrics, load_classifier
from dimo_lightning.evaluation.metrics.fidelity import load_real_reference, to_uint8_images


@pytest.fixture(scope="module")
def val_set() -> tuple[torch.Tensor, torch.Tensor]:
    return load_real_reference("val")  # (1000, 1, 28, 28), (1000,)


@pytest.fixture
def no_download(monkeypatch):
    """Make any attempt by torch-fidelity to fetch weights fail the test instead of touching the network."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def refuse(*args, **kwargs):
        raise AssertionError(f"attempted download: {args}")

    monkeypatch.setattr(inception, "load_state_dict_from_url", refuse)


def shift_right(images: torch.Tensor, pixels: int) -> torch.Tensor:
    """Translate (M, 1, H, W) images right by ``pixels``, filling with background."""
    out = torch.zeros_like(images)
    out[..., pixels:] = images[..., :-pixels]
    return out


# ---------------------------------------------------------------- classifier


def test_classifier_shapes_and_frozen():
    model = load_classifier()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.rand(4, 1, 28, 28)
    assert model.features(x).shape == (4, 128)
    assert model(x).shape == (4, 10)
    assert torch.equal(model(x[:, 0]), model(x))  # (B, 28, 28) accepted too
    assert model.feature_scale.item() > 0
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        model(torch.rand(2, 1, 32, 32))


def test_class_accuracy(val_set):
    images, labels = val_set
    assert class_accuracy(images, labels) >= 0.95
    assert class_accuracy(images[:, 0], labels) == class_accuracy(images, labels)
    permuted = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert class_accuracy(images, permuted) < 0.3
    with pytest.raises(ValueError, match="length"):
        class_accuracy(images[:10], labels[:9])


def test_load_classifier_missing_file_names_it_and_make_assets(tmp_path):
    path = tmp_path / "nothing.safetensors"
    with pytest.raises(FileNotFoundError, match="make assets") as err:
        load_classifier(path)
    assert str(path) in str(err.value)


def test_load_classifier_wrong_shape_names_the_file(tmp_path):
    tensors = {k: v.clone() for k, v in MNISTClassifier().state_dict().items()}
    tensors["fc2.weight"] = torch.zeros(5, 128)
    path = tmp_path / "bad_shape.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="fc2.weight") as err:
        load_classifier(path)
    assert str(path) in str(err.value)


def test_load_classifier_wrong_keys_or_garbage_name_the_file(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"codebook": torch.zeros(4, 16)}, str(path))
    with pytest.raises(ValueError, match="missing") as err:
        load_classifier(path)
    assert str(path) in str(err.value)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError) as err:
        load_classifier(garbage)
    assert str(garbage) in str(err.value)


def test_save_load_round_trip(tmp_path):
    from dimo_lightning.evaluation.metrics.classifier import save_classifier

    torch.manual_seed(0)
    model = MNISTClassifier().eval()
    model.feature_scale.fill_(3.0)
    path = save_classifier(model, tmp_path / "clf.safetensors")
    loaded = load_classifier(path)
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))
    assert loaded.feature_scale.item() == 3.0


# ---------------------------------------------------------------- extractors


def test_mnist_extractor_with_torch_fidelity_directly(val_set, no_download):
    import torch_fidelity

    from dimo_lightning.evaluation.metrics import extractors
    from dimo_lightning.evaluation.metrics.fidelity import UInt8ImageDataset

    images = to_uint8_images(val_set[0][:200])
    extractor = extractors.MNISTFeatureExtractor("mnist-cnn", ["penultimate", "logits"])
    feats, logits = extractor(images.expand(-1, 3, -1, -1))
    assert feats.shape == (200, 128) and logits.shape == (200, 10)
    assert torch.equal(extractor(images)[0], feats)  # one grey channel gives the same features
    assert extractor.get_default_feature_layer_for_metric("fid") == "penultimate"

    out = torch_fidelity.calculate_metrics(
        input1=UInt8ImageDataset(images),
        input2=UInt8ImageDataset(images),
        feature_extractor="mnist-cnn",
        fid=True,
        prc=True,
        cuda=False,
        save_cpu_ram=True,
        cache=False,
        verbose=False,
    )
    assert abs(out[torch_fidelity.KEY_METRIC_FID]) < 1e-6
    assert out[torch_fidelity.KEY_METRIC_PRECISION] == out[torch_fidelity.KEY_METRIC_RECALL] == 1.0


def test_registration_is_idempotent(monkeypatch):
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from dimo_lightning.evaluation.metrics import extractors

    extractors.register_extractors()
    reloaded = importlib.reload(extractors)  # a second import under the same name must not raise
    assert FEATURE_EXTRACTORS_REGISTRY["mnist-cnn"] is reloaded.MNISTFeatureExtractor
    assert FEATURE_EXTRACTORS_REGISTRY["inception-local"] is reloaded.InceptionLocalFeatureExtractor

    class Foreign(reloaded.MNISTFeatureExtractor):
        pass

    monkeypatch.setitem(FEATURE_EXTRACTORS_REGISTRY, "mnist-cnn", Foreign)
    with pytest.raises(ValueError, match="already registered"):
        reloaded.register_extractors()


def test_inception_local_missing_weights_is_clear(tmp_path, monkeypatch, no_download):
    from dimo_lightning.evaluation.metrics.extractors import INCEPTION_WEIGHTS_FILE, InceptionLocalFeatureExtractor

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE) as err:
        InceptionLocalFeatureExtractor("inception-local", ["2048"])
    assert "github.com/toshas/torch-fidelity/releases" in str(err.value)
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE):
        compute_metrics(
            torch.rand(4, 28, 28),
            torch.rand(4, 28, 28),
            extractor="inception-local",
            weights_path=str(tmp_path),
            prc_neighborhood=1,
        )


def test_inception_local_loads_a_local_file(tmp_path, monkeypatch, no_download):
    """Random InceptionV3 weights in torch-fidelity's layout, loaded back through the public path."""
    from torch_fidelity import FeatureExtractorInceptionV3

    from dimo_lightning.evaluation.metrics.extractors import INCEPTION_WEIGHTS_FILE

    with monkeypatch.context() as patch:  # build the network without its weights, to get the state-dict layout
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict, **kw: None)
        patch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {})
        torch.manual_seed(0)
        state_dict = FeatureExtractorInceptionV3("inception-v3-compat", ["64"]).state_dict()
    torch.save(state_dict, tmp_path / INCEPTION_WEIGHTS_FILE)

    images = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    # "64" stops after the stem, which keeps the 299x299 forward cheap; a folder holding the file is accepted.
    out = compute_metrics(
        images, images, extractor="inception-local", weights_path=str(tmp_path), feature_layer="64", prc_neighborhood=2
    )
    assert out["precision"] == out["recall"] == 1.0
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())


# ---------------------------------------------------------------- compute_metrics


def test_identical_sets_score_perfectly_and_shifted_sets_badly(val_set):
    images, _ = val_set
    same = compute_metrics(images, images)
    shifted = compute_metrics(shift_right(images, 4), images)
    noisy = compute_metrics(
        (images + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1), images
    )

    assert set(same) >= {"fid", "kid", "precision", "recall"}
    assert shifted["fid"] > 5 and noisy["fid"] > 5  # real-vs-real yardstick: ~0.8 for 1,000 vs 1,000
    assert abs(same["fid"]) < 1e-3 * shifted["fid"]
    assert same["precision"] == same["recall"] == 1.0
    # KID's unbiased estimate is slightly negative for identical sets; it is of order 0.01 at 1,000 samples.
    assert abs(same["kid"]) < 0.05 < shifted["kid"] < 1.0
    for out in (same, shifted, noisy):
        assert 0.0 <= out["precision"] <= 1.0 and 0.0 <= out["recall"] <= 1.0
    assert shifted["precision"] < 0.5 and shifted["recall"] < 0.5
    assert noisy["recall"] < 0.7


def test_layouts_sizes_and_validation(val_set):
    images, _ = val_set
    # The val split comes sorted by class: take a random subset, not the first 300 (only digits 0-2).
    fake = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:300]]
    reference = compute_metrics(fake, images)
    # (M, H, W), (M, 3, H, W) and uint8 are the same images; KID's subset size is clipped to the 300 fakes.
    assert compute_metrics(fake[:, 0], images) == reference
    assert compute_metrics(fake.expand(-1, 3, -1, -1), to_uint8_images(images)) == reference
    assert reference["kid_std"] > 0  # 1,000 reals: subsets differ
    assert 0 <= reference["fid"] < 5  # a real subset against the whole: ~1

    with pytest.raises(ValueError, match="fake_images"):
        compute_metrics(torch.rand(10, 2, 28, 28), images)
    with pytest.raises(ValueError, match="differ in size"):
        compute_metrics(torch.rand(10, 1, 32, 32), images)
    with pytest.raises(ValueError, match="prc_neighborhood"):
        compute_metrics(images[:3], images, prc_neighborhood=3)
