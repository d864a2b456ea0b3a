"""The ``dimo`` command: a LightningCLI in subclass mode (model and data chosen by ``class_path`` in YAML).

    dimo fit --config configs/mnist/dimo.yaml
    dimo validate --config configs/mnist/dimo.yaml --ckpt_path runs/.../last.ckpt
    dimo predict --config configs/mnist/dimo.yaml --ckpt_path ...
    dimo fit --config configs/mnist/teacher.yaml        # pretrain the MNIST teacher
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
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
    DiMOCLI(args=args)


if __name__ == "__main__":
    main()
