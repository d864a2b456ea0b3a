"""Export and Lightning-free loading of *text* students: the sequence-teacher side of ``dimo export``.

A text student (distilled from a sequence teacher, ``teacher.modality == "text"``) is exported as a folder::

    DIR/config.json          format "dimo-student"; conditioning {"type": "text", seq_len, codebook_size, mask_id,
                             logit_width, prompts: "prefix"}; the network's layout; the sampling defaults; the teacher
    DIR/network/             the student in its released layout: MDLM (kuleshov-group/mdlm-owt: config.json +
                             model.safetensors, ``backbone.*``; loads with ``load_mdlm`` or as an MDLM teacher's
                             folder) or LLaDA (config.json + model.safetensors.index.json + one shard,
                             ``model.transformer.*``; loads with ``load_llada``)
    DIR/model.safetensors    instead of network/, for another network class with a ``config`` mapping of its
                             constructor arguments ("native": class path and arguments in config.json)
    DIR/tokenizer/           the teacher's tokenizer, written by ``save_pretrained``

The tokenizer is not in the Lightning checkpoint (the teacher never is): the checkpoint records the folder it was
loaded from and a fingerprint of its vocabulary, and ``dimo export`` reads it from there and checks the fingerprint.
:func:`load_text_student` rebuilds a :class:`~dimo_lightning.inference.text_pipeline.TextPipeline` whose call returns
strings. This module imports torch, safetensors, transformers and the network classes: never Lightning.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from dimo_lightning.core.weight_files import give_default_mode, load_state_dict_checked, save_safetensors
from dimo_lightning.core.weight_folders import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME
from dimo_lightning.inference.pipeline import SamplingDefaults
from dimo_lightning.inference.text_pipeline import TextConditioner, TextPipeline
from dimo_lightning.nn.llada import LLaDA, load_llada
from dimo_lightning.nn.mdlm import MDLM, load_mdlm
from dimo_lightning.teachers.base import import_class

TEXT_TOKENIZER_DIR = "tokenizer"
TEXT_NETWORK_DIR = "network"
NATIVE_WEIGHTS = "model.safetensors"
LLADA_SHARD = "model-00001-of-00001.safetensors"
RELEASED_LAYOUTS = ("mdlm", "llada")


# ---- the records written into every checkpoint of a text student --------------------------------------------------
def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def text_network_record(network: nn.Module) -> dict[str, Any] | None:
    """How to rebuild the student network: ``{"layout": "mdlm" | "llada", "config": ...}`` for the released
    networks, ``{"layout": "native", "class_path", "init_args"}`` for a network with a ``config`` mapping of its
    constructor arguments, None otherwise (the checkpoint cannot be exported)."""
    network = getattr(network, "_orig_mod", network)  # torch.compile
    if isinstance(network, MDLM):
        return {"layout": "mdlm", "config": {"model_type": "mdlm", **network.config.to_dict()}}
    if isinstance(network, LLaDA):
        return {"layout": "llada", "config": network.config.to_dict()}
    config = getattr(network, "config", None)
    if isinstance(config, Mapping):
        return {"layout": "native", "class_path": _class_path(network), "init_args": dict(config)}
    return None


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of a tokenizer's vocabulary (token -> id) and special tokens: equal for the same tokenizer
    loaded twice, different for another one. Computed once per tokenizer object."""
    try:
        return _FINGERPRINTS[tokenizer]
    except (KeyError, TypeError):
        pass
    vocabulary = sorted(tokenizer.get_vocab().items())
    special = sorted((str(k), str(v)) for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items())
    digest = hashlib.sha256(json.dumps([vocabulary, special]).encode()).hexdigest()[:16]
    try:
        _FINGERPRINTS[tokenizer] = digest
    except TypeError:  # not weak-referenceable: recomputed next time
        pass
    return digest


def text_tokenizer_record(tokenizer: Any) -> dict[str, Any]:
    """Where the teacher's tokenizer was loaded from (None when it was built in memory), its size and fingerprint."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    return {"source": str(folder.resolve()) if str(folder) and folder.is_dir() else None,
            "size": len(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer)}


def text_checkpoint_records(module: Any) -> dict[str, Any]:
    """The export records of a DiMOModule with a sequence teacher (``checkpoint["dimo"]["export"]``): the network,
    the tokenizer, the prefix conditioning, the embedding-noise scale and the one-step sampling defaults."""
    teacher = module.teacher
    network = text_network_record(module.student)
    return {
        "network": network,
        "tokenizer": text_tokenizer_record(teacher.text_tokenizer),
        "conditioning": {
            "type": "text",
            "seq_len": int(teacher.seq_len),
            "codebook_size": int(teacher.codebook_size),
            "mask_id": int(teacher.mask_id),
            "logit_width": int(teacher.logit_width),
            "prompts": "prefix",  # prompt ids at [0, n), fixed; unconditional: nothing fixed
            "teacher_class": _class_path(teacher),
        },
        "emb_noise_scale": float(module.emb_noise_scale),
        "sampling": module.sampling_defaults().to_dict(),  # the one-step sampling the module evaluates with
    }


def is_text_record(records: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's export records are a text student's."""
    return (records.get("conditioning") or {}).get("type") == "text"


