"""Soft-Di[M]O wired into DiMOModule: the third optimizer, the frozen trunk, the soft path, exact resume, the config."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import merge_settings
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from dimo_lightning.data.batch import ConditionBatch
from dimo_lightning.data.labels import ClassLabelDataModule
from dimo_lightning.data.real_codes import RealCodesDataModule
from dimo_lightning.objectives.gan import TeacherDiscriminator
from dimo_lightning.training.ema import StudentEMA
from dimo_lightning.training.module import DiMOModule
from dimo_lightning.training.settings import GANSettings

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def make_trainer(tmp_path, callbacks=(), **kwargs):
    return pl.Trainer(
        accelerator="cpu", max_epochs=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=list(callbacks), deterministic=True, **kwargs,
    )


def make_module(teacher, gan=None, **kwargs):
    defaults = dict(student={"r_init": [0.3, 0.9], "emb_noise_sigma": 0.2, "emb_noise_relative": True},
                    targets={"divergence_beta": 0.5}, optim={"max_generator_steps": 3, "train_dropout": False},
                    run={"seed": 7}, gan=GANSettings(weight=1.0, head_dim=16) if gan is None else gan,
                    optimizer_disc=lambda params: torch.optim.Adam(params, lr=1e-2))
    return DiMOModule(teacher, **merge_settings(defaults, kwargs))


def codes_file(tmp_path, rows: int = 40, codebook_size: int = 16, grid=(7, 7)) -> Path:
    generator = np.random.default_rng(0)
    path = tmp_path / "codes.npz"
    np.savez(path, codes=generator.integers(0, codebook_size, (rows, *grid)).astype(np.int16),
             labels=generator.integers(0, 10, rows))
    return path


def real_data(path, batch_size: int = 8, batches_per_epoch: int = 3, **kwargs) -> RealCodesDataModule:
    return RealCodesDataModule(str(path), codebook_size=16, grid_size=7, num_classes=10, batch_size=batch_size,
                               batches_per_epoch=batches_per_epoch, seed=3, **kwargs)


class Recorder(Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.rows.append((pl_module.iteration, batch.real.sum().item(), float(m["train/loss_gen"]),
                          float(m["train/loss_disc"]), float(m["train/disc_accuracy"])))


def test_gan_off_by_default_and_settings_checked(tiny_teacher) -> None:
    for gan in (None, GANSettings(), {"weight": 0.0}):
        module = DiMOModule(tiny_teacher, gan=gan)
        assert module.discriminator is None
        assert not [k for k in module.state_dict() if k.startswith("discriminator.")]
    assert len(DiMOModule(tiny_teacher).configure_optimizers()[0]) == 2
    with pytest.raises(ValueError, match="gan.only"):
        GANSettings(only=True)
    with pytest.raises(ValueError, match="gan.fake_input"):
        GANSettings(weight=1.0, fake_input="gumbel")
    with pytest.raises(ValueError, match="unknown gan keys: wieght"):
        DiMOModule(tiny_teacher, gan={"wieght": 1.0})
    assert GANSettings(weight=2.0, weight_warmup_steps=4).weight_at(1) == pytest.approx(1.0)


def test_condition_batch_is_the_one_training_batch(tmp_path) -> None:
    """Every training DataModule yields a ConditionBatch; real codes travel in its ``real`` field (no guessing from
    the contents), and it moves to a device through Lightning's batch transfer."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    real = next(iter(real_data(codes_file(tmp_path)).train_dataloader()))
    assert isinstance(real, ConditionBatch) and real.real.shape == (8, 49) and real.conditions.shape == (8,)
    labels = next(iter(ClassLabelDataModule(10, 4, 1).train_dataloader()))
    assert isinstance(labels, ConditionBatch) and labels.real is None and labels.conditions.shape == (4,)
    prompts = ConditionBatch(["a 3", "a 7"])
    moved = move_data_to_device(prompts, torch.device("cpu"))
    assert isinstance(moved, ConditionBatch) and moved.conditions == ["a 3", "a 7"] and moved.real is None
    moved = move_data_to_device(real, torch.device("cpu"))
    assert torch.equal(moved.real, real.real) and torch.equal(moved.conditions, real.conditions)
    with pytest.raises(ValueError, match="ConditionBatch.real"):
        ConditionBatch(torch.arange(3), real=torch.zeros(3, 49))  # codes are integers


