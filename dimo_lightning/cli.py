"""The ``dimo`` command: a LightningCLI in subclass mode (model and data chosen by ``class_path`` in YAML).

    dimo fit --config configs/mnist/dimo.yaml
    dimo validate --config configs/mnist/dimo.yaml --ckpt_path runs/.../last.ckpt
    dimo predict --config configs/mnist/dimo.yaml --ckpt_path ...
    dimo fit --config configs/mnist/teacher.yaml        # pretrain the MNIST teacher
"""

from __future__ import annotations

import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI


class DiMOCLI(LightningCLI):
    """LightningCLI with the project's defaults: any LightningModule / LightningDataModule by ``class_path``,
    optimizers configured inside the modules (two of them for Di[M]O), and the seed applied before instantiation.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"} if _has_omegaconf() else {})
        super().__init__(pl.LightningModule, pl.LightningDataModule, *args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """Keep the given config when ``--ckpt_path`` is set, and say where it differs from the checkpoint.

        LightningCLI would overwrite the model's arguments with those saved in the checkpoint, silently dropping
        the command line: ``--model.init_args.max_generator_steps`` when extending a run, ``predict_with=teacher``
        for ``dimo predict``, sampling knobs for ``dimo validate``. Here the YAML and flags win, as they do for
        the trainer and the data.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return  # aliases such as "last", and missing files, are the trainer's to resolve and report
        try:
            # Only the hyperparameters are read here; the trainer loads the weights afterwards. Memory-mapping a
            # zip checkpoint (torch.save's format) keeps this from reading a multi-GB file twice.
            checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu",
                                    mmap=zipfile.is_zipfile(ckpt_path))
        except Exception as err:  # a truncated or foreign file: name it instead of a bare unpickling error
            raise SystemExit(f"dimo: cannot read the checkpoint {ckpt_path} (--ckpt_path): {err}") from err
        saved = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
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
    """``(name, checkpoint value, config value)`` for each plain-valued model argument that differs."""
    if not saved or init_args is None:
        return []
    plain = (bool, int, float, str, type(None), list, tuple)

    def comparable(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value  # YAML gives lists where Python saved tuples

    changed = []
    for key, old in saved.items():
        if key.startswith("_") or key not in init_args or not isinstance(old, plain):
            continue
        new = init_args[key]
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
    # Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates; nothing for a user to act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``dimo`` console script."""
    _filter_warnings()
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "encode":  # real images -> VQGAN codes (Soft-Di[M]O real data)
        from dimo_lightning.encode import main as encode_main

        return encode_main(argv[1:])
    DiMOCLI(args=args)


if __name__ == "__main__":
    main()
