"""Export a distilled student out of a Lightning checkpoint, and sample it without Lightning.

``dimo export --ckpt_path CKPT --output DIR [--ema true|false]`` writes

* ``DIR/model.safetensors``: the student's weights (its EMA by default when the checkpoint has one). For a
  MaskGIT-layout network (:class:`~dimo_lightning.nn.transformer.MaskTransformer`) the keys are MaskGIT v1.0's, so
  the file loads wherever a MaskGIT transformer checkpoint does (``MaskGITTeacher(checkpoint=DIR/model.safetensors)``
  included);
* ``DIR/config.json``: how to rebuild the network, the tokenizer that decodes its codes (small tokenizers such as
  the PatchVQ codebook are copied to ``DIR/tokenizer.safetensors``; large ones such as the VQGAN are referenced by
  path), the teacher it was distilled from (class path and arguments, for the record: sampling never loads it) and
  the sampling defaults (r_init, sigma, temperature, top-k/p);
* for a prompt (text-to-image) student also ``DIR/text_encoder/`` and ``DIR/text_tokenizer/``, the teacher's frozen
  text encoder and its tokenizer (see :mod:`dimo_lightning.inference.prompt_export`).

:func:`load_student` rebuilds a ready :class:`OneStepSampler` (a ``PromptSampler`` for prompt students) from such a
folder. This module imports torch, safetensors and the network/tokenizer classes only: never Lightning (checked by a
test through ``sys.modules``).
``dimo sample --student DIR --labels 0,1,2 --num 8 --output OUT`` (``--prompts FILE`` or ``--prompt TEXT`` for a
prompt student) writes PNGs, ``grid.png`` and ``samples.npz``.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dimo_lightning.core.masking import parse_range
from dimo_lightning.core.weight_files import load_state_dict_checked
from dimo_lightning.data.prompts import load_prompts
from dimo_lightning.inference.pipeline import OneStepSampler
from dimo_lightning.inference.prompt_export import (
    PromptSampler,
    export_prompt_conditioning,
    load_prompt_encoder,
    prompt_conditioning_record,
)
from dimo_lightning.teachers.base import ClassConditionalTeacher, import_class
from dimo_lightning.teachers.prompt import TextConditionalTeacher

EXPORT_FORMAT = "dimo-student"
EXPORT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.safetensors"
MASKGIT_NETWORK = "dimo_lightning.nn.transformer.MaskTransformer"


# ---- records written into every DiMOModule checkpoint ------------------------------------------------------------
def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def network_record(network: nn.Module) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` of a network that exposes its constructor arguments as ``config``."""
    config = getattr(network, "config", None)
    if not isinstance(config, Mapping):
        return None
    return {"class_path": _class_path(network), "init_args": dict(config)}


def tokenizer_record(tokenizer: nn.Module) -> dict[str, Any] | None:
    """The tokenizer's own ``export_record()`` (class path, factory, arguments, small tensors), if it has one."""
    record = getattr(tokenizer, "export_record", None)
    return record() if callable(record) else None


def checkpoint_records(module: Any) -> dict[str, Any]:
    """What an export needs beyond the weights, taken from a live DiMOModule (called when it saves a checkpoint).

    Returns:
        ``{"network", "tokenizer", "conditioning", "emb_noise_scale", "sampling"}``; entries that this teacher
        cannot provide are None, and exporting such a checkpoint fails with a message saying which. ``sampling``
        is the one-step sampling the module evaluates with (``module.settings.one_step_defaults()``).
    """

    teacher = module.teacher
    conditioning = None
    if isinstance(teacher, ClassConditionalTeacher):
        conditioning = {"type": "class_label", "num_classes": int(teacher.num_classes)}
    elif isinstance(teacher, TextConditionalTeacher):
        conditioning = prompt_conditioning_record(teacher, module.device, float(module.settings.targets.cfg_scale))
    tokenizer = getattr(teacher, "tokenizer", None)
    defaults = module.settings.one_step_defaults()
    return {
        "network": network_record(module.student),
        "tokenizer": tokenizer_record(tokenizer) if tokenizer is not None else None,
        "conditioning": conditioning,
        "emb_noise_scale": float(module.emb_noise_scale),
        "sampling": {"r_init": defaults["r_init"], "emb_noise_sigma": defaults["emb_noise_sigma"],
                     "emb_noise_scale": float(module.emb_noise_scale), "temperature": defaults["temperature"],
                     "top_k": defaults["top_k"], "top_p": defaults["top_p"]},
    }


