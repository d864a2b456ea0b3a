"""AtomicCheckpointIO: a failed save leaves the previous checkpoint intact and no temporary file behind; a file that
cannot be restored from is named with what is wrong with it."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dimo_lightning.commands.cli import error_message
from dimo_lightning.training.checkpoint_io import AtomicCheckpointIO, UnreadableCheckpoint, read_checkpoint

LIGHTNING = {"pytorch-lightning_version": "2.6.0", "state_dict": {}}  # what Lightning reads from any checkpoint


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({**LIGHTNING, "step": 1, "weights": torch.arange(3)}, path)
    assert io.load_checkpoint(path)["step"] == 1

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full halfway")  # torch.save fails after writing part of the file

    with pytest.raises(RuntimeError, match="halfway"):
        io.save_checkpoint({**LIGHTNING, "step": 2, "weights": torch.arange(1000), "bad": Unpicklable()}, path)
    assert io.load_checkpoint(path)["step"] == 1  # the old file, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    io.save_checkpoint({**LIGHTNING, "step": 3}, str(path))
    assert io.load_checkpoint(path)["step"] == 3


def bad_checkpoints(folder):
    """name -> (file, words its error must contain): the files a user may pass by mistake."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good.ckpt"
    torch.save({**LIGHTNING, "weights": torch.arange(10_000)}, good)
    files = {
        "empty": (b"", ["empty"]),
        "text": (b"a text file\n", ["not a checkpoint"]),  # weights-only unpickling: "pop from empty list"
        "digit": (b"0\n", ["not a checkpoint"]),
        "truncated": (good.read_bytes()[:2000], ["truncated"]),
        "tensor": (None, ["Tensor", "not a Lightning checkpoint"]),
        "weights": (None, ["not a Lightning checkpoint", "pytorch-lightning_version"]),
    }
    out = {}
    for name, (content, words) in files.items():
        path = folder / f"{name}.ckpt"
        if name == "tensor":
            torch.save(torch.zeros(3), path)
        elif name == "weights":
            torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
        else:
            path.write_bytes(content)
        out[name] = (path, words)
    out["missing"] = (folder / "missing.ckpt", ["not found"])
    out["folder"] = (folder, ["not a checkpoint file"])
    return out


def test_unreadable_checkpoints_name_the_file_and_the_problem(tmp_path):
    io = AtomicCheckpointIO()
    for name, (path, words) in bad_checkpoints(tmp_path / "bad").items():
        for load in (lambda p: read_checkpoint(p, weights_only=True), io.load_checkpoint):
            with pytest.raises(UnreadableCheckpoint) as excinfo:
                load(path)
            message = str(excinfo.value)
            assert str(path) in message and all(word in message for word in words), (name, message)
            assert "pop from empty list" not in message
            assert error_message(excinfo.value).startswith("--ckpt_path: "), name


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx) -> None:
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_truncated_last_checkpoint_is_named_when_resolved_by_lightning(tmp_path):
    """``ckpt_path="last"`` is resolved by Lightning to the folder's last.ckpt; the plugin names that file."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(2, 2)), batch_size=1)

    def trainer():
        return pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
                          callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])

    trainer().fit(Tiny(), loader, loader)
    last = tmp_path / "ckpt" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(UnreadableCheckpoint, match=f"{last} is a truncated"):
        trainer().validate(Tiny(), loader, ckpt_path="last")
