"""Captioned MNIST: a real, measurable text-to-image problem on the 5,000 shipped digits.

Every digit gets three attributes measured from its pixels:

* **class**: its label (for generated images: the shipped MNIST classifier's prediction);
* **thickness** (``thin`` / ``regular`` / ``bold``): its ink mass (sum of the pixel values), cut at the terciles of
  the ink mass of its class;
* **slant** (``left`` / ``upright`` / ``right``): the shear of its second moments, ``-mu11 / mu02`` (x to the
  right, y downwards, so a digit whose top leans right has a positive slant), cut at the terciles of its class.

Both cuts are per class (a one is thinner than an eight, a seven leans more than a zero), fitted on the train split
and stored in ``assets/mnist_caption_thresholds.json`` (``make assets`` rebuilds it). Attributes are rendered into
varied, seeded phrasings ("a bold seven leaning right", "thin upright 3", ...), and :func:`parse_prompt` reads them
back. The same functions score generated images against their prompts (:func:`prompt_faithfulness`): thickness and
slant of an image are judged with the thresholds of the class its prompt asks for.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from dimo_lightning.assets import asset_path
from dimo_lightning.data.mnist import IMAGE_SIZE, NUM_CLASSES, load_mnist_split

THRESHOLDS_ASSET = "mnist_caption_thresholds.json"
THICKNESS = ("thin", "regular", "bold")
SLANT = ("left", "upright", "right")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_CAPTIONS_PER_DIGIT = 4

# Synonyms: adjectives for thickness, and for slant a prefix adjective or a postfix phrase.
THICKNESS_WORDS = {"thin": ("thin", "light", "fine"), "regular": ("regular", "medium", "normal"),
                   "bold": ("bold", "thick", "heavy")}
SLANT_ADJECTIVES = {"left": ("left-leaning", "left-slanted"), "upright": ("upright", "straight", "vertical"),
                    "right": ("right-leaning", "right-slanted")}
SLANT_PHRASES = {"left": ("leaning left", "slanted to the left", "tilted left"),
                 "upright": ("standing upright", "standing straight", "held vertical"),
                 "right": ("leaning right", "slanted to the right", "tilted right")}
TEMPLATES = (
    "{a} {thick} {digit} {slant_phrase}",  # a bold seven leaning right
    "{thick} {slant_adj} {digit}",  # thin upright 3
    "{a} {slant_adj} {thick} {digit}",  # a right-leaning heavy 8
    "the digit {digit}, {thick} and {slant_phrase}",
    "{digit} in a {thick} stroke, {slant_phrase}",
    "handwritten {digit}, {slant_adj}, {thick} strokes",
)


# ---- attributes measured from pixels --------------------------------------------------------------------------------
def _check_images(images: torch.Tensor) -> torch.Tensor:
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected images (M, 28, 28) or (M, 1, 28, 28) in [0, 1], got {list(images.shape)}")
    return images.float()


def ink_mass(images: torch.Tensor) -> torch.Tensor:
    """Sum of pixel values (M,) of images (M, 28, 28) (or (M, 1, 28, 28)) in [0, 1]."""
    return _check_images(images).sum(dim=(1, 2))


def slant(images: torch.Tensor) -> torch.Tensor:
    """Shear ``-mu11 / mu02`` (M,) of the intensity-weighted central second moments; positive leans right.

    x is the column index, y the row index (downwards): a top displaced to the right makes x fall as y grows, so
    mu11 < 0 and the slant is positive. Blank images get 0.
    """
    images = _check_images(images)
    coords = torch.arange(IMAGE_SIZE, dtype=images.dtype, device=images.device)
    mass = images.sum(dim=(1, 2)).clamp_min(1e-8)
    yc = (images.sum(2) * coords).sum(1) / mass
    xc = (images.sum(1) * coords).sum(1) / mass
    dy = coords[None, :, None] - yc[:, None, None]  # (M, 28, 1)
    dx = coords[None, None, :] - xc[:, None, None]  # (M, 1, 28)
    mu11 = (images * dx * dy).sum(dim=(1, 2))
    mu02 = (images * dy * dy).sum(dim=(1, 2))
    return torch.where(mu02 > 1e-8, -mu11 / mu02.clamp_min(1e-8), torch.zeros_like(mu02))


@dataclass(frozen=True)
class AttributeThresholds:
    """Per-class tercile cuts: ``ink`` and ``slant`` (10, 2) each, [lower, upper] per class."""

    ink: torch.Tensor
    slant: torch.Tensor

    def to_json(self) -> dict:
        return {"ink": self.ink.tolist(), "slant": self.slant.tolist(), "fitted_on": "train split (split_seed 0, "
                "val_fraction 0.2)", "rule": "per-class terciles (torch.quantile 1/3, 2/3)"}

    @classmethod
    def from_json(cls, data: dict, source: str = "thresholds") -> AttributeThresholds:
        try:
            ink, sl = torch.tensor(data["ink"]), torch.tensor(data["slant"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: expected 'ink' and 'slant' lists of [low, high] per class ({err})") from err
        if ink.shape != (NUM_CLASSES, 2) or sl.shape != (NUM_CLASSES, 2):
            raise ValueError(f"{source}: 'ink' and 'slant' must be 10 x 2, got {list(ink.shape)}, {list(sl.shape)}")
        return cls(ink.float(), sl.float())


def fit_thresholds(images: torch.Tensor, labels: torch.Tensor) -> AttributeThresholds:
    """Tercile cuts of ink mass and slant per class of ``images`` (M, 28, 28) with ``labels`` (M,)."""
    ink_values, slant_values = ink_mass(images), slant(images)
    q = torch.tensor([1 / 3, 2 / 3])
    ink_cuts, slant_cuts = [], []
    for c in range(NUM_CLASSES):
        members = labels == c
        if not bool(members.any()):
            raise ValueError(f"fit_thresholds: no image of class {c}")
        ink_cuts.append(torch.quantile(ink_values[members], q))
        slant_cuts.append(torch.quantile(slant_values[members], q))
    return AttributeThresholds(torch.stack(ink_cuts), torch.stack(slant_cuts))


def save_thresholds(thresholds: AttributeThresholds, path: str | Path | None = None) -> Path:
    path = Path(path) if path is not None else asset_path(THRESHOLDS_ASSET)
    path.write_text(json.dumps(thresholds.to_json(), indent=1) + "\n")
    return path


def build_thresholds_asset(path: str | Path | None = None) -> Path:
    """Fit the cuts on the train split and write them as the shipped asset."""
    images, labels = load_mnist_split("train")
    return save_thresholds(fit_thresholds(images, labels), path)


@lru_cache(maxsize=4)
def load_thresholds(path: str | None = None) -> AttributeThresholds:
    """The stored cuts (None: the shipped asset)."""
    file = Path(path) if path is not None else asset_path(THRESHOLDS_ASSET)
    if not file.is_file():
        raise FileNotFoundError(f"caption thresholds not found: {file}; rebuild with "
                                "`python scripts/build_assets.py captions`")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    return AttributeThresholds.from_json(data, str(file))


def _tercile(values: torch.Tensor, cuts: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    cuts = cuts.to(values.device)[classes.to(values.device).long()]  # (M, 2)
    return (values > cuts[:, 0]).long() + (values > cuts[:, 1]).long()


def thickness_class(images: torch.Tensor, classes: torch.Tensor,
                    thresholds: AttributeThresholds | None = None) -> torch.Tensor:
    """Thickness index (M,) in {0 thin, 1 regular, 2 bold} of images judged against the cuts of ``classes`` (M,)."""
    return _tercile(ink_mass(images), (thresholds or load_thresholds()).ink, classes)


def slant_class(images: torch.Tensor, classes: torch.Tensor,
                thresholds: AttributeThresholds | None = None) -> torch.Tensor:
    """Slant index (M,) in {0 left, 1 upright, 2 right} of images judged against the cuts of ``classes`` (M,)."""
    return _tercile(slant(images), (thresholds or load_thresholds()).slant, classes)


# ---- captions --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DigitAttributes:
    """What a caption says; ``None`` for an attribute the prompt does not mention."""

    digit: int | None
    thickness: str | None
    slant: str | None


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou8" else "a"


def render_caption(digit: int, thickness: str, slant_name: str, rng: random.Random) -> str:
    """One phrasing of (digit, thickness, slant), chosen by ``rng`` (template, synonyms, word or numeral)."""
    if digit not in range(NUM_CLASSES) or thickness not in THICKNESS or slant_name not in SLANT:
        raise ValueError(f"bad attributes ({digit}, {thickness!r}, {slant_name!r})")
    return _render(rng.choice(TEMPLATES), digit, thickness, slant_name, rng)


def _render(template: str, digit: int, thickness: str, slant_name: str, rng: random.Random) -> str:
    digit_text = DIGIT_WORDS[digit] if rng.random() < 0.5 else str(digit)
    fields = {"digit": digit_text, "thick": rng.choice(THICKNESS_WORDS[thickness]),
              "slant_adj": rng.choice(SLANT_ADJECTIVES[slant_name]),
              "slant_phrase": rng.choice(SLANT_PHRASES[slant_name])}
    first = template.split()[1] if template.startswith("{a}") else ""
    fields["a"] = _article(first.format(**fields)) if first else ""
    return template.format(**fields)


def caption_vocabulary() -> list[str]:
    """Every lower-case word the caption templates can produce (sorted): the vocabulary of a word-level tokenizer."""
    texts = [t.replace("{a}", "a an") for t in TEMPLATES] + list(DIGIT_WORDS) + [str(d) for d in range(NUM_CLASSES)]
    texts += [w for words in (*THICKNESS_WORDS.values(), *SLANT_ADJECTIVES.values(), *SLANT_PHRASES.values())
              for w in words]
    return sorted({w for text in texts for w in re.findall(r"[a-z0-9]+", re.sub(r"\{\w+\}", " ", text.lower()))})


_WORD_TO_DIGIT = {**{w: i for i, w in enumerate(DIGIT_WORDS)}, **{str(i): i for i in range(NUM_CLASSES)}}
_WORD_TO_THICKNESS = {w: t for t, words in THICKNESS_WORDS.items() for w in words}


def parse_prompt(prompt: str) -> DigitAttributes:
    """Read (digit, thickness, slant) back from a prompt; unmentioned attributes are None.

    Digits as words or numerals; thickness by its synonyms; slant by ``left``/``right`` (leaning, slanted, tilted)
    or ``upright``/``straight``/``vertical``.

    Raises:
        ValueError: the prompt names two different values of one attribute.
    """
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    found: dict[str, set] = {"digit": set(), "thickness": set(), "slant": set()}
    for word in words:
        if word in _WORD_TO_DIGIT:
            found["digit"].add(_WORD_TO_DIGIT[word])
        if word in _WORD_TO_THICKNESS:
            found["thickness"].add(_WORD_TO_THICKNESS[word])
        if word in ("left", "right"):
            found["slant"].add(word)
        elif word in ("upright", "straight", "vertical"):
            found["slant"].add("upright")
    for name, values in found.items():
        if len(values) > 1:
            raise ValueError(f"prompt {prompt!r} names several values of {name}: {sorted(map(str, values))}")
    return DigitAttributes(*(next(iter(found[n]), None) for n in ("digit", "thickness", "slant")))


@lru_cache(maxsize=4)
def split_attributes(split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels, thickness index, slant index), each (M,), of the real digits of ``split`` in split order."""
    images, labels = load_mnist_split(split)
    thresholds = load_thresholds()
    return labels, thickness_class(images, labels, thresholds), slant_class(images, labels, thresholds)


