"""The ``dimo`` command: a LightningCLI in subclass mode (model and data chosen by ``class_path`` in YAML).

    dimo fit --config configs/mnist/dimo.yaml
    dimo validate --config configs/mnist/dimo.yaml --ckpt_path runs/.../last.ckpt
    dimo predict --config configs/mnist/dimo.yaml --ckpt_path ...
    dimo fit --config configs/mnist/teacher.yaml        # pretrain the MNIST teacher
    dimo stats --reference mnist-val --extractor mnist-cnn --output ref.npz   # reference statistics
    dimo export --ckpt_path CKPT --output DIR           # the student for Lightning-free sampling
    dimo sample --student DIR --labels 0,1,2 --num 8 --output OUT

Commands outside LightningCLI (export, sample, ...) are plain typed functions listed in ``SUBCOMMANDS`` and parsed
by ``jsonargparse.auto_cli``: they never build a teacher. Errors that a user can fix (a bad path, a corrupt file, a
shape or vocabulary mismatch, an out-of-range label, an unknown key) print one ``dimo: error: ...`` line and exit
with status 2; ``--debug`` or ``DIMO_DEBUG=1`` keeps the full traceback.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import traceback
import warnings
import zipfile
from collections.abc import Iterator
from typing import Any

import jsonargparse
import lightning.pytorch as pl
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from dimo_lightning.training.checkpoint_io import UnreadableCheckpoint, check_checkpoint_file, read_checkpoint
from dimo_lightning.training.checkpoint_state import migrate_hparams
from dimo_lightning.training.progress import GeneratorStepProgressBar
from dimo_lightning.training.settings import GROUPS, group_fields, legacy_key_message

# `dimo <name> ...` for commands outside LightningCLI: name -> "module:function" (imported only when used). The
# function's typed signature and Google docstring become the command's flags and help.
SUBCOMMANDS: dict[str, str] = {
    "export": "dimo_lightning.commands.export:export_command",
    "sample": "dimo_lightning.commands.sample:sample_command",
    "stats": "dimo_lightning.commands.stats:stats",
}

# ``--ckpt_path`` values that Lightning resolves itself (``registry`` and ``registry:...`` too).
CKPT_ALIASES = ("last", "best", "hpc")
# The settings groups document their fields in attribute docstrings (training/settings.py): show them in --help.
if hasattr(jsonargparse, "set_parsing_settings"):
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
else:  # jsonargparse < 4.35
    jsonargparse.set_docstring_parse_options(attribute_docstrings=True)

# Exceptions that mean "the input is wrong", reported in one line; anything else keeps its traceback.
USER_ERRORS = (ValueError, OSError, ArgumentError, MisconfigurationException, KeyError)
ERROR_EXIT_STATUS = 2
# The parsed config of the running command, for naming the flag behind an error raised while building or running.
_PARSED: dict[str, Any] = {}


class DiMOCLI(LightningCLI):
    """LightningCLI with the project's defaults: any LightningModule / LightningDataModule by ``class_path``,
    optimizers configured inside the modules (two of them for Di[M]O), and the seed applied before instantiation.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = {"parser_mode": "omegaconf"} if _has_omegaconf() else {}
        # Parse errors raise (main() prints them as one line) instead of printing the usage and exiting.
        parser_kwargs["exit_on_error"] = False
        parser_kwargs["description"] = (
            "Di[M]O distillation with Lightning. Commands outside the trainer: "
            + ", ".join(f"dimo {name}" for name in SUBCOMMANDS) + " (each with --help)."
        )
        kwargs.setdefault("parser_kwargs", parser_kwargs)
        super().__init__(pl.LightningModule, pl.LightningDataModule, *args, **kwargs)

    def before_instantiate_classes(self) -> None:
        _PARSED["config"] = self.config  # for naming the flag behind an error raised from here on

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """Add the generator-step progress bar unless the bar is disabled or another one is configured.

        It is added to the trainer, not to the parsed config, so a saved ``config.yaml`` stays as written (and still
        works with ``--trainer.enable_progress_bar=false``).
        """
        from lightning.pytorch.callbacks import ProgressBar


        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config.get("trainer") or {}
        if trainer.get("enable_progress_bar") is not False and "callbacks" not in kwargs:
            callbacks = trainer.get("callbacks")
            callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
            if not any(isinstance(c, ProgressBar) for c in callbacks):
                kwargs["callbacks"] = [*callbacks, GeneratorStepProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """Keep the given config when ``--ckpt_path`` is set, and say where it differs from the checkpoint.

        LightningCLI would overwrite the model's arguments with those saved in the checkpoint, silently dropping
        the command line: ``--model.init_args.optim.max_generator_steps`` when extending a run,
        ``sampling.predict_with=teacher`` for ``dimo predict``, sampling knobs for ``dimo validate``. Here the YAML
        and flags win, as they do for the trainer and the data.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or str(ckpt_path) in CKPT_ALIASES or str(ckpt_path).startswith("registry") or (
            "://" in str(ckpt_path) and not str(ckpt_path).startswith("file://")
        ):
            return  # aliases such as "last", and remote files, are the trainer's to resolve and report
        # Checked here, before the teacher is built: a missing, empty, truncated or foreign file is named at once.
        # Only the hyperparameters are read; the trainer loads the weights afterwards. Memory-mapping a zip
        # checkpoint (torch.save's format) keeps this from reading a multi-GB file twice.
        zipped = zipfile.is_zipfile(check_checkpoint_file(ckpt_path))
        checkpoint = read_checkpoint(ckpt_path, weights_only=True, map_location="cpu", mmap=zipped)
        saved = checkpoint.get("hyper_parameters", {})
        model = self.config[subcommand].get("model")
        init_args = model.get("init_args") if model is not None and hasattr(model, "get") else None
        changed = differing_arguments(saved, init_args)
        if changed:
            lines = "".join(f"\n  {key}: {old!r} -> {new!r}" for key, old, new in changed)
            sys.stderr.write(
                f"dimo: {len(changed)} model argument(s) differ from those saved in {ckpt_path}; "
                f"using the config's:{lines}\n"
            )


def differing_arguments(saved: dict[str, Any], init_args: Any) -> list[tuple[str, Any, Any]]:
    """``(name, checkpoint value, config value)`` for each plain-valued model argument that differs; the settings
    groups compare field by field (``aux.rounds``), and a checkpoint with the flat arguments of an earlier version
    is read in the groups' layout."""
    if not saved or init_args is None:
        return []
    plain = (bool, int, float, str, type(None), list, tuple)

    def comparable(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value  # YAML gives lists where Python saved tuples

    def flat(arguments: Any) -> dict[str, Any]:
        arguments = dict(arguments.items()) if hasattr(arguments, "items") else {}
        grouped = group_fields({k: dict(v.items()) if hasattr(v, "items") else v for k, v in arguments.items()})
        return {**{k: v for k, v in arguments.items() if not k.startswith("_")}, **grouped}

    current = flat(init_args)
    grouped = any(key.split(".")[0] in GROUPS for key in current)  # a DiMOModule: read old flat checkpoints in groups
    changed = []
    for key, old in flat(migrate_hparams(saved) if grouped else saved).items():
        if key not in current or not isinstance(old, plain):
            continue
        new = current[key]
        if isinstance(new, plain) and comparable(new) != comparable(old):
            changed.append((key, old, new))
    return changed


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True


def _filter_warnings() -> None:
    # The frozen teacher (and the frozen tokenizer) stay in eval mode on purpose; Lightning >= 2.5.5 warns about
    # every module in eval mode at fit start.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    # CPU-only machines: the DataLoader worker hint is noise for a data-free (label-only) loader.
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # The label stream yields whole batches in-process (num_workers=0), so its __len__ is exact.
    warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")
    # The predict loader yields batches that carry their global indices (SampleWriter needs no sampler indices).
    warnings.filterwarnings("ignore", message=r".*Couldn't infer the batch indices.*")
    # Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates; nothing for a user to act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # main() hands LightningCLI the command line minus `--debug`; that is not the mistake this warning is about.
    warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python.*")
    # Lightning 2.6 warns (15 lines, at every periodic save) that a ModelCheckpoint with every_n_train_steps under
    # manual optimization saves the state after the optimizer steps, unless the module keeps a pre-step copy. For
    # DiMOModule that state is the one to keep: it steps its optimizers itself, the save comes after a whole
    # iteration (global_step counts both optimizers' steps, so every_n_train_steps lands on iteration boundaries),
    # and a resume continues from exactly there.
    warnings.filterwarnings(
        "ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps, but no "
        r"pre-optimization state was saved"
    )


def run_subcommand(name: str, args: list[str]) -> None:
    """Parse ``args`` against the signature of ``SUBCOMMANDS[name]`` and call it."""
    from jsonargparse import auto_cli

    module_name, _, function_name = SUBCOMMANDS[name].partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    auto_cli(function, args=args, as_positional=False, prog=f"dimo {name}", exit_on_error=False)


def _causes(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)


def _raised_in_jsonargparse(err: BaseException) -> bool:
    frames = list(traceback.walk_tb(err.__traceback__))
    return bool(frames) and f"{os.sep}jsonargparse{os.sep}" in frames[-1][0].f_code.co_filename


def root_cause(err: BaseException) -> BaseException:
    """The error to report. jsonargparse re-raises a constructor's error inside a long "Does not validate against
    any of the Union subtypes" message (``from`` the original): skip its wrappers down to the first exception
    raised elsewhere (which may itself wrap a lower-level one, e.g. a safetensors error, with a better message)."""
    chain = list(_causes(err))
    for cause in chain:
        if not _raised_in_jsonargparse(cause):
            return cause
    return chain[-1]


def _failing_class(err: BaseException) -> type | None:
    """The class whose ``__init__`` raised ``err`` (innermost frame with a ``self``), if any."""
    found = None
    for frame, _ in traceback.walk_tb(err.__traceback__):
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            found = type(frame.f_locals["self"])
    return found


def _config_items(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    items = config.items() if hasattr(config, "items") else []
    for key, value in items:
        yield f"{prefix}{key}", value
        if hasattr(value, "items"):
            yield from _config_items(value, f"{prefix}{key}.")


def _flag_for(err: BaseException, message: str, cli_config: Any) -> str | None:
    """The flag to blame: a config value quoted in the message (a path), else the class that failed to build."""
    if cli_config is None:
        return None
    subcommand = cli_config.get("subcommand") if hasattr(cli_config, "get") else None
    config = cli_config.get(subcommand) if subcommand else cli_config
    items = list(_config_items(config))
    quoted = [
        (message.index(value), f"--{key}") for key, value in items
        if isinstance(value, str) and len(value) > 2 and ("/" in value or "." in value) and value in message
        and not key.endswith("class_path") and not key.startswith("config")
    ]
    if quoted:
        return min(quoted)[1]  # the value the message names first is the one it is about
    failing = _failing_class(err)
    owner = None  # the config key of the class that raised, e.g. "data"
    if failing is not None:
        wanted = f"{failing.__module__}.{failing.__qualname__}"
        owner = next((key.removesuffix(".class_path") for key, value in items
                      if key.endswith("class_path") and value == wanted), None)
    # "batch_size must be ..." or "student.r_init must be ...": the message starts with the argument's name,
    # looked up first among the raising class's own arguments ("batch_size" of the DataModule, not of a callback)
    first = re.match(r"[A-Za-z_][\w.]*", message)
    if first:
        named = [key for key, _ in items if key.endswith(f".{first.group(0)}") and not key.endswith("class_path")]
        own = [key for key in named if owner is not None and key == f"{owner}.init_args.{first.group(0)}"]
        if own or named:
            return f"--{(own or named)[0]}"
    return f"--{owner}" if owner is not None else None


def _parse_error_message(err: BaseException) -> str | None:
    """One line for a jsonargparse parse error: the flag (from the nested "Parser key" messages) and the reason."""
    keys: list[str] = []
    owner = None
    for cause in _causes(err):
        text = str(cause)
        match = re.match(r'Parser key "([^"]+)"', text)
        if match and (not keys or keys[-1] != match.group(1)):
            keys.append(match.group(1))
        match = re.match(r"Problem with given class_path '([^']+)'", text)
        if match:
            owner = match.group(1)
    reason = " ".join(str(root_cause(err)).split())
    unknown = re.match(r"Option '([^']+)' is not accepted", reason) or re.match(
        r"unrecognized arguments: --([\w.]+)", reason)
    if unknown:
        if keys == ["model"]:  # a flat DiMOModule argument of an earlier version: name its group
            moved = legacy_key_message(unknown.group(1))
            if moved:
                return moved
        keys.append(unknown.group(1))
        reason = f"unknown option: {owner or 'the class'} has no argument {unknown.group(1)!r}"
    if not keys:
        return None
    return f"--{'.init_args.'.join(keys)}: {reason}"


def error_message(err: BaseException, cli_config: Any = None) -> str:
    """One line for a user error: the root cause's message, prefixed with the flag it concerns when known."""
    root = root_cause(err)
    if isinstance(err, ArgumentError):
        parsed = _parse_error_message(err)
        if parsed:
            return parsed
    message = " ".join(str(root.args[0] if isinstance(root, KeyError) and root.args else root).split())
    if isinstance(root, ArgumentError) or message.startswith("Problem with given class_path"):
        message = message.split(" Given value type:")[0]
    if re.search(r"(^|[\s(])--(model|data|trainer|ckpt_path|config|seed_everything)\b", message):
        return message  # the message names its flags already
    if isinstance(root, UnreadableCheckpoint):  # raised while reading the file --ckpt_path gave or resolved to
        return f"--ckpt_path: {message}"
    flag = _flag_for(root, message, cli_config)
    if flag:
        message = f"{flag}: {message}"
    return message


# `dimo` commands with sub-commands of their own (``dimo sweep run|worker|summary``): a module whose
# ``main(argv) -> exit code`` parses the rest of the command line.
EXTRA_COMMANDS = {
    "sweep": "dimo_lightning.commands.sweep",
    "bench": "dimo_lightning.commands.bench",
    "encode": "dimo_lightning.commands.encode",
}


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``dimo`` console script.

    ``dimo export|sample ...`` run the functions in ``SUBCOMMANDS``; everything else is a LightningCLI command. A
    user error ends with one ``dimo: error: ...`` line and exit status 2 (``--debug`` or ``DIMO_DEBUG=1``: the
    traceback instead).
    """
    _filter_warnings()
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("DIMO_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    _PARSED.clear()
    try:
        if not argv:
            commands = ", ".join(["fit", "validate", "test", "predict", *SUBCOMMANDS, *EXTRA_COMMANDS])
            raise ArgumentError(None, f"expected a command: {commands} (`dimo --help` describes them)")
        if argv[0] in EXTRA_COMMANDS:
            code = importlib.import_module(EXTRA_COMMANDS[argv[0]]).main(argv[1:])
            if isinstance(code, int) and code:  # an exit status (some commands return their record instead)
                raise SystemExit(code)
        elif argv[0] in SUBCOMMANDS:
            run_subcommand(argv[0], argv[1:])
        else:
            DiMOCLI(args=argv)
    except USER_ERRORS as err:
        if debug:
            raise
        sys.stderr.write(f"dimo: error: {error_message(err, _PARSED.get('config'))}\n")
        raise SystemExit(ERROR_EXIT_STATUS) from None


if __name__ == "__main__":
    main()
