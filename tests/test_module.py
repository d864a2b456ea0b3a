"""DiMOModule: optimizer wiring, teacher isolation, aux rounds, resume equality, NaN robustness."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from helpers import merge_settings
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from dimo_lightning.data.labels import ClassLabelDataModule
from dimo_lightning.training.ema import StudentEMA
from dimo_lightning.training.module import DiMOModule


class Recorder(Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.rows.append(
            (pl_module.iteration, batch.conditions.tolist(), float(m["train/loss_aux"]),
             float(m["train/loss_gen"]) if "train/loss_gen" in m else None)
        )


def make_trainer(tmp_path, callbacks=(), **kwargs):
    return pl.Trainer(
        accelerator="cpu", max_epochs=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=list(callbacks), deterministic=True, **kwargs,
    )


def make_module(teacher, **kwargs):
    defaults = dict(student={"r_init": [0.3, 0.9], "emb_noise_sigma": 0.2, "emb_noise_relative": True},
                    targets={"divergence_beta": 0.5}, optim={"max_generator_steps": 3}, run={"seed": 7})
    return DiMOModule(teacher, **merge_settings(defaults, kwargs))


def test_teacher_frozen_and_outside_optimizers_and_checkpoints(tiny_teacher, tmp_path):
    module = make_module(tiny_teacher)
    before = {k: v.clone() for k, v in tiny_teacher.state_dict().items()}
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path, [ckpt, StudentEMA(0.9)])
    trainer.fit(module, ClassLabelDataModule(10, 8, 4))
    assert module.generator_step == 3
    assert not tiny_teacher.training and not tiny_teacher.network.training
    assert module.student.training and module.aux.training
    for k, v in tiny_teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher tensor {k} changed"
    opt_params = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in tiny_teacher.parameters()}
    assert opt_params  # something is trained
    # the student actually moved away from the teacher
    assert any(not torch.equal(a, b) for a, b in zip(module.student.parameters(), tiny_teacher.network.parameters()))
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert not [k for k in saved["state_dict"] if k.startswith("teacher.")]
    assert any(k.startswith("student.") for k in saved["state_dict"])
    assert any(k.startswith("aux.") for k in saved["state_dict"])
    assert saved["dimo"]["generator_step"] == 3
    assert len(saved["optimizer_states"]) == 2
    ema_state = next(v for k, v in saved["callbacks"].items() if "StudentEMA" in k)
    assert ema_state == {"num_updates": 3}
    # the EMA travels in the model's state dict (sharded with the model under FSDP2)
    ema_keys = {k.removeprefix("student_ema.") for k in saved["state_dict"] if k.startswith("student_ema.")}
    assert ema_keys == set(module.student.state_dict())
    assert not any(torch.equal(saved["state_dict"]["student_ema." + k], v) for k, v in
                   module.student.state_dict().items() if k.startswith("transformer"))


def test_fix_emb_layer_freezes_tied_table(tiny_teacher, tmp_path):
    module = make_module(tiny_teacher, optim={"max_generator_steps": 2})
    frozen = module.student.tok_emb.weight.clone()
    make_trainer(tmp_path).fit(module, ClassLabelDataModule(10, 8, 4))
    assert torch.equal(module.student.tok_emb.weight, frozen)
    assert not module.student.tok_emb.weight.requires_grad


def test_aux_rounds_parity(tiny_teacher, tmp_path):
    module = make_module(tiny_teacher, aux={"rounds": 3}, optim={"max_generator_steps": 2})
    trainer = make_trainer(tmp_path)
    trainer.fit(module, ClassLabelDataModule(10, 8, 10))
    # generator steps at iterations 0 and 3; stop after iteration 3 -> 4 iterations, 4 aux steps
    assert module.iteration == 4
    assert module.generator_step == 2
    assert trainer.global_step == 2 + 4  # global_step counts both optimizers


def test_resume_continues_exactly(tiny_teacher, tmp_path):
    data_kwargs = dict(num_classes=10, batch_size=8, batches_per_epoch=3)
    full_rec = Recorder()
    full = make_module(copy.deepcopy(tiny_teacher), optim={"max_generator_steps": 6})
    make_trainer(tmp_path / "full", [full_rec]).fit(full, ClassLabelDataModule(**data_kwargs))

    first_rec = Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    part = make_module(copy.deepcopy(tiny_teacher), optim={"max_generator_steps": 4})
    make_trainer(tmp_path / "a", [first_rec, ckpt]).fit(part, ClassLabelDataModule(**data_kwargs))

    second_rec = Recorder()
    resumed = make_module(copy.deepcopy(tiny_teacher), optim={"max_generator_steps": 6})
    make_trainer(tmp_path / "b", [second_rec]).fit(
        resumed, ClassLabelDataModule(**data_kwargs), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert first_rec.rows + second_rec.rows == full_rec.rows
    for a, b in zip(full.student.parameters(), resumed.student.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class PoisonStudent(Callback):
    """Fills the student's output layer with NaN before iteration ``at`` and records the weights around it."""

    def __init__(self, at):
        self.at = at
        self.before = self.after = None
        self.skipped = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.iteration == self.at:
            with torch.no_grad():
                pl_module.student.last_layer[2].weight.fill_(float("nan"))
            self.before = copy.deepcopy((pl_module.student.state_dict(), pl_module.aux.state_dict()))
            self.skipped = pl_module.skipped_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.iteration == self.at + 1:
            self.after = copy.deepcopy((pl_module.student.state_dict(), pl_module.aux.state_dict()))
            self.valid_rows = float(trainer.callback_metrics["train/valid_rows_gen"])
            trainer.should_stop = True


