"""What a DiMOModule checkpoint holds besides Lightning's own state, in one place.

* The teacher is re-loaded from its own source, never from a checkpoint: its keys are dropped from every state dict
  (:func:`drop_teacher_keys`, a state-dict post hook, so FSDP's distributed checkpoints leave them out too), from the
  checkpoint Lightning saves (:func:`save_state`), and from the missing keys of a load (:func:`without_teacher`).
* ``checkpoint["dimo"]``: the counters (generator step, iteration, skipped steps, discriminator steps) and the export
  record (:func:`save_state`, :func:`restore_state`).
* ``run.student_init``: the student / aux / EMA weights of a trained Di[M]O checkpoint (:func:`load_student_init`).
* Checkpoints written before the settings groups (flat hyperparameters such as ``aux_rounds``, the class path
  of the DiMOModule in its former top-level ``module`` file): :func:`migrate_hparams` maps them through
  :data:`~dimo_lightning.training.settings.LEGACY_KEYS`, so ``load_from_checkpoint`` rebuilds them
  (:func:`migrated_checkpoint`), ``--ckpt_path`` resumes them and ``dimo export`` exports them.
"""

from __future__ import annotations

import copy
import io
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from dimo_lightning.inference.export import checkpoint_records
from dimo_lightning.training.config_checks import check_teacher_unchanged
from dimo_lightning.training.settings import GROUPS, LEGACY_KEYS

TEACHER_PREFIX = "teacher."
MODULE_CLASS_PATH = "dimo_lightning.training.module.DiMOModule"
# Where DiMOModule lived in earlier versions.
LEGACY_CLASS_PATHS = {"dimo_lightning.module.DiMOModule": MODULE_CLASS_PATH}


# ---- the teacher stays out ---------------------------------------------------------------------------------------
def drop_teacher_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict post hook: remove the teacher's weights."""
    for key in [k for k in state_dict if k.startswith(prefix + TEACHER_PREFIX)]:
        del state_dict[key]


def without_teacher(keys: list[str]) -> list[str]:
    """``keys`` without the teacher's (missing from every checkpoint by design)."""
    return [k for k in keys if not k.startswith(TEACHER_PREFIX)]