def split_captions(split: str, captions_per_digit: int = 1, seed: int = 0) -> list[str]:
    """Captions of the real digits of ``split``: ``captions_per_digit`` phrasings per digit, digit-major order.

    Phrasing of caption k of digit i is seeded by (seed, split, i, k), so the list is reproducible.
    """
    labels, thick, sl = split_attributes(split)
    out = []
    for i, (c, t, s) in enumerate(zip(labels.tolist(), thick.tolist(), sl.tolist())):
        for k in range(captions_per_digit):
            rng = random.Random(f"{seed}/{split}/{i}/{k}")
            out.append(render_caption(c, THICKNESS[t], SLANT[s], rng))
    return out


def train_prompts() -> list[str]:
    """Training prompts: four phrasings of each train-split digit's caption (16,000 prompts)."""
    return split_captions("train", TRAIN_CAPTIONS_PER_DIGIT)


def eval_prompts() -> list[str]:
    """Held-out prompts: one caption per validation digit (1,000), ordered so that every prefix is class-balanced
    (round-robin over classes), since evaluation takes the first N."""
    labels, _, _ = split_attributes("val")
    captions = split_captions("val", 1, seed=1)
    rank_in_class = torch.zeros_like(labels)
    for c in range(NUM_CLASSES):
        members = (labels == c).nonzero()[:, 0]
        rank_in_class[members] = torch.arange(len(members))
    order = sorted(range(len(labels)), key=lambda i: (int(rank_in_class[i]), int(labels[i])))
    return [captions[i] for i in order]


