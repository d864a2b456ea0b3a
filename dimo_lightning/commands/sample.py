"""``dimo sample --student DIR --labels 0,1,2 --num 8 --output OUT`` (``--prompts FILE`` or ``--prompt TEXT`` for a
prompt student): PNGs, ``grid.png`` and ``samples.npz`` from an exported student, and the image helpers it uses. A text
student (``--prompt TEXT`` / ``--prompts FILE``, or ``--num N`` alone for unconditional texts) prints its texts and
writes ``OUT/samples.jsonl``.

This module imports no Lightning, so Lightning-free sampling scripts can use :func:`parse_labels`, :func:`image_grid`
and :func:`save_png` too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from dimo_lightning.data.prompt_files import load_prompts
from dimo_lightning.inference.export import load_student

GRID_MAX_ROWS = 32  # grid.png of a prompt file shows its first prompts only (grid.txt lists them)


def parse_labels(text: str | Sequence[int] | int, flag: str = "--labels") -> list[int]:
    """``"0,1,2"`` (or a list) -> [0, 1, 2]; a clear error naming ``flag`` otherwise."""
    if isinstance(text, int):
        return [text]
    if isinstance(text, str):
        try:
            labels = [int(part) for part in text.split(",") if part.strip()]
        except ValueError as err:
            raise ValueError(f"{flag} must be comma-separated integers like 0,1,2; got {text!r}") from err
    else:
        labels = [int(x) for x in text]
    if not labels:
        raise ValueError(f"{flag} is empty")
    return labels


def sample_command(
    student: str,
    labels: str | None = None,
    num: int = 8,
    output: str = "samples",
    seed: int = 0,
    batch_size: int = 64,
    temperature: float | None = None,
    device: str = "cpu",
    prompts: str | None = None,
    prompt: str | None = None,
) -> None:
    """Sample an exported student: ``num`` images per condition as PNGs, ``grid.png`` (a row per condition) and
    ``samples.npz`` (``images`` float32 (M, H, W) for grey or (M, C, H, W); ``labels`` int64 (M,) for a class
    student, ``prompts`` (M,) unicode for a text-to-image student, whose PNGs carry their prompt as a text chunk).

    Args:
        student: the folder written by ``dimo export``.
        labels: comma-separated class labels, e.g. 0,1,2 (class students; unset: 0).
        num: samples per label or prompt.
        output: folder to write into.
        seed: seed of the first batch (batch i uses seed + i).
        batch_size: samples per forward pass.
        temperature: sampling temperature (unset: the exported default).
        device: torch device.
        prompts: text-to-image students: a .txt (one prompt a line) or .jsonl ({"prompt": ...} a line) file, or a
            ``package.module:function`` returning prompts (e.g. dimo_lightning.data.captions:eval_prompts).
        prompt: text-to-image students: one prompt.

    A text student takes ``--prompt`` / ``--prompts`` (``num`` completions each) or neither (``num`` unconditional
    texts): the texts are printed and written to ``OUTPUT/samples.jsonl`` (see :func:`sample_texts`).
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"--num and --batch_size must be >= 1, got {num} and {batch_size}")
    if prompts is not None and prompt is not None:
        raise ValueError("give --prompts FILE or --prompt TEXT, not both")
    pipeline = load_student(student, device)
    if pipeline.conditioning_type == "text":  # a text student (a sequence teacher's): strings, not images
        sample_texts(pipeline, student, labels, num, output, seed, batch_size, temperature, prompts, prompt)
        return
    text_student = pipeline.conditioning_type == "prompt"
    if text_student:
        if labels is not None:
            raise ValueError(f"--labels: {student} is a text-to-image student; give --prompts FILE or --prompt TEXT")
        if prompts is None and prompt is None:
            raise ValueError(f"{student} is a text-to-image student: give --prompts FILE or --prompt TEXT")
        requested = [prompt] if prompt is not None else read_prompt_source(prompts)
    else:
        if prompts is not None or prompt is not None:
            flag = "--prompts" if prompts is not None else "--prompt"
            raise ValueError(f"{flag}: {student} is a class-conditional student "
                             f"({pipeline.conditioner.num_classes} classes); give --labels")
        requested = parse_labels("0" if labels is None else labels)
        pipeline.conditioner.check_labels(torch.tensor(requested), flag="--labels")
    # condition-major: a grid row per condition
    conditions = [c for c in requested for _ in range(num)]
    rows = min(len(requested), GRID_MAX_ROWS) if text_student else len(requested)
    out = Path(output)
    png_dir = out / "png"
    png_dir.mkdir(parents=True, exist_ok=True)
    # Samples go to a memory-mapped .npy as they are drawn (a prompt file may hold 50k prompts); savez_compressed
    # then streams it into samples.npz. Only the grid's images are kept in memory.
    staging = out / ".samples_images.npy"
    array = None
    grid_images = []
    for i, start in enumerate(range(0, len(conditions), batch_size)):
        batch = conditions[start:start + batch_size]
        images = pipeline(batch if text_student else torch.tensor(batch), seed=seed + i,
                          temperature=temperature).cpu().float()  # (b, C, H, W)
        for k, (image, condition) in enumerate(zip(images, batch), start=start):
            if text_student:
                save_png(image, png_dir / f"{k:06d}.png", text={"prompt": condition})
            else:
                save_png(image, png_dir / f"{k:06d}_{condition}.png")
        pixels = images[:, 0] if images.shape[1] == 1 else images  # grey: (b, H, W)
        if array is None:
            array = np.lib.format.open_memmap(staging, mode="w+", dtype=np.float32,
                                              shape=(len(conditions), *pixels.shape[1:]))
        array[start:start + len(batch)] = pixels.numpy()
        if start < rows * num:
            grid_images.append(images[:rows * num - start])
    save_png(image_grid(torch.cat(grid_images), ncol=num), out / "grid.png")
    try:
        if text_student:
            (out / "grid.txt").write_text("".join(f"{p}\n" for p in requested[:rows]))  # the grid's row prompts
            np.savez_compressed(out / "samples.npz", images=array, prompts=np.asarray(conditions, dtype=np.str_))
        else:
            np.savez_compressed(out / "samples.npz", images=array, labels=np.asarray(conditions, dtype=np.int64))
    finally:
        del array
        staging.unlink(missing_ok=True)
    print(f"wrote {len(conditions)} samples to {out / 'samples.npz'}, PNGs in {png_dir}, grid {out / 'grid.png'}")