# ---- counters and records ----------------------------------------------------------------------------------------
def save_state(module: Any, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint``: drop the teacher's weights; record the counters and the export record."""
    state = checkpoint["state_dict"]
    for key in [k for k in state if k.startswith(TEACHER_PREFIX)]:
        del state[key]
    checkpoint["dimo"] = {
        "generator_step": module.generator_step,
        "iteration": module.iteration,
        "skipped_steps": module.skipped_steps,
        "disc_step": module.disc_step,
        "export": checkpoint_records(module),  # what `dimo export` needs besides the weights
    }


def restore_state(module: Any, checkpoint: dict[str, Any]) -> None:
    """``on_load_checkpoint``: check the teacher, restore the counters, fill in an absent EMA and refuse a
    checkpoint that lacks student / aux / discriminator weights."""
    saved_teacher = (checkpoint.get("hyper_parameters") or {}).get("teacher")
    check_teacher_unchanged(saved_teacher, module.hparams.get("teacher"), "being loaded",
                            module.settings.run.allow_teacher_change)
    counters = checkpoint.get("dimo", {})
    for name in ("generator_step", "iteration", "skipped_steps", "disc_step"):
        setattr(module, name, int(counters.get(name, 0)))
    if "state_dict" not in checkpoint:
        return  # a distributed (DCP) checkpoint: the strategy has loaded (and checked) the weights already
    state = checkpoint["state_dict"]
    if not hasattr(module, "student_ema") and any(k.startswith("student_ema.") for k in state):
        # Rebuilt outside a trainer with a StudentEMA (load_from_checkpoint): keep the checkpoint's average as the
        # `student_ema` submodule that StudentEMA would have attached, rather than dropping it.
        module.add_module("student_ema", copy.deepcopy(module.student).eval().requires_grad_(False))
    for key in [k for k in module.state_dict() if k.startswith("student_ema.") and k not in state]:
        # Written without a StudentEMA (or by an older version that kept it in the callback state): the average
        # starts from the resumed student.
        source = "student." + key.removeprefix("student_ema.")
        if source in state:
            state[key] = state[source]
    missing = [k for k in without_teacher(list(module.state_dict())) if k not in state]
    if missing:
        raise ValueError(
            f"checkpoint lacks {len(missing)} student/aux weights (e.g. {', '.join(missing[:5])}); "
            "it was not written by this DiMOModule configuration"
            + ("; to add the GAN to a trained Di[M]O run, start from it with --model.init_args.run.student_init="
               "CKPT instead of --ckpt_path" if any(k.startswith("discriminator.") for k in missing) else "")
        )


# ---- run.student_init ----------------------------------------------------------------------------------------------
def student_init_state(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any] | None]:
    """The networks of a Di[M]O checkpoint: ``({"student": sd, "aux": sd or absent, "student_ema": sd or absent},
    its recorded teacher)``. Read with ``weights_only=True``: a Lightning checkpoint holds plain types only.

    Raises:
        FileNotFoundError / ValueError naming the file (and the ``run.student_init`` flag).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run.student_init: checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is no checkpoint
        raise ValueError(f"run.student_init: {path} is not a readable Lightning checkpoint "
                         f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err
    state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"run.student_init: {path} has no state_dict (a DiMOModule Lightning checkpoint is "
                         "expected)")
    networks: dict[str, dict[str, torch.Tensor]] = {}
    for name in ("student", "aux", "student_ema"):
        prefix = name + "."
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if weights:
            networks[name] = weights
    if "student" not in networks:
        raise ValueError(f"run.student_init: {path} holds no student.* weights (not a DiMOModule checkpoint)")
    teacher = (checkpoint.get("hyper_parameters") or {}).get("teacher")
    return networks, teacher


def load_student_init(module: Any, path: str) -> None:
    """Copy student, aux and EMA weights of a trained Di[M]O checkpoint into ``module`` (``run.student_init``).

    The EMA (``student_ema``, present once StudentEMA has set up) takes the checkpoint's average, else its student;
    the aux model keeps the teacher's copy if the checkpoint has none. The teacher must match the checkpoint's
    (unless ``run.allow_teacher_change``).
    """
    networks, saved_teacher = student_init_state(path)
    check_teacher_unchanged(saved_teacher, module.hparams.get("teacher"), f"{path} (run.student_init)",
                            module.settings.run.allow_teacher_change)
    targets = {"student": module.student, "aux": module.aux, "student_ema": getattr(module, "student_ema", None)}
    sources = {"student": "student", "aux": "aux" if "aux" in networks else None,
               "student_ema": "student_ema" if "student_ema" in networks else "student"}
    for name, network in targets.items():
        if network is None or sources[name] is None:
            continue
        try:
            network.load_state_dict(networks[sources[name]])
        except RuntimeError as err:
            raise ValueError(f"run.student_init: the {sources[name]} weights of {path} do not fit this teacher's "
                             f"network: {str(err).splitlines()[0]}") from err


# ---- checkpoints written before the settings groups ----------------------------------------------------------------
def needs_migration(hparams: Mapping[str, Any]) -> bool:
    """Whether ``hparams`` (a checkpoint's hyperparameters) use flat keys or an old class path."""
    return any(key in hparams for key in LEGACY_KEYS) or hparams.get("_class_path") in LEGACY_CLASS_PATHS


def migrate_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters of a checkpoint written before the settings groups, in the groups' layout.

    Each flat key moves to its group (:data:`~dimo_lightning.training.settings.LEGACY_KEYS`; ``teacher_sampling``
    becomes ``sampling.teacher``), an old class path becomes the current one, and everything else (the teacher
    record, ``gan``, the CLI's ``_instantiator``) is kept. Hyperparameters already in groups come back unchanged.
    """
    migrated = {k: v for k, v in hparams.items() if k not in LEGACY_KEYS}
    if migrated.get("_class_path") in LEGACY_CLASS_PATHS:
        migrated["_class_path"] = LEGACY_CLASS_PATHS[migrated["_class_path"]]
    for key, place in LEGACY_KEYS.items():
        if key not in hparams:
            continue
        group, name = place.split(".")
        target = migrated.get(group)
        target = dict(target) if isinstance(target, Mapping) else {}
        target.setdefault(name, hparams[key])  # a value already in the group wins over a leftover flat one
        migrated[group] = target
    return {k: migrated[k] for k in _ordered(migrated)}


def _ordered(hparams: Mapping[str, Any]) -> list[str]:
    groups = [g for g in GROUPS if g in hparams]
    return [k for k in hparams if k not in GROUPS] + groups


def migrated_checkpoint(checkpoint_path: str | Path | IO) -> str | Path | IO:
    """``checkpoint_path`` for ``load_from_checkpoint``: itself, or, for a checkpoint with flat hyperparameters, an
    in-memory copy whose hyperparameters are migrated (the file is left alone)."""
    if not isinstance(checkpoint_path, (str, Path)) or not Path(checkpoint_path).is_file():
        return checkpoint_path  # file-like objects, remote URLs: Lightning reads them as they are
    path = Path(checkpoint_path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception:  # not plain (or not a checkpoint): Lightning's own loading reports it
        return checkpoint_path
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    if not isinstance(hparams, Mapping) or not needs_migration(hparams):
        return checkpoint_path
    checkpoint["hyper_parameters"] = migrate_hparams(hparams)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return buffer
