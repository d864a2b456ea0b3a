"""Docs that match the code: every path the README names exists, every config key is commented, and the ImageNet
instructions exist once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = {"dimo_lightning", "configs", "examples", "tests", "docs", "scripts"}
CONFIGS = sorted([*ROOT.glob("configs/**/*.yaml"), *ROOT.glob("examples/*.yaml")])


def _named_paths(markdown: str) -> set[str]:
    """Repository paths in `code spans`, markdown links and code blocks (first component a top-level folder)."""
    candidates = re.findall(r"`([^`\s]+)`", markdown) + re.findall(r"\]\(([^)\s]+)\)", markdown)
    folders = "|".join(sorted(TOP_LEVEL))
    candidates += re.findall(r"(?<![\w/.-])((?:" + folders + r")/[\w./*-]+)", markdown)
    paths = set()
    for token in candidates:
        token = token.split("::")[0].rstrip(".,:;)")
        if token.split("/")[0] in TOP_LEVEL and "*" not in token and "<" not in token:
            paths.add(token)
    return paths


@pytest.mark.parametrize("doc", ["README.md", "docs/imagenet.md", "docs/cli_errors.md", "docs/evaluation.md",
                                 "docs/distributed.md", "docs/bench.md", "docs/sweeps.md", "docs/soft-dimo.md",
                                 "docs/text-to-image.md", "docs/meissonic.md"])
def test_every_path_named_in_the_docs_exists(doc):
    paths = _named_paths((ROOT / doc).read_text())
    assert paths, "the path extraction found nothing"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"{doc} names files that do not exist: {missing}"


def test_test_names_in_the_readme_exist():
    for path, name in re.findall(r"(tests/[\w/]+\.py)::\s*(\w+)", (ROOT / "README.md").read_text()):
        assert f"def {name}(" in (ROOT / path).read_text(), (path, name)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_config_key_is_commented(config):
    """Each `key: value` line carries a comment (headers such as `trainer:` and `class_path` lines name themselves)."""
    bare = [
        line for line in config.read_text().splitlines()
        if re.match(r"^\s*-?\s*[A-Za-z_]+:\s*\S", line) and "#" not in line
        and not re.match(r"^\s*-?\s*class_path:", line)
    ]
    assert not bare, f"{config.name}: keys without a comment: {bare}"


def test_imagenet_instructions_exist_once():
    readme, imagenet = (ROOT / "README.md").read_text(), (ROOT / "docs/imagenet.md").read_text()
    for heading in ("### 1. Download the weights", "### 2. Train", "### 3. Evaluate"):
        assert heading in imagenet and heading not in readme
    assert "docs/imagenet.md" in readme


def test_readme_error_examples_match_the_generated_table():
    """The README quotes a few rows of docs/cli_errors.md (which tests/test_cli_errors.py checks against `dimo`);
    every quoted fragment ("..." marks a cut) must be in it."""
    table = (ROOT / "docs/cli_errors.md").read_text()
    quoted = re.findall(r"`(dimo: error: [^`]+)`", (ROOT / "README.md").read_text())
    assert len(quoted) >= 4
    for message in quoted:
        for fragment in re.split(r"\s*\.\.\.\s*", message):
            assert fragment.strip("() ") in table, fragment
