"""Score one DiMO checkpoint's EMA student under several one-step sampling settings (evaluation only).

    python scripts/probe_sampling.py CKPT 1.0,0.6,0.1 0.9,0.6,0.1     # temperature,r_init,sigma per setting

1,000 balanced samples, seed 0, against mnist-val with the mnist-cnn features (the report's protocol).
"""

import copy
import sys

import torch

from dimo_lightning.evaluation.metrics.fidelity import class_accuracy
from dimo_lightning.evaluation.report import balanced_labels, generate_images, load_reference, score
from dimo_lightning.teachers.mnist import MNISTTeacher
from dimo_lightning.training.checkpoint_state import migrate_hparams
from dimo_lightning.training.module import DiMOModule

checkpoint = torch.load(sys.argv[1], weights_only=True, map_location="cpu")
# the settings groups (a checkpoint written before them is migrated); the teacher is the shipped one
hparams = {k: v for k, v in migrate_hparams(checkpoint["hyper_parameters"]).items()
           if not k.startswith("_") and k != "teacher"}
module = DiMOModule(MNISTTeacher(), **hparams)
module.load_state_dict(checkpoint["state_dict"], strict=False)  # the teacher is never in the checkpoint
student = copy.deepcopy(module.student)
ema = {k.removeprefix("student_ema."): v for k, v in checkpoint["state_dict"].items() if k.startswith("student_ema.")}
if not ema:  # checkpoints written before the EMA moved into the model's state dict
    ema = next(v for k, v in checkpoint["callbacks"].items() if "StudentEMA" in k)["weights"]
student.load_state_dict(ema)
reference, _ = load_reference("mnist-val")
labels = balanced_labels(1000, 10)
for setting in sys.argv[2:] or ["1.0,0.6,0.1"]:
    temperature, r_init, sigma = map(float, setting.split(","))

    def codes(batch, generator, t=temperature, r=r_init, s=sigma):
        cond = module.teacher.encode_condition(batch)
        return module.generate(cond, network=student, temperature=t, r_init=r, sigma=s, generator=generator)

    images, speed = generate_images(codes, module.teacher, labels, 250, 0, torch.device("cpu"))
    row = score("student", 1, images, labels, reference, speed, "mnist-cnn", None, class_accuracy)
    print(f"T={temperature} r_init={r_init} sigma={sigma}: FID {row.fid:.3f} precision {row.precision:.3f} "
          f"recall {row.recall:.3f} accuracy {row.accuracy:.3f}", flush=True)
