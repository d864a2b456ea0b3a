"""The stroke distance: the MNIST denoising autoencoder's code as the torch-fidelity extractor "mnist-dae"."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dimo_lightning.evaluation.metrics.fidelity import compute_metrics, load_real_reference, to_uint8_images
from dimo_lightning.evaluation.metrics.strokes import CODE_DIM, FEATURE_DIM, load_autoencoder

torch.set_num_threads(1)


def test_registered_extractor_gives_the_standardised_features() -> None:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from dimo_lightning.evaluation.metrics import extractors  # noqa: F401  (registers)

    extractor = FEATURE_EXTRACTORS_REGISTRY["mnist-dae"]("mnist-dae", ["strokes", "bottleneck"])
    assert extractor.get_default_feature_layer_for_metric("fid") == "strokes"
    images, _ = load_real_reference("val")
    uint8 = to_uint8_images(images)  # all 1,000 val digits (the split is ordered by class)
    strokes, bottleneck = extractor(uint8.expand(-1, 3, -1, -1))
    assert strokes.shape == (1000, FEATURE_DIM) and bottleneck.shape == (1000, CODE_DIM)
    assert strokes.dtype == torch.float32
    # Independent: the code from encode(), the pooled maps by running the encoder's layers by hand.
    model = load_autoencoder()
    x = uint8.float() / 255
    e = model.encoder
    h1 = e[1](e[0](x))
    h2 = e[3](e[2](h1))
    h3 = e[5](e[4](h2))
    raw = torch.cat([model.encode(x), h1.mean((2, 3)), h2.mean((2, 3)), h3.mean((2, 3))], 1)
    torch.testing.assert_close(strokes, (raw - model.feature_mean) / model.feature_std)
    torch.testing.assert_close(bottleneck, strokes[:, :CODE_DIM])
    # Standardised on the train split: unseen real digits come out centred with unit spread, per dimension.
    assert strokes.mean(0).abs().mean() < 0.2 and 0.7 < strokes.std(0).mean() < 1.3
    with pytest.raises(ValueError, match="28x28"):
        extractor(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_the_autoencoder_reconstructs_digits() -> None:
    images, _ = load_real_reference("val")
    model = load_autoencoder()
    mse = F.mse_loss(model(images[:200]), images[:200]).item()
    assert mse < 0.015  # an identity-free, 64-number description that redraws unseen digits closely


def test_real_vs_real_scores_better_than_degraded_digits() -> None:
    images, _ = load_real_reference("val")
    generator = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(images), generator=generator)
    first, second = images[perm[:300]], images[perm[300:600]]
    blurred = F.avg_pool2d(F.pad(second, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    noised = (second + 0.15 * torch.randn(second.shape, generator=generator)).clamp(0, 1)
    # Jagged strokes: every 4x4 patch shifted by one pixel in a random direction (broken joins between patches).
    shift = torch.randint(-1, 2, (2, 7, 7), generator=generator)
    patches = second.reshape(-1, 1, 7, 4, 7, 4)
    jagged = torch.zeros_like(patches)
    for i in range(7):
        for j in range(7):
            jagged[:, :, i, :, j, :] = torch.roll(patches[:, :, i, :, j, :], (int(shift[0, i, j]), int(shift[1, i, j])),
                                                  dims=(2, 3))
    jagged = jagged.reshape(second.shape)
    fid = {name: compute_metrics(fake, first, extractor="mnist-dae")["fid"]
           for name, fake in [("real", second), ("blurred", blurred), ("noised", noised), ("jagged", jagged)]}
    # Measured: real 4.98, blurred 62.5, noised 12.6, jagged 43.5 (300 vs 300; the real value is small-sample bias).
    assert fid["real"] < 0.5 * min(fid["blurred"], fid["noised"], fid["jagged"]), fid


def test_bad_weights_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_autoencoder(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"encoder.0.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"other\.safetensors does not hold DenoisingAutoencoder weights"):
        load_autoencoder(tmp_path / "other.safetensors")


@pytest.mark.slow
def test_the_asset_is_reproducible(tmp_path) -> None:
    from safetensors.torch import load_file

    from dimo_lightning.assets import asset_path
    from dimo_lightning.evaluation.metrics.strokes import build_autoencoder_asset

    rebuilt = load_file(str(build_autoencoder_asset(seed=0, path=tmp_path / "dae.safetensors")))
    shipped = load_file(str(asset_path("mnist_dae.safetensors")))
    for name, tensor in shipped.items():
        torch.testing.assert_close(rebuilt[name], tensor, rtol=1e-4, atol=1e-5)


def test_report_stroke_distance_equals_an_independent_frechet_distance() -> None:
    """The report's second distance (``mnist-dae``) on fixed images: the autoencoder's features by hand, the
    Frechet distance in float64 with scipy's matrix square root, against all 1,000 validation digits."""
    from types import SimpleNamespace

    import numpy as np
    from scipy import linalg

    from dimo_lightning.evaluation.callbacks.common import shared_extractor, shared_reference
    from dimo_lightning.evaluation.report import evaluation_row, sharded_sample_features

    real, _ = load_real_reference("val")
    train, _ = load_real_reference("train")
    fixed = F.avg_pool2d(F.pad(train[:300], (1, 1, 1, 1), mode="replicate"), 3, stride=1)  # blurred digits
    # A stand-in module: sample i of the report is fixed image i (codes carry the index; decode looks it up).
    module = SimpleNamespace(trainer=SimpleNamespace(global_rank=0, world_size=1), device=torch.device("cpu"),
                             teacher=SimpleNamespace(decode=lambda codes: fixed[codes[:, 0]]),
                             all_gather=lambda t: t)
    device = torch.device("cpu")
    first = shared_extractor("mnist-cnn", None, device)
    strokes = shared_extractor("mnist-dae", None, device)
    samples = sharded_sample_features(module, lambda batch, g: batch[:, None], torch.arange(len(fixed)), first,
                                      batch_size=64, seed=0, second_extractor=strokes)
    row = evaluation_row("student", 1, samples, shared_reference("mnist-val", first),
                         shared_reference("mnist-val", strokes))

    model = load_autoencoder()

    def features(images: torch.Tensor) -> np.ndarray:
        x = to_uint8_images(images).float() / 255  # the extractors read 8-bit digits
        e = model.encoder
        with torch.no_grad():
            h1 = e[1](e[0](x))
            h2 = e[3](e[2](h1))
            h3 = e[5](e[4](h2))
            raw = torch.cat([model.encode(x), h1.mean((2, 3)), h2.mean((2, 3)), h3.mean((2, 3))], 1)
        return ((raw - model.feature_mean) / model.feature_std).double().numpy()

    a, b = features(fixed), features(real)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    expected = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))
    assert row.fid2 == pytest.approx(expected, rel=1e-3)


