"""Captioned MNIST: attribute functions on real digits, captions and their parser, prompt faithfulness."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from dimo_lightning.data.captions import (
    SLANT,
    TEMPLATES,
    THICKNESS,
    attribute_hits,
    eval_prompts,
    fit_thresholds,
    load_thresholds,
    parse_prompt,
    render_caption,
    slant,
    slant_class,
    split_captions,
    thickness_class,
    train_prompts,
)
from dimo_lightning.data.mnist import load_mnist_split
from dimo_lightning.evaluation.metrics.classifier import prompt_faithfulness


@pytest.fixture(scope="module")
def train_digits():
    return load_mnist_split("train")


@pytest.fixture(scope="module")
def val_digits():
    return load_mnist_split("val")


def test_terciles_are_balanced_per_class_and_the_stored_cuts_are_the_fitted_ones(train_digits):
    images, labels = train_digits
    stored = load_thresholds()
    fresh = fit_thresholds(images, labels)
    torch.testing.assert_close(stored.ink, fresh.ink, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stored.slant, fresh.slant, atol=1e-4, rtol=1e-5)
    for values in (thickness_class(images, labels), slant_class(images, labels)):
        for c in range(10):
            share = torch.bincount(values[labels == c], minlength=3).float() / int((labels == c).sum())
            assert share.sub(1 / 3).abs().max() < 0.01, (c, share)


def test_slant_of_hand_made_strokes():
    image = torch.zeros(1, 28, 28)
    for row in range(4, 24):
        image[0, row, 10 + (24 - row) // 2] = 1.0  # top to the right: leans right
    assert float(slant(image)) == pytest.approx(0.5, abs=0.03)
    assert float(slant(image.flip(2))) == pytest.approx(-0.5, abs=0.03)
    upright = torch.zeros(1, 28, 28)
    upright[0, 4:24, 14] = 1.0
    assert float(slant(upright)) == pytest.approx(0.0, abs=1e-6)
    assert float(slant(torch.zeros(1, 28, 28))) == 0.0  # blank image


def shear(images: torch.Tensor, k: float) -> torch.Tensor:
    """Shift row y by round(k * (14 - y)) pixels: k > 0 moves the top right (leans right)."""
    out = torch.zeros_like(images)
    for y in range(28):
        s = round(k * (14 - y))
        if s >= 0:
            out[:, y, s:] = images[:, y, : 28 - s]
        else:
            out[:, y, :s] = images[:, y, -s:]
    return out


def test_thickened_digits_score_bolder_and_sheared_digits_lean_the_right_way(val_digits):
    images, labels = val_digits[0][:400], val_digits[1][:400]
    base_thick = thickness_class(images, labels)
    dilated = F.max_pool2d(images[:, None], 3, stride=1, padding=1)[:, 0]
    thick = thickness_class(dilated, labels)
    assert bool((thick >= base_thick).all())
    assert float((thick == 2).float().mean()) > 0.9 > float((base_thick == 2).float().mean())

    base = slant(images)
    right, left = shear(images, 0.5), shear(images, -0.5)
    assert float((slant(right) > base).float().mean()) > 0.97
    assert float((slant(left) < base).float().mean()) > 0.97
    assert float((slant_class(right, labels) == 2).float().mean()) > 0.8
    assert float((slant_class(left, labels) == 0).float().mean()) > 0.8


def test_every_template_and_synonym_parses_back():
    rng = random.Random(0)
    used = set()
    for _ in range(3000):
        digit, thick, lean = rng.randrange(10), rng.choice(THICKNESS), rng.choice(SLANT)
        caption = render_caption(digit, thick, lean, rng)
        parsed = parse_prompt(caption)
        assert (parsed.digit, parsed.thickness, parsed.slant) == (digit, thick, lean), caption
        used.add(caption.split()[0])
    assert len(TEMPLATES) >= 5
    # varied: many distinct phrasings of one attribute triple
    assert len({render_caption(7, "bold", "right", random.Random(s)) for s in range(200)}) > 30
    assert "a bold seven leaning right" in {render_caption(7, "bold", "right", random.Random(s)) for s in range(2000)}
    assert parse_prompt("thin upright 3").__dict__ == {"digit": 3, "thickness": "thin", "slant": "upright"}
    assert parse_prompt("an 8").__dict__ == {"digit": 8, "thickness": None, "slant": None}
    with pytest.raises(ValueError, match="several values of thickness"):
        parse_prompt("a thin bold 3")
    with pytest.raises(ValueError, match="bad attributes"):
        render_caption(10, "bold", "right", rng)


def test_prompt_generators_are_seeded_sized_and_balanced():
    train = train_prompts()
    assert len(train) == 16_000 and train == train_prompts()
    held_out = eval_prompts()
    assert len(held_out) == 1000
    first = [parse_prompt(p).digit for p in held_out[:100]]
    assert sorted(first) == sorted(list(range(10)) * 10)  # every prefix of 10k prompts is class-balanced
    assert split_captions("val", seed=0) != split_captions("val", seed=1)


def test_prompt_faithfulness_on_real_digits(val_digits):
    images, labels = val_digits
    own = split_captions("val")
    scores = prompt_faithfulness(images, own)
    assert scores["class_accuracy"] > 0.95
    assert scores["thickness_accuracy"] == 1.0 and scores["slant_accuracy"] == 1.0
    # the same images against the captions of other digits: near chance on every attribute
    shuffled = [own[i] for i in torch.randperm(len(own), generator=torch.Generator().manual_seed(0)).tolist()]
    wrong = prompt_faithfulness(images, shuffled)
    assert wrong["class_accuracy"] < 0.2
    assert 0.2 < wrong["thickness_accuracy"] < 0.5 and 0.2 < wrong["slant_accuracy"] < 0.5
    # counts add; prompts without an attribute are not judged on it
    hits = attribute_hits(images[:3], ["a 0", "thin 1", "bold upright 2"], torch.tensor([0, 7, 2]))
    assert hits["class"] == (2, 3) and hits["thickness"][1] == 2 and hits["slant"][1] == 1
    with pytest.raises(ValueError, match="expected images"):
        prompt_faithfulness(torch.zeros(2, 7, 7), ["a 1", "a 2"])


def test_prompt_datamodule_defaults_to_the_captioned_mnist_generators():
    from dimo_lightning.data.prompts import PromptDataModule

    dm = PromptDataModule(batch_size=4, batches_per_epoch=1)
    assert len(dm.prompts("train")) == 16_000
    assert dm.evaluation_conditions(20) == eval_prompts()[:20]
    batch = next(iter(dm.train_dataloader())).conditions
    assert len(batch) == 4 and all(parse_prompt(p).digit is not None for p in batch)