# ---- export -----------------------------------------------------------------------------------------------------
def read_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint as a dict (weights-only, memory-mapped when possible); clear errors for bad files."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (--ckpt_path)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # truncated, foreign or pickled-object files all end here
        raise ValueError(f"cannot read the checkpoint {path} (--ckpt_path): {str(err).splitlines()[0]}") from err
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} (--ckpt_path) is not a Lightning checkpoint (no 'state_dict')")
    return dict(checkpoint)


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):].replace("_orig_mod.", "")  # torch.compile wraps modules as `_orig_mod`


def student_weights(checkpoint: Mapping[str, Any], ema: bool | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The student's state dict from a DiMOModule checkpoint -> (weights, "ema" or "student").

    Args:
        checkpoint: the loaded checkpoint.
        ema: True: the StudentEMA average (an error if absent); False: the raw student; None: the EMA when present.
    """
    raw = {_strip(k, "student."): v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")}
    if not raw:
        raise ValueError("the checkpoint holds no 'student.*' weights: it was not written by DiMOModule")
    # StudentEMA keeps its average as the module's `student_ema` submodule (so it is sharded and checkpointed with
    # the model); checkpoints of older versions kept it in the callback state.
    in_model = {_strip(k, "student_ema."): v for k, v in checkpoint["state_dict"].items()
                if k.startswith("student_ema.")}
    averages = [in_model] if in_model else [
        state["weights"] for name, state in (checkpoint.get("callbacks") or {}).items()
        if str(name).startswith("StudentEMA") and isinstance(state, Mapping) and state.get("weights") is not None
    ]
    if len(averages) > 1 and ema is not False:
        raise ValueError(f"the checkpoint holds {len(averages)} StudentEMA averages; keep one StudentEMA callback")
    if ema is True and not averages:
        raise ValueError("--ema true, but the checkpoint has no StudentEMA weights (train with the StudentEMA "
                         "callback, or export the raw student with --ema false)")
    if averages and ema is not False:
        weights = {k.replace("_orig_mod.", ""): v for k, v in averages[0].items()}
        if set(weights) != set(raw):
            raise ValueError("the StudentEMA weights do not have the student's keys; the checkpoint is inconsistent")
        return weights, "ema"
    return raw, "student"


def export_sampling(records: Mapping[str, Any], hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The one-step sampling settings of an export: the checkpoint's export record, or for a checkpoint written
    before the record carried them, :func:`sampling_defaults` of its hyperparameters."""
    if isinstance(records.get("sampling"), Mapping):
        return dict(records["sampling"])
    return sampling_defaults(hparams, records.get("emb_noise_scale", 1.0))


def sampling_defaults(hparams: Mapping[str, Any], emb_noise_scale: float) -> dict[str, Any]:
    """The one-step sampling settings of a checkpoint written before the settings groups, from its flat
    hyperparameters (``r_init``, ``sample_r_init``, ``sample_emb_noise_sigma``, ...), as DiMOModule.generate used
    them."""
    low, high = parse_range(hparams.get("r_init", 0.6), "r_init")
    r_init = hparams.get("sample_r_init")
    sigma = hparams.get("sample_emb_noise_sigma")
    return {
        "r_init": float(r_init) if r_init is not None else (low + high) / 2,
        "emb_noise_sigma": float(sigma) if sigma is not None else float(hparams.get("emb_noise_sigma", 0.1)),
        "emb_noise_scale": float(emb_noise_scale),
        "temperature": float(hparams.get("sample_temperature", 1.0)),
        "top_k": int(hparams.get("student_top_k", 0)),
        "top_p": float(hparams.get("student_top_p", 0.0)),
    }


def export_student(ckpt_path: str | Path, output: str | Path, ema: bool | None = None,
                   format: Literal["dimo", "diffusers"] = "dimo") -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``tokenizer.safetensors``) of a checkpoint's student, or with
    ``format="diffusers"`` its ``transformer/`` folder (see :func:`export_diffusers_transformer`).

    Args:
        ckpt_path: a DiMOModule Lightning checkpoint (``last.ckpt``). FSDP sharded checkpoints must first be
            consolidated (``python -m lightning.pytorch.utilities.consolidate_checkpoint DIR``).
        output: the folder to write (created; existing export files are overwritten).
        ema: see :func:`student_weights`.
        format: "dimo" (Lightning-free :func:`load_student`) or "diffusers" (Meissonic / aMUSEd students).

    Returns:
        The output folder.
    """
    if format not in ("dimo", "diffusers"):
        raise ValueError(f"--format must be dimo or diffusers, got {format!r}")
    checkpoint = read_checkpoint(ckpt_path)
    records = (checkpoint.get("dimo") or {}).get("export")
    if not isinstance(records, Mapping):
        raise ValueError(f"{ckpt_path} (--ckpt_path) has no export record: it was written by an older dimo-lightning"
                         " (re-save it by resuming for one step) or not by DiMOModule")
    if format == "diffusers":
        return export_diffusers_transformer(checkpoint, records, ckpt_path, output, ema)
    for name, why in (("network", "its network has no `config` with its constructor arguments"),
                      ("tokenizer", "its tokenizer has no `export_record()`"),
                      ("conditioning", "only class-conditional and prompt (text-to-image) students can be "
                                       "exported")):
        if records.get(name) is None:
            hint = "; text-to-image (Meissonic / aMUSEd) students export with --format diffusers" if (
                name != "network") else ""
            raise ValueError(f"cannot export {ckpt_path}: {why}{hint}")
    weights, source = student_weights(checkpoint, ema)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt", "source": source})

    conditioning = records["conditioning"]
    if conditioning.get("type") == "prompt":  # the text encoder and its tokenizer travel with the student

        teacher_args = (hparams.get("teacher") or {}).get("init_args") if isinstance(hparams.get("teacher"),
                                                                                     Mapping) else None
        variant = teacher_args.get("variant") if isinstance(teacher_args, Mapping) else None
        conditioning = export_prompt_conditioning(conditioning, records["network"], out, ckpt_path, variant)
    tokenizer = dict(records["tokenizer"])
    tensors = tokenizer.pop("tensors", None)
    if tensors:  # small tokenizers travel with the student
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / TOKENIZER_FILE))
        tokenizer["file"] = TOKENIZER_FILE
    teacher = hparams.get("teacher")
    config = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "weights": WEIGHTS_FILE,
        "weights_source": source,
        "key_layout": "maskgit-v1.0" if records["network"]["class_path"] == MASKGIT_NETWORK else "native",
        "network": records["network"],
        "conditioning": conditioning,
        "tokenizer": tokenizer,
        "sampling": export_sampling(records, hparams),
        "teacher": teacher if isinstance(teacher, Mapping) else None,
        "generator_step": int((checkpoint.get("dimo") or {}).get("generator_step", 0)),
        "checkpoint": str(Path(ckpt_path).resolve()),
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


DIFFUSERS_SUBFOLDER = "transformer"
DIFFUSERS_RECORD_FILE = "dimo_student.json"


def export_diffusers_transformer(checkpoint: Mapping[str, Any], records: Mapping[str, Any], ckpt_path: str | Path,
                                 output: str | Path, ema: bool | None = None) -> Path:
    """The student as a diffusers-style ``OUTPUT/transformer/`` folder, as the official Meissonic distillation saves it:
    ``config.json`` + ``diffusion_pytorch_model.safetensors`` in the released layout, so ``MeissonicTeacher(path,
    transformer=OUTPUT/transformer)`` (or ``AmusedTeacher``, or the Meissonic / aMUSEd pipelines with the rest of
    the released folder) load it. ``OUTPUT/dimo_student.json`` records the one-step sampling defaults and the source.

    The network must be one with ``from_config`` and ``save_pretrained`` (MeissonicTransformer, AmusedTransformer).
    """

    network_info = records.get("network")
    if network_info is None:
        raise ValueError(f"cannot export {ckpt_path}: its network has no `config` with its constructor arguments")
    network_class = import_class(network_info["class_path"])
    if not (hasattr(network_class, "from_config") and hasattr(network_class, "save_pretrained")):
        raise ValueError(f"--format diffusers exports Meissonic / aMUSEd students; {ckpt_path} holds a "
                         f"{network_info['class_path']} (use --format dimo)")
    weights, source = student_weights(checkpoint, ema)
    with torch.device("meta"):  # every tensor comes from the checkpoint
        network = network_class.from_config(dict(network_info["init_args"]))
    load_state_dict_checked(network, weights, str(ckpt_path), hint="the checkpoint's network record disagrees with "
                            "its weights")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    network.save_pretrained(out / DIFFUSERS_SUBFOLDER)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    teacher = hparams.get("teacher")
    record = {
        "format": "dimo-student-diffusers",
        "transformer": DIFFUSERS_SUBFOLDER,
        "weights_source": source,
        "network_class": network_info["class_path"],
        "sampling": export_sampling(records, hparams),
        "teacher": teacher if isinstance(teacher, Mapping) else None,
        "generator_step": int((checkpoint.get("dimo") or {}).get("generator_step", 0)),
        "checkpoint": str(Path(ckpt_path).resolve()),
    }
    (out / DIFFUSERS_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out


# ---- loading and sampling without Lightning ----------------------------------------------------------------------
def build_tokenizer(record: Mapping[str, Any], directory: Path) -> nn.Module:
    """Rebuild a tokenizer from its config.json entry (copied tensors are read from ``directory``)."""
    tokenizer_class = import_class(record["class_path"])
    kwargs = dict(record.get("init_args") or {})
    if record.get("file"):
        path = directory / record["file"]
        try:
            kwargs.update(load_file(str(path)))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read the tokenizer file {path}: {err}") from err
    factory = getattr(tokenizer_class, record["factory"]) if record.get("factory") else tokenizer_class
    return factory(**kwargs)


def read_export_config(directory: str | Path) -> dict[str, Any]:
    """``config.json`` of an export folder, checked."""
    folder = Path(directory)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"not an exported student: {config_path} is missing (write it with `dimo export`)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{config_path} is not a dimo student config (format {EXPORT_FORMAT!r})")
    if config.get("version", 0) > EXPORT_VERSION:
        raise ValueError(f"{config_path} has format version {config['version']}; this dimo-lightning reads "
                         f"<= {EXPORT_VERSION}")
    return config


def load_student(directory: str | Path, device: str | torch.device = "cpu") -> OneStepSampler:
    """A ready :class:`OneStepSampler` from a ``dimo export`` folder (no Lightning import)."""

    folder = Path(directory)
    config = read_export_config(folder)
    network_class = import_class(config["network"]["class_path"])
    with torch.device("meta"):  # no random init: every tensor comes from the file
        network = network_class(**config["network"]["init_args"])
    weights_path = folder / config["weights"]
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read the student weights {weights_path}: {err}") from err
    load_state_dict_checked(network, state, str(weights_path), hint=f"Is {folder / CONFIG_FILE} its config?")
    tokenizer = build_tokenizer(config["tokenizer"], folder)
    if getattr(tokenizer, "codebook_size", getattr(tokenizer, "n_embed", None)) not in (None, network.codebook_size):
        raise ValueError(f"the tokenizer of {folder} has a codebook of a different size than the student's "
                         f"({network.codebook_size} codes)")
    conditioning = config["conditioning"]
    if conditioning.get("type") == "prompt":

        text_encoder, text_tokenizer = load_prompt_encoder(conditioning, folder)
        return PromptSampler(network, tokenizer, text_encoder, text_tokenizer, conditioning,
                             config["sampling"]).to(device)
    sampler = OneStepSampler(network, tokenizer, int(conditioning["num_classes"]), config["sampling"])
    return sampler.to(device)


# ---- `dimo export` and `dimo sample` ------------------------------------------------------------------------------
def export_command(ckpt_path: str, output: str, ema: bool | None = None,
                   format: Literal["dimo", "diffusers"] = "dimo") -> None:
    """Export the student of a DiMOModule checkpoint for Lightning-free sampling.

    Args:
        ckpt_path: the Lightning checkpoint (e.g. runs/mnist_dimo/version_0/checkpoints/last.ckpt).
        output: folder for model.safetensors, config.json (and tokenizer.safetensors; text_encoder/ and
            text_tokenizer/ for a text-to-image student).
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
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"--num and --batch_size must be >= 1, got {num} and {batch_size}")
    if prompts is not None and prompt is not None:
        raise ValueError("give --prompts FILE or --prompt TEXT, not both")
    sampler = load_student(student, device)
    text_student = sampler.conditioning_type == "prompt"
    if text_student:
        if labels is not None:
            raise ValueError(f"--labels: {student} is a text-to-image student; give --prompts FILE or --prompt TEXT")
        if prompts is None and prompt is None:
            raise ValueError(f"{student} is a text-to-image student: give --prompts FILE or --prompt TEXT")
        requested = [prompt] if prompt is not None else read_prompt_source(prompts)
    else:
        if prompts is not None or prompt is not None:
            flag = "--prompts" if prompts is not None else "--prompt"
            raise ValueError(f"{flag}: {student} is a class-conditional student ({sampler.num_classes} classes); "
                             "give --labels")
        requested = parse_labels("0" if labels is None else labels)
        sampler.check_labels(torch.tensor(requested), flag="--labels")
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
        images = sampler(batch if text_student else torch.tensor(batch), seed=seed + i,
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


GRID_MAX_ROWS = 32  # grid.png of a prompt file shows its first prompts only (grid.txt lists them)


def read_prompt_source(source: str) -> list[str]:
    """The prompts of ``--prompts``: a .txt / .jsonl file or a ``package.module:function`` (the formats of
    ``PromptDataModule``; its reader is imported only here, as it lives next to a LightningDataModule)."""

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