# ---- export -------------------------------------------------------------------------------------------------------
def load_text_tokenizer(folder: str | Path) -> Any:
    """A Hugging Face tokenizer from a local folder (``AutoTokenizer``; ``PreTrainedTokenizerFast`` for a folder
    whose configuration names remote code, as LLaDA's)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, OSError, KeyError):
        return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def export_text_tokenizer(record: Mapping[str, Any], out: Path, ckpt_path: Any) -> dict[str, Any]:
    """Copy the teacher's tokenizer (read from the folder recorded at training, checked against its fingerprint)
    into ``out/tokenizer/``; return the ``tokenizer`` entry of config.json."""
    source = record.get("source")
    if source is None:
        raise ValueError(f"cannot export {ckpt_path}: its teacher's tokenizer was not loaded from a folder, so it "
                         "cannot be copied")
    if not Path(source).is_dir():
        raise FileNotFoundError(f"cannot export {ckpt_path}: the teacher's tokenizer folder {source} (recorded at "
                                "training) is gone; the export copies the tokenizer from there")
    tokenizer = load_text_tokenizer(source)
    if tokenizer_fingerprint(tokenizer) != record.get("fingerprint"):
        raise ValueError(f"the tokenizer in {source} is not the one the student of {ckpt_path} was trained with (its "
                         f"vocabulary differs: {len(tokenizer)} tokens, {record.get('size')} at training)")
    tokenizer.save_pretrained(str(out / TEXT_TOKENIZER_DIR))
    return {"folder": TEXT_TOKENIZER_DIR, "size": len(tokenizer), "fingerprint": record["fingerprint"],
            "source": source}


def export_text_network(record: Mapping[str, Any], weights: Mapping[str, torch.Tensor], out: Path) -> dict[str, Any]:
    """Write the student network (released layout under ``out/network/``, or ``out/model.safetensors``); return
    the ``network`` entry of config.json."""
    weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    dtype = str(next(iter(weights.values())).dtype).removeprefix("torch.") if weights else "float32"
    layout = record["layout"]
    if layout == "native":
        save_safetensors(weights, out / NATIVE_WEIGHTS, metadata={"format": "pt"})
        return {"layout": "native", "class_path": record["class_path"], "init_args": record["init_args"],
                "weights": NATIVE_WEIGHTS, "dtype": dtype}
    folder = out / TEXT_NETWORK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(record["config"], indent=2) + "\n")
    if layout == "mdlm":
        save_safetensors(weights, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    elif layout == "llada":  # the released layout is sharded behind an index: one shard here
        save_safetensors(weights, folder / LLADA_SHARD, metadata={"format": "pt"})
        total = sum(t.numel() * t.element_size() for t in weights.values())
        index = {"metadata": {"total_size": total}, "weight_map": {k: LLADA_SHARD for k in sorted(weights)}}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    else:
        raise ValueError(f"unknown text network layout {layout!r} (expected one of {RELEASED_LAYOUTS} or native)")
    give_default_mode(folder.glob("*.safetensors"))
    return {"layout": layout, "folder": TEXT_NETWORK_DIR, "dtype": dtype}


def export_text_student(records: Mapping[str, Any], weights: Mapping[str, torch.Tensor], output: str | Path,
                        ckpt_path: Any, common: Mapping[str, Any]) -> Path:
    """Write a text student's export folder (module docstring).

    Args:
        records: the checkpoint's export records (:func:`text_checkpoint_records`).
        weights: the student's (or its EMA's) state dict.
        output: the folder to write.
        ckpt_path: the checkpoint, for messages.
        common: the config.json entries every export has (format, version, weights_source, sampling, teacher,
            generator_step, checkpoint).
    """
    if records.get("network") is None:
        raise ValueError(f"cannot export {ckpt_path}: its network is neither MDLM nor LLaDA and has no `config` "
                         "with its constructor arguments")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = export_text_tokenizer(records["tokenizer"], out, ckpt_path)
    network = export_text_network(records["network"], weights, out)
    config = {**common, "network": network, "conditioning": dict(records["conditioning"]), "tokenizer": tokenizer}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


# ---- loading ------------------------------------------------------------------------------------------------------
def load_text_network(entry: Mapping[str, Any], folder: Path, tokenizer: Any) -> nn.Module:
    """The student network of a text export (eval mode, no gradients), in the dtype it was exported in."""
    dtype = getattr(torch, str(entry.get("dtype", "float32")))
    layout = entry["layout"]
    if layout == "mdlm":
        network = load_mdlm(folder / entry["folder"], tokenizer, dtype=dtype)
    elif layout == "llada":
        network = load_llada(folder / entry["folder"], tokenizer, dtype=dtype)
    elif layout == "native":
        network_class = import_class(entry["class_path"])
        with torch.device("meta"):
            network = network_class(**entry["init_args"])
        path = folder / entry["weights"]
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read the student weights {path}: {err}") from err
        load_state_dict_checked(network, state, str(path), hint=f"Is {folder / 'config.json'} its config?")
    else:
        raise ValueError(f"{folder / 'config.json'}: unknown network layout {layout!r}")
    return network.eval().requires_grad_(False)


def load_text_student(config: Mapping[str, Any], folder: str | Path,
                      device: str | torch.device = "cpu") -> TextPipeline:
    """A ready :class:`~dimo_lightning.inference.text_pipeline.TextPipeline` from a text export's folder and its
    parsed config.json."""
    folder = Path(folder)
    tokenizer_folder = folder / config["tokenizer"]["folder"]
    if not tokenizer_folder.is_dir():
        raise FileNotFoundError(f"not a complete text-student export: {tokenizer_folder} is missing (write it with "
                                "`dimo export`)")
    tokenizer = load_text_tokenizer(tokenizer_folder)
    network = load_text_network(config["network"], folder, tokenizer)
    conditioning = config["conditioning"]
    conditioner = TextConditioner(tokenizer, int(conditioning["seq_len"]), int(conditioning["codebook_size"]),
                                  int(conditioning["mask_id"]))
    return TextPipeline(network, conditioner, SamplingDefaults.from_dict(config["sampling"])).to(device)

