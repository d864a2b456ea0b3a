"""``dimo export --ckpt_path CKPT --output DIR [--ema true|false] [--format dimo|diffusers]``: the student of a
DiMOModule checkpoint for Lightning-free sampling (see :mod:`dimo_lightning.inference.export` for the folder)."""

from __future__ import annotations

import json
from typing import Literal

from dimo_lightning.inference.export import (
    CONFIG_FILE,
    DIFFUSERS_RECORD_FILE,
    DIFFUSERS_SUBFOLDER,
    export_student,
)


def export_command(ckpt_path: str, output: str, ema: bool | None = None,
                   format: Literal["dimo", "diffusers"] = "dimo") -> None:
    """Export the student of a DiMOModule checkpoint for Lightning-free sampling.

    Args:
        ckpt_path: the Lightning checkpoint (e.g. runs/mnist_dimo/version_0/checkpoints/last.ckpt).
        output: folder for model.safetensors, config.json (and tokenizer.safetensors; text_encoder/ and
            text_tokenizer/ for a text-to-image student; network/ in the released MDLM / LLaDA layout and tokenizer/
            for a text student).
        ema: true: the StudentEMA average; false: the raw student; unset: the EMA when the checkpoint has one.
        format: dimo (model.safetensors + config.json for `dimo sample`) or diffusers (OUTPUT/transformer/ in the
            released Meissonic / aMUSEd layout, loadable as MeissonicTeacher(transformer=...) or by their pipelines).
    """
    out = export_student(ckpt_path, output, ema, format)
    if format == "diffusers":
        record = json.loads((out / DIFFUSERS_RECORD_FILE).read_text())
        print(f"exported the {record['weights_source']} student (generator step {record['generator_step']}) to "
              f"{out / DIFFUSERS_SUBFOLDER}")
        return
    config = json.loads((out / CONFIG_FILE).read_text())
    print(f"exported the {config['weights_source']} student (generator step {config['generator_step']}) to {out}")