def test_gan_fit_trains_heads_and_student_while_the_trunk_stays_frozen(tiny_teacher, tmp_path) -> None:
    module = make_module(tiny_teacher)
    teacher_before = {k: v.clone() for k, v in tiny_teacher.state_dict().items()}
    heads_before = copy.deepcopy(module.discriminator.state_dict())
    student_before = copy.deepcopy(module.student.state_dict())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    recorder = Recorder()
    trainer = make_trainer(tmp_path, [ckpt, recorder])
    trainer.fit(module, real_data(codes_file(tmp_path)))
    assert module.generator_step == 3 and module.disc_step == 3
    assert trainer.global_step == 3 * 3  # three optimizers step per iteration
    for k, v in tiny_teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"teacher tensor {k} changed"
    assert all(not p.requires_grad for p in tiny_teacher.parameters())
    assert any(not torch.equal(v, module.discriminator.state_dict()[k]) for k, v in heads_before.items())
    assert any(not torch.equal(v, module.student.state_dict()[k]) for k, v in student_before.items())
    # the third optimizer holds the heads and nothing else
    head_ids = {id(p) for p in module.discriminator.parameters()}
    assert {id(p) for g in trainer.optimizers[2].param_groups for p in g["params"]} == head_ids
    assert not head_ids & {id(p) for opt in trainer.optimizers[:2] for g in opt.param_groups for p in g["params"]}
    for name in ("train/loss_gan", "train/grad_norm_disc", "train/disc_logit_real", "train/disc_logit_fake"):
        assert torch.isfinite(torch.as_tensor(trainer.callback_metrics[name]))
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert len(saved["optimizer_states"]) == 3
    assert saved["dimo"]["disc_step"] == 3
    assert any(k.startswith("discriminator.heads.") for k in saved["state_dict"])
    assert not [k for k in saved["state_dict"] if k.startswith("teacher.")]


@pytest.mark.parametrize("fake_input", ["soft", "straight_through"])
def test_gan_only_moves_the_student_through_the_soft_path(tiny_teacher, tmp_path, fake_input) -> None:
    """With L_DiMO dropped, the only gradient the student gets is L_gan's; it reaches the logits through the soft
    embedding (the sampled tokens are integers and carry none)."""
    module = make_module(tiny_teacher, gan=GANSettings(weight=1.0, only=True, head_dim=16, fake_input=fake_input),
                         optim={"max_generator_steps": 2})
    before = copy.deepcopy(module.student.state_dict())
    make_trainer(tmp_path).fit(module, real_data(codes_file(tmp_path)))
    assert any(not torch.equal(v, module.student.state_dict()[k]) for k, v in before.items())

    trunk = tiny_teacher.network.eval()
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(4, 49, 17, generator=generator, requires_grad=True)
    tokens = torch.randint(0, 16, (4, 49), generator=generator)
    weights = torch.randn(4, 49, trunk.hidden_dim, generator=generator)
    straight = TeacherDiscriminator.student_embeddings(trunk, z, tokens)
    soft = TeacherDiscriminator.student_embeddings(trunk, z)
    torch.testing.assert_close(straight, trunk.tok_emb(tokens))  # forward: the sampled tokens' rows
    (grad_straight,) = torch.autograd.grad((weights * straight).sum(), z)
    (grad_soft,) = torch.autograd.grad((weights * soft).sum(), z)
    torch.testing.assert_close(grad_straight, grad_soft)  # backward: the soft path's gradient
    assert grad_soft.abs().sum() > 0