# ---- prompt faithfulness of generated images ------------------------------------------------------------------------
def attribute_hits(images: torch.Tensor, prompts: list[str], predicted_classes: torch.Tensor,
                   thresholds: AttributeThresholds | None = None) -> dict[str, tuple[int, int]]:
    """Per attribute, (hits, judged) over images (M, 28, 28) in [0, 1] drawn for ``prompts`` (M).

    Class: ``predicted_classes`` (M,) (e.g. the MNIST classifier's) against the prompt's digit. Thickness and slant:
    measured from the pixels and cut with the thresholds of the prompt's digit. A prompt that does not mention an
    attribute (or the digit, for thickness and slant) is not judged on it. Counts add over batches and ranks.
    """
    if len(prompts) != images.shape[0] or predicted_classes.shape[0] != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images, {len(prompts)} prompts, {predicted_classes.shape[0]} classes")
    parsed = [parse_prompt(p) for p in prompts]
    hits: dict[str, tuple[int, int]] = {}
    has_digit = torch.tensor([p.digit is not None for p in parsed], dtype=torch.bool)
    digits = torch.tensor([p.digit if p.digit is not None else 0 for p in parsed], dtype=torch.long)
    correct = (predicted_classes.cpu().long() == digits) & has_digit
    hits["class"] = (int(correct.sum()), int(has_digit.sum()))
    measured = {"thickness": (thickness_class(images.cpu(), digits, thresholds), THICKNESS),
                "slant": (slant_class(images.cpu(), digits, thresholds), SLANT)}
    for name, (values, names) in measured.items():
        wanted = [getattr(p, name) for p in parsed]
        judged = has_digit & torch.tensor([w is not None for w in wanted], dtype=torch.bool)
        target = torch.tensor([names.index(w) if w is not None else -1 for w in wanted])
        hits[name] = (int(((values == target) & judged).sum()), int(judged.sum()))
    return hits


