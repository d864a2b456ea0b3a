"""Text tokenizers of sequence teachers: Hugging Face tokenizer folders, loaded without remote code.

A text teacher's codes are token ids; this module turns prompts into ids and ids back into strings. The tokenizer is
frozen, held by the teacher and never copied into the student.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def load_text_tokenizer(folder: str | Path, layout: str = "") -> Any:
    """A transformers tokenizer from a local folder, never running code from it.

    A folder with ``tokenizer.json`` loads as ``PreTrainedTokenizerFast`` (LLaDA's ``config.json`` names remote
    configuration code that ``AutoTokenizer`` would follow, and ask about interactively); any other folder (e.g. GPT-2's
    ``vocab.json`` + ``merges.txt``) through ``AutoTokenizer`` with ``trust_remote_code=False``.

    Raises:
        FileNotFoundError: the folder does not exist or holds none of :data:`TOKENIZER_FILES` (the message names it
            and ``layout``).
        ValueError: transformers cannot load a tokenizer from it.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(folder)
    hint = f". Expected: {layout}" if layout else ""
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} not found{hint}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}){hint}")
    try:
        if (folder / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(str(folder))
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"cannot load a tokenizer from {folder}: {err}{hint}") from err


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text as the tokenizer's own call gives them (its default special tokens, no padding or
    truncation: a text too long must fail, not be cut)."""
    return [list(ids) for ids in tokenizer(list(texts), padding=False, truncation=False)["input_ids"]]


def decode_ids(tokenizer: Any, rows: Iterable[Sequence[int]], skip_special_tokens: bool,
               drop_ids: Iterable[int] = ()) -> list[str]:
    """Strings of id rows; ids in ``drop_ids`` (e.g. a mask id outside the tokenizer) are removed first."""
    dropped = set(drop_ids)
    return [tokenizer.decode([int(i) for i in row if int(i) not in dropped], skip_special_tokens=skip_special_tokens)
            for row in rows]