def test_exact_resume_with_three_optimizers(tiny_teacher, tmp_path) -> None:
    path = codes_file(tmp_path)
    full_rec = Recorder()
    full = make_module(copy.deepcopy(tiny_teacher), optim={"max_generator_steps": 5})
    make_trainer(tmp_path / "full", [full_rec]).fit(full, real_data(path))

    first_rec = Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    part = make_module(copy.deepcopy(tiny_teacher), optim={"max_generator_steps": 2})
    make_trainer(tmp_path / "a", [first_rec, ckpt]).fit(part, real_data(path))

    second_rec = Recorder()
    resumed = make_module(copy.deepcopy(tiny_teacher), optim={"max_generator_steps": 5})
    trainer = make_trainer(tmp_path / "b", [second_rec])
    trainer.fit(resumed, real_data(path), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert first_rec.rows + second_rec.rows == full_rec.rows  # same real batches, losses and accuracies
    assert resumed.disc_step == full.disc_step == 5
    for name in ("student", "aux", "discriminator"):
        for a, b in zip(getattr(full, name).parameters(), getattr(resumed, name).parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gan_needs_real_codes_of_the_teachers_vocabulary(tiny_teacher, tmp_path) -> None:
    with pytest.raises(ValueError, match="RealCodesDataModule"):
        make_trainer(tmp_path).fit(make_module(tiny_teacher), ClassLabelDataModule(10, 8, 4))
    path = codes_file(tmp_path)
    with pytest.raises(ValueError, match=r"--data.init_args.codebook_size=256 does not match the teacher's 16"):
        data = RealCodesDataModule(str(path), codebook_size=256, grid_size=7, num_classes=10, batch_size=8)
        make_trainer(tmp_path).fit(make_module(tiny_teacher), data)
    (tmp_path / "g").mkdir()
    wrong_grid = codes_file(tmp_path / "g", grid=(5, 5))
    with pytest.raises(ValueError, match=r"codes\.npz: code grids are 5x5 but the teacher's token grid is 7x7"):
        make_trainer(tmp_path).fit(make_module(tiny_teacher), real_data(wrong_grid))


def test_student_init_starts_from_a_trained_run(tiny_teacher, tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "dimo", save_last=True)
    trained = DiMOModule(copy.deepcopy(tiny_teacher), optim={"max_generator_steps": 2}, run={"seed": 1})
    make_trainer(tmp_path / "a", [ckpt, StudentEMA(0.5)]).fit(trained, ClassLabelDataModule(10, 8, 4))
    last = str(tmp_path / "dimo" / "last.ckpt")

    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            self.student = copy.deepcopy(pl_module.student.state_dict())
            self.aux = copy.deepcopy(pl_module.aux.state_dict())
            self.ema = copy.deepcopy(pl_module.student_ema.state_dict())

    start = AtStart()
    module = make_module(copy.deepcopy(tiny_teacher), optim={"max_generator_steps": 1}, run={"student_init": last})
    make_trainer(tmp_path / "b", [start, StudentEMA(0.5)]).fit(module, real_data(codes_file(tmp_path)))
    for got, want in ((start.student, trained.student), (start.aux, trained.aux), (start.ema, trained.student_ema)):
        for k, v in want.state_dict().items():
            assert torch.equal(got[k], v), k
    with pytest.raises(FileNotFoundError, match="student_init: checkpoint not found: .*nowhere.ckpt"):
        module.load_student_init(str(tmp_path / "nowhere.ckpt"))
    (tmp_path / "junk.ckpt").write_text("junk")
    with pytest.raises(ValueError, match=r"student_init: .*junk\.ckpt is not a readable"):
        module.load_student_init(str(tmp_path / "junk.ckpt"))


def test_ablation_override_combines_with_the_gan_config() -> None:
    from test_cli import ParseOnlyCLI

    cli = ParseOnlyCLI(args=["--config", str(ROOT / "configs/mnist/dimo_gan.yaml"), "--config",
                             str(ROOT / "configs/mnist/ablations/gan_base.yaml"),
                             "--model.init_args.gan.only=true", "--model.init_args.gan.weight=10"], run=False)
    callbacks = [c.class_path.rsplit(".", 1)[1] for c in cli.config.trainer.callbacks]
    assert callbacks == ["StudentEMA", "ModelCheckpoint", "SampleGrid", "EvaluationReport"]
    assert cli.config.trainer.callbacks[-1].init_args.teacher_steps == []
    gan = cli.config.model.init_args.gan
    assert gan.only and gan.weight == 10.0  # the override on top of the config's own GAN settings
    assert gan.coverage_weight == 1000.0 and gan.coverage_space == "pixels"  # the config's coverage term survives
    assert cli.config.data.class_path.endswith("RealCodesDataModule")


def test_dimo_gan_config_fast_dev_run(tmp_path, monkeypatch) -> None:
    from dimo_lightning.commands.cli import main

    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs/mnist/dimo_gan.yaml"), "--trainer.fast_dev_run=2",
          "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=8"])


def test_report_second_distance_matches_torch_fidelity(tiny_teacher, tmp_path, capsys) -> None:
    """The report's mnist-dae columns equal torch-fidelity's FID on the same images (an independent path)."""
    import json

    from dimo_lightning.core.sharding import balanced_labels
    from dimo_lightning.evaluation.callbacks.common import student_pipeline
    from dimo_lightning.evaluation.callbacks.evaluation_report import EvaluationReport
    from dimo_lightning.evaluation.metrics.fidelity import compute_metrics
    from dimo_lightning.evaluation.report import generate_images, load_reference

    report = EvaluationReport(num_samples=40, teacher_steps=[], batch_size=40, second_extractor="mnist-dae", seed=5)
    module = DiMOModule(tiny_teacher, run={"seed": 0})
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[report])
    trainer.validate(module, ClassLabelDataModule(10, 8, 1))
    (row,) = report.rows
    payload = json.loads((tmp_path / "eval.json").read_text())
    assert payload["second_extractor"] == "mnist-dae" and payload["rows"][0]["fid2"] == pytest.approx(row.fid2)
    assert "FID (mnist-dae)" in (tmp_path / "eval.md").read_text() and "FID (mnist-dae)" in capsys.readouterr().out
    pipeline = student_pipeline(module, module.student)
    images, _ = generate_images(lambda labels, g: pipeline.sample_codes(labels, g), tiny_teacher,
                                balanced_labels(40, 10), 40, 5 * 1_000_003, torch.device("cpu"))
    reference, _ = load_reference("mnist-val")
    expected = compute_metrics(images, reference, extractor="mnist-dae")
    assert row.fid2 == pytest.approx(expected["fid"], rel=1e-3)
    assert row.recall2 == pytest.approx(expected["recall"], abs=1e-6)
    assert row.fid2 != pytest.approx(row.fid, rel=1e-2)  # a different feature space than the classifier's
