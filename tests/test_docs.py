"""Docs that match the code and stand alone.

* every repository path, module path and section anchor that README.md, a docs/ page, a config or a comment or
  docstring of the package, the scripts or the examples names exists;
* README.md stays a front door (at most 300 lines) and the ImageNet instructions exist once;
* no page and no code speaks of how it was made (sessions, issue numbers, engineers, the lead) or cites documents
  that are not in the repository;
* every config key is commented, and the error messages the README quotes are the generated ones.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = {"dimo_lightning", "configs", "examples", "tests", "docs", "scripts"}
CONFIGS = sorted([*ROOT.glob("configs/**/*.yaml"), *ROOT.glob("examples/*.yaml")])
DOCS = sorted([ROOT / "README.md", *ROOT.glob("docs/**/*.md")])
SOURCES = sorted(p for folder in ("dimo_lightning", "scripts", "examples") for p in (ROOT / folder).rglob("*.py"))
OTHER_CODE = sorted([*(ROOT / "scripts").glob("*.sh"), ROOT / "Makefile", ROOT / "pyproject.toml"])
DOC_DATA = sorted(ROOT.glob("docs/**/*.json"))
README_MAX_LINES = 300

FOLDERS = "|".join(sorted(TOP_LEVEL))
BARE_PATH = re.compile(r"(?<![\w/.-])((?:" + FOLDERS + r")/[\w./*-]+)")
MODULE_PATH = re.compile(r"(?<![\w.])dimo_lightning(?:\.\w+)+")
ANCHORED = re.compile(r"(?<![\w/.-])((?:docs/[\w./-]+|README)\.md)#([\w-]+)")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
# How a page or a comment must not speak: of how it was made, or citing documents that are not in the repository.
NOTEBOOK = re.compile(r"\bsessions?\b|\bissues?\s*#?\d+|\bengineers?\b|\bthe lead\b", re.IGNORECASE)
OUTSIDE_DOCS = re.compile(r"dimo-spec\.md|design\.md|calibration\.md|teachers\.md\b|docs/notes|\bspec (?:sections?|§)",
                          re.IGNORECASE)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ---- what a text names ---------------------------------------------------------------------------------------------
def _clean(token: str) -> str | None:
    token = token.split("::")[0].split("#")[0].rstrip(".,:;)`'\"")
    if token.split("/")[0] not in TOP_LEVEL or any(c in token for c in "*<{$"):
        return None
    return token


def _named_paths(text: str, markdown: bool = True) -> set[str]:
    """Repository paths (first component a top-level folder) in `code spans`, markdown links and plain text."""
    candidates = BARE_PATH.findall(text)
    if markdown:
        candidates += re.findall(r"`([^`\s]+)`", text) + MARKDOWN_LINK.findall(text)
    return {p for p in map(_clean, candidates) if p}


def _missing_paths(paths: set[str]) -> list[str]:
    return sorted(p for p in paths if not (ROOT / p).exists())


@cache
def _slugs(markdown_file: Path) -> frozenset[str]:
    """GitHub's heading anchors of a markdown file (headings inside fenced code blocks are not headings)."""
    slugs: list[str] = []
    fenced = False
    for line in markdown_file.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            slug, n = base, 1
            while slug in slugs:
                slug, n = f"{base}-{n}", n + 1
            slugs.append(slug)
    return frozenset(slugs)


def _missing_anchors(text: str) -> list[str]:
    """`docs/page.md#anchor` references (root-relative) whose page lacks that heading."""
    missing = []
    for page, anchor in ANCHORED.findall(text):
        target = ROOT / page
        if target.exists() and anchor not in _slugs(target):
            missing.append(f"{page}#{anchor}")
    return missing


def _broken_links(doc: Path) -> list[str]:
    """Markdown links of ``doc`` (relative to its folder, as GitHub resolves them) to missing files or anchors."""
    broken = []
    for link in MARKDOWN_LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        if not path.exists():
            broken.append(link)
        elif anchor and path.suffix == ".md" and anchor not in _slugs(path):
            broken.append(link)
    return broken


@cache
def _module_source(path: Path) -> str:
    return path.read_text()


