"""Prompt lists read without Lightning: ``.txt`` (one prompt per line) and ``.jsonl`` (``{"prompt": ...}`` per line)
files indexed by line offsets and read lazily, or a ``package.module:function`` generator."""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PROMPT_FILE_SUFFIXES = (".txt", ".jsonl")


class PromptFile(Sequence):
    """The prompts of a ``.txt`` / ``.jsonl`` file, validated once and read lazily by line offset.

    Args:
        path: the file.
        what: the argument it came from (named in errors).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: empty file, blank line, invalid JSON, a line that is not an object with a non-empty string
            ``"prompt"``, or undecodable UTF-8; the message names the file and the 1-based line number.
    """

    def __init__(self, path: str | Path, what: str = "prompts") -> None:
        self.path = Path(path)
        if self.path.suffix not in PROMPT_FILE_SUFFIXES:
            raise ValueError(f"{what}: {self.path} must end in .txt or .jsonl")
        if not self.path.is_file():
            raise FileNotFoundError(f"{what}: prompt file not found: {self.path}")
        self.jsonl = self.path.suffix == ".jsonl"
        offsets = []
        with self.path.open("rb") as f:
            offset = 0
            for number, raw in enumerate(f, start=1):
                self._parse(raw, number)  # validate every line once
                offsets.append(offset)
                offset += len(raw)
        if not offsets:
            raise ValueError(f"{what}: prompt file {self.path} is empty")
        self.offsets = np.asarray(offsets, dtype=np.int64)

    def _parse(self, raw: bytes, number: int) -> str:
        where = f"{self.path}:{number}"
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as err:
            raise ValueError(f"{where}: not UTF-8 ({err})") from err
        if not line.strip():
            raise ValueError(f"{where}: blank line (every line must hold one prompt)")
        if not self.jsonl:
            return line
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or "prompt" not in record:
            raise ValueError(f'{where}: expected an object with a "prompt" field')
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f'{where}: "prompt" must be a non-empty string, got {prompt!r}')
        return prompt

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        with self.path.open("rb") as f:
            f.seek(int(self.offsets[index]))
            return self._parse(f.readline(), index + 1)

    def take(self, indices: Sequence[int]) -> list[str]:
        """The prompts at ``indices`` with one open file."""
        out = []
        with self.path.open("rb") as f:
            for index in indices:
                f.seek(int(self.offsets[int(index)]))
                out.append(self._parse(f.readline(), int(index) + 1))
        return out


def load_prompts(source: str, what: str = "prompts") -> Sequence[str]:
    """Prompts from a ``.txt`` / ``.jsonl`` path or a ``package.module:function`` generator (no arguments).

    Raises:
        FileNotFoundError / ValueError: see :class:`PromptFile`; a generator that cannot be imported or returns no
            prompts, an empty prompt or a non-string raises ``ValueError`` naming ``what``.
    """
    if Path(source).suffix in PROMPT_FILE_SUFFIXES:
        return PromptFile(source, what)
    if ":" not in source:
        raise ValueError(
            f"{what}: {source!r} is neither a .txt/.jsonl prompt file nor a `package.module:function` generator"
        )
    module_name, _, attr = source.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{what}: cannot import prompt generator {source!r}: {err}") from err
    prompts = list(fn())
    if not prompts:
        raise ValueError(f"{what}: prompt generator {source!r} returned no prompts")
    bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()), None)
    if bad is not None:
        raise ValueError(f"{what}: prompt generator {source!r} returned an empty or non-string prompt at {bad}")
    return prompts