def test_summary_names_the_students_ratio_to_the_teachers_best_on_each_distance(tmp_path) -> None:
    import json

    from dimo_lightning.evaluation.report import EvalRow, format_summary, summary_ratios, write_report

    def row(model, steps, fid, recall, accuracy, fid2):
        return EvalRow(model, steps, fid, 0.01, 0.8, recall, accuracy, 100.0, fid2=fid2, precision2=0.5, recall2=0.5)

    rows = [row("teacher", 8, 4.7, 0.68, 0.943, 12.5), row("teacher", 16, 4.3, 0.76, 0.951, 11.7),
            row("teacher", 4, 6.4, 0.62, 0.960, 13.0), row("student", 1, 4.2, 0.43, 0.987, 15.8)]
    summary = summary_ratios(rows)
    # each measure against its own best teacher row
    assert summary["fid"]["teacher_steps"] == 16 and summary["fid"]["ratio"] == pytest.approx(4.2 / 4.3)
    assert summary["fid2"]["teacher"] == 11.7 and summary["fid2"]["ratio"] == pytest.approx(15.8 / 11.7)
    assert summary["recall"]["ratio"] == pytest.approx(0.43 / 0.76)
    assert summary["accuracy"]["teacher_steps"] == 4 and summary["accuracy"]["difference"] == pytest.approx(0.027)
    line = format_summary(summary, "mnist-dae")
    assert "FID (mnist-dae) 15.800 vs 11.700 (16 steps), 1.35x" in line
    assert "accuracy 0.987 vs 0.960 (4 steps), +2.7 pt" in line
    json_path, md_path = write_report(rows, tmp_path, {"second_extractor": "mnist-dae"})
    assert json.loads(json_path.read_text())["summary"]["fid2"]["ratio"] == pytest.approx(15.8 / 11.7)
    assert line in md_path.read_text()
    assert summary_ratios(rows[:3]) == {}  # no student row, no summary
