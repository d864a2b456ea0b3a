"""Probe the Soft-Di[M]O discriminator on MNIST before wiring it into training: what can the heads tell apart?

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/probe_discriminator.py [--steps 150] [--student CKPT]
        [--augment both|on|off] [--fake soft|straight_through|both]

The student is the teacher's network (a Di[M]O student at step 0) or the ``student.*`` weights of a DiMOModule
checkpoint. Heads are trained with Adam (lr 1e-3) on the frozen teacher trunk, then scored on fresh batches:

* real MNIST train codes vs the student's soft embeddings (what the GAN trains on);
* the student's own sampled tokens (hard embeddings) vs its soft embeddings of the same logits: accuracy well above
  0.5 here means the heads can win on *softness* alone, not on content.

Each with and without mask augmentation (``--augment``), and with the fake side as soft embeddings (the paper) or
straight-through inputs (the sampled tokens' rows in the forward pass: ``--fake straight_through``). Prints a Markdown
table and the student's mean per-token entropy.
"""

from __future__ import annotations

import argparse
import copy

import torch

from dimo_lightning.core.masking import hybrid_initial_sequence
from dimo_lightning.core.sampling import sample_tokens
from dimo_lightning.data.real_codes import RealCodesDataModule
from dimo_lightning.objectives.gan import TeacherDiscriminator, discriminator_gan_loss
from dimo_lightning.teachers.mnist import MNISTTeacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--student", default=None, help="DiMOModule checkpoint (student.* weights)")
    parser.add_argument("--ema", action="store_true", help="take the checkpoint's student_ema.* weights")
    parser.add_argument("--augment", choices=("both", "on", "off"), default="both")
    parser.add_argument("--fake", choices=("soft", "straight_through", "both"), default="soft")
    args = parser.parse_args()
    torch.set_num_threads(1)
    teacher = MNISTTeacher()
    trunk = teacher.network.eval()
    student = copy.deepcopy(trunk)
    if args.student:
        state = torch.load(args.student, map_location="cpu", weights_only=False)["state_dict"]
        prefix = "student_ema." if args.ema else "student."
        student.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    k = teacher.codebook_size
    data = RealCodesDataModule(batch_size=args.batch_size, batches_per_epoch=10**6, seed=0)
    data.setup("fit")
    stream = iter(data.train_dataloader())
    generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def student_logits(labels: torch.Tensor) -> torch.Tensor:
        x_init = hybrid_initial_sequence(len(labels), teacher.seq_len, k, 0.6, teacher.mask_id, generator)
        return student(x_init, labels)

    def pair(task: str, fake_input: str):
        labels, codes = next(stream)
        z = student_logits(labels)
        if fake_input == "soft":
            fake = TeacherDiscriminator.fake_embeddings(trunk, z)
        else:  # straight-through: the forward value is the sampled tokens' rows
            tokens = sample_tokens(z, 1.0, exclude_ids=(teacher.mask_id,), generator=generator)
            fake = TeacherDiscriminator.student_embeddings(trunk, z, tokens)
        if task == "real codes":
            real = TeacherDiscriminator.real_embeddings(trunk, codes)
        else:  # the student's own samples, hard
            real = trunk.tok_emb(sample_tokens(z, 1.0, exclude_ids=(teacher.mask_id,), generator=generator))
        return real, fake, labels

    entropy = []
    with torch.no_grad():
        for _ in range(4):
            p = student_logits(next(stream)[0])[..., :k].softmax(-1)
            entropy.append(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
    uniform = torch.log(torch.tensor(float(k)))
    print(f"student mean per-token entropy: {torch.stack(entropy).mean():.3f} nats (uniform: {uniform:.2f})")
    print("| real side | fake side | mask augmentation | held-out accuracy | real logit | fake logit |\n"
          "|---|---|---|---|---|---|")
    augments = {"both": (True, False), "on": (True,), "off": (False,)}[args.augment]
    fakes = ("soft", "straight_through") if args.fake == "both" else (args.fake,)
    tasks = [(task, fake) for task in ("real codes", "student's own hard samples") for fake in fakes
             if not (task != "real codes" and fake == "straight_through")]  # hard vs hard: identical by design
    for task, fake_input in tasks:
        for augment in augments:
            torch.manual_seed(0)
            disc = TeacherDiscriminator.for_trunk(trunk, mask_augment=augment)
            optimizer = torch.optim.Adam(disc.parameters(), lr=1e-3)
            for _ in range(args.steps):
                real, fake, labels = pair(task, fake_input)
                real_logits = disc(trunk, real, labels, generator)
                fake_logits = disc(trunk, fake, labels, generator)
                loss = discriminator_gan_loss(real_logits, fake_logits)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                scores = []
                for _ in range(8):
                    real, fake, labels = pair(task, fake_input)
                    scores.append((disc(trunk, real, labels, generator), disc(trunk, fake, labels, generator)))
                real_l = torch.cat([s[0] for s in scores])
                fake_l = torch.cat([s[1] for s in scores])
                accuracy = torch.cat([real_l > 0, fake_l <= 0]).float().mean()
            print(f"| {task} | {fake_input} | {'on' if augment else 'off'} | {accuracy:.3f} | {real_l.mean():.2f} | "
                  f"{fake_l.mean():.2f} |", flush=True)


if __name__ == "__main__":
    main()
