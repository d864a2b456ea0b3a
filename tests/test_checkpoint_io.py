"""AtomicCheckpointIO: a failed save leaves the previous checkpoint intact and no temporary file behind."""

import pytest
import torch

from dimo_lightning.training.checkpoint_io import AtomicCheckpointIO


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "weights": torch.arange(3)}, path)
    assert io.load_checkpoint(path)["step"] == 1

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full halfway")  # torch.save fails after writing part of the file

    with pytest.raises(RuntimeError, match="halfway"):
        io.save_checkpoint({"step": 2, "weights": torch.arange(1000), "bad": Unpicklable()}, path)
    assert io.load_checkpoint(path)["step"] == 1  # the old file, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    io.save_checkpoint({"step": 3}, str(path))
    assert io.load_checkpoint(path)["step"] == 3