def test_nan_batch_is_skipped_without_changing_weights(tiny_teacher, tmp_path):
    module = make_module(tiny_teacher, optim={"max_generator_steps": 10})
    poison = PoisonStudent(at=2)  # after two real steps, so Adam momentum would move the weights
    make_trainer(tmp_path, [poison]).fit(module, ClassLabelDataModule(10, 8, 10))
    assert poison.after is not None, "training stopped before the poisoned iteration"
    for before, after in zip(poison.before, poison.after):
        for k in before:
            assert torch.equal(before[k].nan_to_num(0.5), after[k].nan_to_num(0.5)), f"{k} changed"
    assert poison.valid_rows == 0.0
    assert module.skipped_steps == poison.skipped + 2  # generator and aux updates both skipped
    assert module.generator_step == 2


def test_accumulation_matches_one_big_batch_gradient(tiny_teacher):
    """Two micro-batches of 4 give the same generator gradient as the math on the full batch of 8."""
    from dimo_lightning.core.losses import generator_loss

    z = torch.randn(8, 49, 17, requires_grad=True)
    g = torch.randn(8, 49, 17)
    m = torch.rand(8, 49) < 0.5
    generator_loss(z, g, m).backward()
    full = z.grad.clone()
    z.grad = None
    for zs, gs, ms in zip(z.split(4), g.split(4), m.split(4)):
        (generator_loss(zs, gs, ms) / 2).backward()
    torch.testing.assert_close(z.grad, full)


@pytest.mark.parametrize("field, value", [("aux.sample", "both"), ("targets.mask_schedule", "cubic"),
                                          ("student.r_init", [0.9, 0.1]), ("student.emb_noise_sigma", 1.5),
                                          ("aux.rounds", 0)])
def test_bad_arguments_name_the_flag(tiny_teacher, field, value):
    group, name = field.split(".")
    with pytest.raises(ValueError, match=field):
        DiMOModule(tiny_teacher, **{group: {name: value}})


def test_generate_returns_codes_without_mask(tiny_teacher):
    module = make_module(tiny_teacher)
    codes = module.generate(torch.arange(10))
    assert codes.shape == (10, 49)
    assert int(codes.max()) < tiny_teacher.codebook_size
    images = tiny_teacher.decode(codes)
    assert images.shape == (10, 1, 28, 28)


class ModeRecorder(Callback):
    def __init__(self):
        self.modes = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.modes.add((pl_module.student.training, pl_module.aux.training, pl_module.teacher.network.training))


@pytest.mark.parametrize("train_dropout", [True, False])
def test_train_dropout_sets_student_and_aux_modes(tiny_teacher, tmp_path, train_dropout):
    module = make_module(tiny_teacher, optim={"train_dropout": train_dropout})
    recorder = ModeRecorder()
    make_trainer(tmp_path, [recorder]).fit(module, ClassLabelDataModule(10, 8, 4))
    assert recorder.modes == {(train_dropout, train_dropout, False)}
    # the tiny teacher has dropout 0.1: the student's training forward is random with it and repeatable without
    cond = tiny_teacher.encode_condition(torch.arange(8) % 10)

    def forward():
        return module.student_logits(module.student, cond, 0.6, 0.0, torch.Generator().manual_seed(3))

    assert torch.equal(forward(), forward()) is (not train_dropout)


def test_labels_out_of_range_fail_before_the_step(tiny_teacher, tmp_path):
    """The label check runs on the host-side batch (on_before_batch_transfer), not in the training step."""
    module = make_module(tiny_teacher)
    # A plain loader: a DataModule with too many classes is refused earlier (at fit start, by its num_classes).
    bad = torch.utils.data.DataLoader([torch.tensor([0, 3, 11, 2])] * 2, batch_size=None)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 10\)"):
        make_trainer(tmp_path).fit(module, train_dataloaders=bad)
    assert module.iteration == 0


def test_old_checkpoints_with_ema_in_the_callback_state_still_load(tiny_teacher, tmp_path):
    """Checkpoints written before the EMA moved into the model's state dict kept it in the callback state."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    module = make_module(copy.deepcopy(tiny_teacher), optim={"max_generator_steps": 2})
    make_trainer(tmp_path / "a", [ckpt, StudentEMA(0.9)]).fit(module, ClassLabelDataModule(10, 8, 4))
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    ema_weights = {k.removeprefix("student_ema."): saved["state_dict"].pop(k)
                   for k in [k for k in saved["state_dict"] if k.startswith("student_ema.")]}
    key = next(k for k in saved["callbacks"] if "StudentEMA" in k)
    saved["callbacks"][key] = {"num_updates": 2, "weights": ema_weights}
    torch.save(saved, tmp_path / "old.ckpt")

    ema = StudentEMA(0.9)
    resumed = make_module(copy.deepcopy(tiny_teacher), optim={"max_generator_steps": 2})
    make_trainer(tmp_path / "b", [ema]).validate(resumed, ClassLabelDataModule(10, 8, 2),
                                                 ckpt_path=str(tmp_path / "old.ckpt"))
    assert ema.num_updates == 2
    for name, value in ema_weights.items():
        assert torch.equal(resumed.student_ema.state_dict()[name], value), name
    assert not torch.equal(resumed.student_ema.transformer.layers[0][0].fn.mha.in_proj_weight,
                           resumed.student.transformer.layers[0][0].fn.mha.in_proj_weight)