def _resolves(dotted: str) -> bool:
    """``dimo_lightning.a.b.Name[.attr]``: the package and module exist, and the module defines or imports Name."""
    parts = dotted.split(".")
    path = ROOT / parts[0]
    rest = parts[1:]
    while rest and (path / rest[0]).is_dir():
        path, rest = path / rest[0], rest[1:]
    if rest and (path / f"{rest[0]}.py").is_file():
        path, rest = path / f"{rest[0]}.py", rest[1:]
    elif path.is_dir():
        path = path / "__init__.py"
    if not rest:
        return path.exists()
    if not path.exists():
        return False
    name = re.escape(rest[0])
    definition = rf"^\s*(?:class|def)\s+{name}\b|^{name}\s*[:=]|\bimport\b[^\n]*\b{name}\b|^\s+{name}\s*[,)]"
    return re.search(definition, _module_source(path), re.MULTILINE) is not None


def _unresolved_modules(text: str) -> list[str]:
    return sorted({m for m in MODULE_PATH.findall(text) if not _resolves(m)})


def _comments_and_docstrings(source: Path) -> str:
    """The comments and docstrings of a Python file (what the code says about itself)."""
    text = source.read_text()
    pieces = [tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline)
              if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                pieces.append(doc)
    return "\n".join(pieces)


# ---- paths, modules and anchors exist ------------------------------------------------------------------------------
@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_path_named_in_the_docs_exists(doc):
    text = doc.read_text()
    assert not _missing_paths(_named_paths(text)), f"{_rel(doc)} names files that do not exist"
    assert not _broken_links(doc), f"{_rel(doc)} links to missing files or anchors: {_broken_links(doc)}"
    assert not _missing_anchors(text), f"{_rel(doc)} names missing sections: {_missing_anchors(text)}"
    assert not _unresolved_modules(text), f"{_rel(doc)} names missing modules: {_unresolved_modules(text)}"


def test_the_docs_name_paths():
    """The extraction itself works (the checks above are not vacuous)."""
    assert len(_named_paths((ROOT / "README.md").read_text())) > 10
    assert _slugs(ROOT / "docs/method.md") >= {
        "the-iteration", "student-input", "targets-and-the-divergence", "the-aux-update", "official-defaults",
        "deviations", "consistency-diagnostic", "soft-dimo",
    }
    assert _missing_paths({"docs/no_such_page.md"}) and _missing_anchors("docs/method.md#no-such-section")
    assert not _resolves("dimo_lightning.training.module.NoSuchClass")
    assert _resolves("dimo_lightning.training.module.DiMOModule")


@pytest.mark.parametrize("config", CONFIGS, ids=_rel)
def test_every_path_named_in_a_config_exists(config):
    text = config.read_text()
    missing = _missing_paths(_named_paths(text, markdown=False))
    assert not missing, f"{_rel(config)} names files that do not exist: {missing}"
    assert not _missing_anchors(text), f"{_rel(config)} names missing sections: {_missing_anchors(text)}"
    assert not _unresolved_modules(text), f"{_rel(config)} names missing modules: {_unresolved_modules(text)}"


@pytest.mark.parametrize("source", SOURCES, ids=_rel)
def test_every_path_named_in_comments_and_docstrings_exists(source):
    text = _comments_and_docstrings(source)
    missing = _missing_paths(_named_paths(text, markdown=False))
    assert not missing, f"{_rel(source)} names files that do not exist: {missing}"
    assert not _missing_anchors(text), f"{_rel(source)} names missing sections: {_missing_anchors(text)}"
    assert not _unresolved_modules(text), f"{_rel(source)} names missing modules: {_unresolved_modules(text)}"


def test_test_names_in_the_docs_exist():
    for doc in DOCS:
        for path, name in re.findall(r"(tests/[\w/]+\.py)::\s*(\w+)", doc.read_text()):
            assert f"def {name}(" in (ROOT / path).read_text(), (_rel(doc), path, name)


# ---- the product speaks of itself ----------------------------------------------------------------------------------
def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move sections into docs/"
    assert not (ROOT / "docs/notes").exists(), "working notes are not shipped: put results in docs/experiments.md"


@pytest.mark.parametrize("path", [*DOCS, *DOC_DATA, *CONFIGS, *SOURCES, *OTHER_CODE], ids=_rel)
def test_no_notebook_language_and_no_outside_documents(path):
    """README, docs and code describe the product, not how it was made, and cite only what ships with it."""
    text = path.read_text()
    found = sorted({m.group(0) for m in NOTEBOOK.finditer(text)} | {m.group(0) for m in OUTSIDE_DOCS.finditer(text)})
    assert not found, f"{_rel(path)} says {found}"


# ---- configs and the README's examples -----------------------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS, ids=_rel)
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
