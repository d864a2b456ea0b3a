import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _torch_defaults():
    # Tests share one process: keep them from leaking thread counts or default dtypes into each other.
    threads = torch.get_num_threads()
    dtype = torch.get_default_dtype()
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture
def tiny_teacher(tmp_path):
    from helpers import save_tiny_mnist_teacher

    from dimo_lightning.teachers.mnist import MNISTTeacher

    weights, codebook = save_tiny_mnist_teacher(tmp_path / "teacher")
    return MNISTTeacher(str(weights), str(codebook))
