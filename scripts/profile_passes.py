"""Time the passes of one DiMO iteration on the MNIST teacher, in train mode (dropout) and in eval mode.

    python scripts/profile_passes.py [threads] [batch]
"""

import copy
import sys
import time

import torch

from dimo_lightning.core.masking import hybrid_initial_sequence
from dimo_lightning.teachers.mnist import MNISTTeacher

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 64
teacher = MNISTTeacher()
student = copy.deepcopy(teacher.network).requires_grad_(True)
cond = teacher.encode_condition(torch.arange(batch) % 10)
x = hybrid_initial_sequence(batch, teacher.seq_len, teacher.codebook_size, 0.6, teacher.mask_id,
                            torch.Generator().manual_seed(0))


def timed(name, fn, repeats=10):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    print(f"{name}: {(time.perf_counter() - start) / repeats * 1000:.1f} ms", flush=True)


def forward_backward():
    teacher.apply_network(student, x, cond).float().logsumexp(-1).mean().backward()


def forward():
    with torch.no_grad():
        teacher.apply_network(student, x, cond)


def teacher_cfg():
    with torch.no_grad():
        teacher.guided_logits(teacher.network, x, cond, 2.0)


timed("teacher CFG forward (2B, eval)", teacher_cfg)
for mode in ("train", "eval"):
    student.train(mode == "train")
    timed(f"student forward+backward ({mode})", forward_backward)
    timed(f"student forward, no grad ({mode})", forward)