def sample_texts(pipeline, student: str, labels: str | None, num: int, output: str | None, seed: int,
                 batch_size: int, temperature: float | None, prompts: str | None, prompt: str | None) -> list[dict]:
    """``dimo sample`` of a text student: ``num`` texts per prompt (``--prompt`` / ``--prompts``), or ``num``
    unconditional texts; each printed (prompt + completion) and written to ``OUTPUT/samples.jsonl`` as
    ``{"index", "prompt", "text"}`` (``text``: the completion) -> the records."""
    if labels is not None:
        raise ValueError(f"--labels: {student} is a text student; give --prompt TEXT, --prompts FILE, or --num N "
                         "alone for unconditional texts")
    requested = [prompt] if prompt is not None else read_prompt_source(prompts) if prompts is not None else None
    conditions: list[str] | None = [p for p in requested for _ in range(num)] if requested is not None else None
    total = len(conditions) if conditions is not None else num
    records = []
    for i, start in enumerate(range(0, total, batch_size)):
        stop = min(start + batch_size, total)
        batch = conditions[start:stop] if conditions is not None else stop - start  # prompts, or a count
        pairs = pipeline.texts(batch, seed=seed + i, temperature=temperature)
        for k, (text_prompt, completion) in enumerate(pairs, start=start):
            records.append({"index": k, "prompt": conditions[k] if conditions is not None else text_prompt,
                            "text": completion})
    for record in records:
        print(f"=== sample {record['index']} ===\n{record['prompt']}{record['text']}")
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "samples.jsonl").open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"wrote {len(records)} texts to {out / 'samples.jsonl'}")
    return records


def read_prompt_source(source: str) -> list[str]:
    """The prompts of ``--prompts``: a .txt / .jsonl file or a ``package.module:function`` (the formats of
    ``PromptDataModule``)."""
    return list(load_prompts(source, "--prompts"))


def image_grid(images: torch.Tensor, ncol: int, pad: int = 2) -> torch.Tensor:
    """(M, C, H, W) -> one (C, H', W') image with ``ncol`` columns and grey padding."""
    m, c, h, w = images.shape
    nrow = math.ceil(m / ncol)
    grid = torch.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), 0.5)
    for k in range(m):
        r, col = divmod(k, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = images[k]
    return grid


def save_png(image: torch.Tensor, path: Path, text: Mapping[str, str] | None = None) -> None:
    """(C, H, W) in [0, 1] -> an 8-bit PNG (grey for one channel), with ``text`` as UTF-8 (iTXt) chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, value)
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path, pnginfo=info)
