"""MNISTTeacher loading, its errors, and the shipped teacher's quality."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import save_tiny_mnist_teacher
from safetensors.torch import save_file

from dimo_lightning.teachers.mnist import MNISTTeacher


def test_tiny_teacher_contract(tmp_path):
    weights, codebook = save_tiny_mnist_teacher(tmp_path)
    teacher = MNISTTeacher(str(weights), str(codebook))
    assert (teacher.codebook_size, teacher.mask_id, teacher.logit_width, teacher.grid_shape) == (16, 16, 17, (7, 7))
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    codes = torch.randint(0, 17, (4, 49))
    labels = torch.tensor([0, 1, 2, 3])
    logits = teacher(codes, labels)
    assert logits.shape == (4, 49, 17)
    # guided logits with w: l_u + w (l_c - l_u); w = 1 is the conditional pass
    cond = teacher(codes, labels)
    uncond = teacher(codes, labels, torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(teacher.guided_logits(teacher.network, codes, labels, 2.5),
                               uncond + 2.5 * (cond - uncond), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher.guided_logits(teacher.network, codes, labels, 1.0), cond)
    samples = teacher.sample(labels, steps=4, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, 49) and int(samples.max()) < 16
    assert teacher.decode(samples).shape == (4, 1, 28, 28)


def test_missing_and_wrong_teacher_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        MNISTTeacher(str(tmp_path / "nothere.safetensors"))
    weights, codebook = save_tiny_mnist_teacher(tmp_path / "a")
    # weights of another width: every mismatching key is reported with both shapes
    other, _ = save_tiny_mnist_teacher(tmp_path / "b", hidden_dim=48)
    (tmp_path / "b" / "teacher.json").write_text((tmp_path / "a" / "teacher.json").read_text())
    expected = r"teacher.safetensors does not match MaskTransformer: 27 shape mismatches: first_layer.0.bias"
    with pytest.raises(ValueError, match=expected):
        MNISTTeacher(str(other), str(codebook))
    # a missing key is listed
    from safetensors.torch import load_file

    state = load_file(str(weights))
    del state["bias"]
    save_file(state, str(tmp_path / "a" / "partial.safetensors"))
    (tmp_path / "a" / "partial.json").write_text((tmp_path / "a" / "teacher.json").read_text())
    with pytest.raises(ValueError, match="missing keys: bias"):
        MNISTTeacher(str(tmp_path / "a" / "partial.safetensors"), str(codebook))
    # a corrupt file names the file
    (tmp_path / "a" / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "a" / "corrupt.json").write_text(json.dumps(json.loads((tmp_path / "a" / "teacher.json").read_text())))
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        MNISTTeacher(str(tmp_path / "a" / "corrupt.safetensors"), str(codebook))


def test_codebook_size_mismatch(tmp_path):
    weights, _ = save_tiny_mnist_teacher(tmp_path)
    with pytest.raises(ValueError, match="256 codes but the teacher"):
        MNISTTeacher(str(weights))  # the shipped 256-code codebook vs a 16-code teacher


def test_codes_outside_vocabulary(tmp_path):
    weights, codebook = save_tiny_mnist_teacher(tmp_path)
    teacher = MNISTTeacher(str(weights), str(codebook))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        teacher.decode(torch.full((1, 49), 16))  # the mask id is not a code
    with pytest.raises(ValueError, match="class labels"):
        teacher.check_condition(torch.tensor([10]))
    teacher.check_condition(torch.tensor([0, 9]))  # in range: no error


def test_shipped_teacher_quality_at_16_steps():
    """The foundation issue's bar: 16-step samples are recognisable (classifier >= 90%) and the Frechet distance
    in a 32-component PCA of pixels is at most a third of the 1-step figure."""
    from dimo_lightning.data.mnist import load_mnist_split
    from dimo_lightning.evaluation.metrics.classifier import load_classifier, predict
    from dimo_lightning.evaluation.metrics.pca import pca_frechet_distance

    teacher = MNISTTeacher()
    real, _ = load_mnist_split("all")
    labels = torch.arange(1000) % 10
    classifier = load_classifier()
    results = {}
    for steps in (1, 16):
        generator = torch.Generator().manual_seed(0)
        codes = torch.cat([  # batches of 250: a third faster on CPU than one batch of 1,000
            teacher.sample(chunk, steps=steps, cfg_scale=2.0, choice_temperature=16.0, generator=generator)
            for chunk in labels.split(250)
        ])
        images = teacher.decode(codes)
        accuracy = float((predict(classifier, images) == labels).float().mean())
        results[steps] = (accuracy, pca_frechet_distance(images[:, 0], real))
    assert results[16][0] >= 0.90, results
    assert results[16][1] <= results[1][1] / 3, results
