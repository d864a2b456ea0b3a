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
  text encoder and its tokenizer (see :mod:`dimo_lightning.inference.prompt_export`);
* a text student (a sequence teacher's) has its own folder: ``network/`` in the released MDLM / LLaDA layout and
  ``tokenizer/`` (see :mod:`dimo_lightning.inference.text_export`).

:func:`load_student` rebuilds a ready :class:`~dimo_lightning.inference.pipeline.OneStepPipeline` from such a
folder (with a :class:`~dimo_lightning.inference.pipeline.LabelConditioner`, or a
:class:`~dimo_lightning.inference.prompt_export.PromptConditioner` for prompt students). This module imports torch,
safetensors and the network/tokenizer classes only: never Lightning (checked by a test through ``sys.modules``).
The commands ``dimo export`` and ``dimo sample`` live in :mod:`dimo_lightning.commands.export` and
:mod:`dimo_lightning.commands.sample`.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from dimo_lightning.core.weight_files import load_state_dict_checked, save_safetensors
from dimo_lightning.inference.pipeline import LabelConditioner, OneStepPipeline, SamplingDefaults
from dimo_lightning.inference.prompt_export import (
    PromptConditioner,
    export_prompt_conditioning,
    load_prompt_encoder,
    prompt_conditioning_record,
)
from dimo_lightning.inference.text_export import (
    export_text_student,
    is_text_record,
    load_text_student,
    text_checkpoint_records,
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
    if getattr(teacher, "modality", "image") == "text":  # sequence teachers: inference.text_export
        return text_checkpoint_records(module)
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
    before the record carried them, the defaults read from its flat hyperparameters."""
    if isinstance(records.get("sampling"), Mapping):
        return dict(records["sampling"])
    return SamplingDefaults.from_hparams(hparams, records.get("emb_noise_scale", 1.0)).to_dict()


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
    if is_text_record(records):
        if format != "dimo":
            raise ValueError(f"{ckpt_path} holds a text student: it exports with --format dimo (its network folder is "
                             "in the released MDLM / LLaDA layout)")
        return _export_text(checkpoint, records, ckpt_path, output, ema)
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
    save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, out / WEIGHTS_FILE,
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
        save_safetensors({k: v.contiguous() for k, v in tensors.items()}, out / TOKENIZER_FILE)
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


def _export_text(checkpoint: Mapping[str, Any], records: Mapping[str, Any], ckpt_path: str | Path,
                 output: str | Path, ema: bool | None) -> Path:
    """A text student's export (:mod:`dimo_lightning.inference.text_export`) with the entries every export has."""
    weights, source = student_weights(checkpoint, ema)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    teacher = hparams.get("teacher")
    common = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "weights_source": source,
        "sampling": export_sampling(records, hparams),
        "teacher": teacher if isinstance(teacher, Mapping) else None,
        "generator_step": int((checkpoint.get("dimo") or {}).get("generator_step", 0)),
        "checkpoint": str(Path(ckpt_path).resolve()),
    }
    return export_text_student(records, weights, output, ckpt_path, common)


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


def load_student(directory: str | Path, device: str | torch.device = "cpu") -> OneStepPipeline:
    """A ready :class:`~dimo_lightning.inference.pipeline.OneStepPipeline` from a ``dimo export`` folder (no
    Lightning import): the student network, its conditioner (class labels, or prompts through the exported text
    encoder), its tokenizer and the exported sampling defaults. A text student gives a
    :class:`~dimo_lightning.inference.text_pipeline.TextPipeline`, whose call returns strings."""

    folder = Path(directory)
    config = read_export_config(folder)
    if config["conditioning"].get("type") == "text":  # a TextPipeline: its call returns strings
        return load_text_student(config, folder, device)
    network_class = import_class(config["network"]["class_path"])
    with torch.device("meta"):  # no random init: every tensor comes from the file
        network = network_class(**config["network"]["init_args"])
    weights_path = folder / config["weights"]
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read the student weights {weights_path}: {err}") from err
    load_state_dict_checked(network, state, str(weights_path), hint=f"Is {folder / CONFIG_FILE} its config?")
    network.eval().requires_grad_(False)
    tokenizer = build_tokenizer(config["tokenizer"], folder)
    if getattr(tokenizer, "codebook_size", getattr(tokenizer, "n_embed", None)) not in (None, network.codebook_size):
        raise ValueError(f"the tokenizer of {folder} has a codebook of a different size than the student's "
                         f"({network.codebook_size} codes)")
    conditioning = config["conditioning"]
    if conditioning.get("type") == "prompt":
        text_encoder, text_tokenizer = load_prompt_encoder(conditioning, folder)
        conditioner = PromptConditioner(tokenizer, text_encoder, text_tokenizer, conditioning,
                                        network.codebook_size, network.mask_id)
    else:
        conditioner = LabelConditioner(tokenizer, int(conditioning["num_classes"]), network.grid_size,
                                       network.codebook_size, network.mask_id)
    return OneStepPipeline(network, conditioner, SamplingDefaults.from_dict(config["sampling"])).to(device)
