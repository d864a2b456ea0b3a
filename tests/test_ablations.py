"""The ablation knobs: aux_mode none (the student's own logits in place of the aux model), mask-ratio bands of the
generator update, and the consistency diagnostic (pure functions and the ConsistencyMonitor callback)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from dimo_lightning.core.masking import MASK_SCHEDULES, mask_tokens, sample_mask_ratio
from dimo_lightning.core.sampling import sample_tokens
from dimo_lightning.data.labels import ClassLabelDataModule
from dimo_lightning.evaluation.callbacks.consistency_monitor import ConsistencyMonitor
from dimo_lightning.objectives.consistency_gap import band_labels, bin_by_ratio, consistency_kl_by_band, masked_kl
from dimo_lightning.training.module import DiMOModule

ROOT = Path(__file__).resolve().parents[1]


class FirstBatch(Callback):
    def __init__(self):
        self.batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batch is None:
            self.batch = batch.conditions.clone()


def trainer_for(tmp_path, callbacks=(), **kwargs):
    return pl.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks), **kwargs)


# ---- aux_mode: none -------------------------------------------------------------------------------------------------
def test_aux_mode_none_gradient_is_the_students_own_by_hand(tiny_teacher, tmp_path):
    """One SGD(lr=1) step without clipping moves the student by minus the gradient; it must equal the gradient of
    the Di[M]O surrogate whose aux conditionals are the student's own detached logits on x_t, computed here from
    the formulas (FKL p_S - p_T, RKL p_S (log p_S - log p_T - KL), beta-mixed, masked positions, / B)."""
    beta = 0.5
    module = DiMOModule(tiny_teacher, optimizer_gen=lambda p: torch.optim.SGD(p, lr=1.0),
                        student={"r_init": 0.6, "emb_noise_sigma": 0.1},
                        targets={"divergence_beta": beta}, aux={"mode": "none"},
                        optim={"max_generator_steps": 1, "gen_grad_clip": 0.0, "train_dropout": False},
                        run={"seed": 3})
    start = copy.deepcopy(module.student)
    aux_before = copy.deepcopy(module.aux.state_dict())
    aux_calls = []
    module.aux.register_forward_hook(lambda *args: aux_calls.append(1))
    first = FirstBatch()
    trainer = trainer_for(tmp_path, [first])
    trainer.fit(module, ClassLabelDataModule(10, 8, 1))
    assert module.generator_step == 1
    assert not aux_calls, "aux_mode none must not run the aux model"
    for key, value in module.aux.state_dict().items():
        assert torch.equal(value, aux_before[key]), f"aux weight {key} changed"
    assert not trainer.optimizers[1].state  # the aux optimizer never stepped
    assert "train/loss_aux" not in trainer.callback_metrics

    # The same draws as the module's iteration 0, then the gradient by hand.
    t = tiny_teacher
    generator = torch.Generator().manual_seed(module.iteration_seed(0))
    cond = t.encode_condition(first.batch)
    z = module.student_logits(start, cond, 0.6, 0.1, generator)  # (B, N, V), with grad into `start`
    x = sample_tokens(z.detach(), 1.0, 0, 0.0, (t.mask_id,) if z.shape[-1] > t.mask_id else (), generator)
    ratio = sample_mask_ratio(x.shape[0], "arccos", generator)
    x_t, mask = mask_tokens(x, ratio, t.mask_id, generator)
    with torch.no_grad():
        log_pt = torch.log_softmax(t.guided_logits(t.network, x_t, cond, 2.0).double(), -1)
        log_ps = torch.log_softmax(t.apply_network(start, x_t, cond).double(), -1)
        ps, pt = log_ps.exp(), log_pt.exp()
        rkl = (ps * (log_ps - log_pt)).sum(-1, keepdim=True)
        g = (1 - beta) * (ps - pt) + beta * ps * (log_ps - log_pt - rkl)
        g = (g * mask[..., None]).float() / x.shape[0]
    (z * g).sum().backward()
    checked = 0
    for (name, p0), p1 in zip(start.named_parameters(), module.student.parameters()):
        if p0.grad is None:
            assert torch.equal(p0.detach(), p1.detach()), name
            continue
        torch.testing.assert_close(p0.detach() - p1.detach(), p0.grad, atol=2e-6, rtol=1e-4, msg=name)
        checked += int(p0.grad.abs().sum() > 0)
    assert checked > 3  # the gradient reached the student's layers


def test_aux_mode_none_checkpoint_resumes(tiny_teacher, tmp_path):
    module = DiMOModule(tiny_teacher, aux={"mode": "none"}, optim={"max_generator_steps": 1}, run={"seed": 0})
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer_for(tmp_path, [ckpt]).fit(module, ClassLabelDataModule(10, 8, 4))
    resumed = DiMOModule(tiny_teacher, aux={"mode": "none"}, optim={"max_generator_steps": 2}, run={"seed": 0})
    trainer_for(tmp_path).fit(resumed, ClassLabelDataModule(10, 8, 4), ckpt_path=str(tmp_path / "ckpt/last.ckpt"))
    assert resumed.generator_step == 2
    for a, b in zip(resumed.aux.parameters(), tiny_teacher.network.parameters()):
        assert torch.equal(a, b)  # the aux model is still the teacher's copy


def test_bad_ablation_arguments_name_the_flag(tiny_teacher):
    with pytest.raises(ValueError, match="aux.mode"):
        DiMOModule(tiny_teacher, aux={"mode": "half"})
    with pytest.raises(ValueError, match="targets.mask_ratio_band"):
        DiMOModule(tiny_teacher, targets={"mask_ratio_band": [0.7, 0.3]})


# ---- mask-ratio bands -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", MASK_SCHEDULES)
def test_band_draws_the_schedule_conditioned_on_the_band(schedule):
    """Banded draws stay in the band, put no mass on its edges, and follow the unbanded schedule's distribution
    restricted to the band (quantiles against rejection sampling)."""
    band = (0.6, 0.9) if schedule == "mage" else (0.3, 0.7)
    generator = torch.Generator().manual_seed(0)
    banded = sample_mask_ratio(20000, schedule, generator, band=band)
    assert float(banded.min()) >= band[0] and float(banded.max()) <= band[1]
    assert float(((banded == band[0]) | (banded == band[1])).float().mean()) < 0.001
    free = sample_mask_ratio(400000, schedule, generator)
    kept = free[(free >= band[0]) & (free <= band[1])]
    q = torch.linspace(0.05, 0.95, 10)
    torch.testing.assert_close(banded.quantile(q), kept.quantile(q), atol=0.01, rtol=0)


def test_clamp_piles_draws_on_the_band_edge():
    """Why a band is not a clamp: arccos ratios clamped to [0, 0.3] sit at 0.3 about 89% of the time."""
    clamped = sample_mask_ratio(20000, "arccos", torch.Generator().manual_seed(0), clamp=(0.0, 0.3))
    share = float((clamped == 0.3).float().mean())
    assert share == pytest.approx(math.cos(0.3 * math.pi / 2), abs=0.01)  # P(u < cos(0.15 pi))


def test_module_masks_the_generator_update_within_the_band(tiny_teacher, tmp_path, monkeypatch):
    import dimo_lightning.core.masking as module_file  # every re-mask draws its ratios here (core.masking.remask)

    seen = []
    real = module_file.sample_mask_ratio

    def spy(*args, **kwargs):
        ratio = real(*args, **kwargs)
        seen.append((kwargs.get("band"), ratio))
        return ratio

    monkeypatch.setattr(module_file, "sample_mask_ratio", spy)
    module = DiMOModule(tiny_teacher, targets={"mask_ratio_band": [0.7, 1.0]}, optim={"max_generator_steps": 2},
                        run={"seed": 0})
    trainer_for(tmp_path).fit(module, ClassLabelDataModule(10, 8, 4))
    generator_draws = [r for band, r in seen if band is not None]
    aux_draws = [r for band, r in seen if band is None]
    assert len(generator_draws) == 2 and len(aux_draws) == 2  # the aux update keeps its full schedule
    assert all(float(r.min()) >= 0.7 for r in generator_draws)


# ---- consistency diagnostic -----------------------------------------------------------------------------------------
def test_masked_kl_matches_a_direct_computation():
    torch.manual_seed(0)
    p, q = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    expected = []
    for b in range(3):
        terms = []
        for i in range(5):
            if mask[b, i]:
                pp, qq = p[b, i].double().softmax(-1), q[b, i].double().softmax(-1)
                terms.append(float((pp * (pp / qq).log()).sum()))
        expected.append(sum(terms) / len(terms))
    torch.testing.assert_close(masked_kl(p, q, mask), torch.tensor(expected, dtype=torch.float32))
    assert torch.equal(masked_kl(p, p, mask), torch.zeros(3))


def test_binning_by_ratio():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    ratios = torch.tensor([0.0, 0.29, 0.3, 0.69, 0.7, 1.0, 0.5])
    sums, counts = bin_by_ratio(values, ratios, [0.0, 0.3, 0.7, 1.0])
    assert sums.tolist() == [3.0, 14.0, 11.0] and counts.tolist() == [2.0, 3.0, 2.0]
    sums, counts = bin_by_ratio(values, ratios, [0.3, 0.7])  # outside left out; the last band keeps its upper edge
    assert sums.tolist() == [19.0] and counts.tolist() == [4.0]
    assert band_labels([0.0, 0.3, 0.7, 1.0]) == ["0-0.3", "0.3-0.7", "0.7-1"]
    with pytest.raises(ValueError, match="increasing"):
        bin_by_ratio(values, ratios, [0.5, 0.5])


class ConditionOnly(nn.Module):
    """Logits (B, N, V) that depend on the condition only: the input codes are ignored."""

    def __init__(self, num_classes=10, tokens=49, width=17):
        super().__init__()
        self.table = nn.Parameter(torch.randn(num_classes, tokens, width))

    def forward(self, codes, cond):
        return self.table[cond]


def test_diagnostic_is_zero_for_a_student_that_ignores_its_input(tiny_teacher):
    torch.manual_seed(0)
    net, cond = ConditionOnly(), torch.arange(40) % 10
    generator = torch.Generator().manual_seed(1)
    x_init = torch.randint(0, 16, (40, 49), generator=generator)
    ratios = torch.rand(40, generator=generator)

    def remasked_sample(init_logits):  # x ~ softmax over the 16 codes, re-masked at the drawn ratios
        x = sample_tokens(init_logits[..., :16], generator=generator)
        return mask_tokens(x, ratios, 16, generator)

    init = net(x_init, cond)
    x_t, mask = remasked_sample(init)
    sums, counts = consistency_kl_by_band(init, lambda codes: net(codes, cond), x_t, mask, num_codes=16,
                                          edges=[0.0, 0.3, 0.7, 1.0])
    assert counts.sum() == 40 and (counts > 0).all()
    assert torch.equal(sums, torch.zeros(3))

    # The tiny teacher's network reads its input: the student's predictions on x_t and x_init differ.
    t = tiny_teacher
    with torch.no_grad():
        init = t.apply_network(t.network.eval(), x_init, cond)
        x_t, mask = remasked_sample(init)
        sums, counts = consistency_kl_by_band(init, lambda codes: t.apply_network(t.network, codes, cond), x_t, mask,
                                              t.codebook_size, [0.0, 0.3, 0.7, 1.0])
    assert (sums / counts > 1e-4).all()


def test_consistency_monitor_logs_bands_without_touching_training(tiny_teacher, tmp_path):
    def fit(callbacks):
        module = DiMOModule(tiny_teacher, optim={"max_generator_steps": 2, "train_dropout": False}, run={"seed": 0})
        trainer = trainer_for(tmp_path, callbacks)
        trainer.fit(module, ClassLabelDataModule(10, 8, 4))
        return module, trainer

    monitor = ConsistencyMonitor(every_n_generator_steps=1, num_samples=30, batch_size=16)
    module, trainer = fit([monitor])
    keys = {f"train/consistency_kl/{b}" for b in ("0-0.3", "0.3-0.7", "0.7-1", "all")}
    assert keys <= set(trainer.callback_metrics)
    assert all(float(trainer.callback_metrics[k]) > 0 for k in keys)
    assert monitor.last["all"] == pytest.approx(float(trainer.callback_metrics["train/consistency_kl/all"]))
    plain, _ = fit([])
    for a, b in zip(module.student.parameters(), plain.student.parameters()):
        assert torch.equal(a, b)  # the measurement draws nothing from the training's random streams


def test_ablation_specs_parse_and_their_grids_are_valid_configs():
    """Every spec in configs/mnist/ablations: its sweep section loads, and each grid point's `dimo fit` arguments
    parse (one CLI parser, reused for every point: building it is the slow part) and set the swept key."""
    from test_cli import ParseOnlyCLI

    from dimo_lightning.commands import sweep

    specs = sorted((ROOT / "configs/mnist/ablations").glob("*.yaml"))
    specs = [p for p in specs if "sweep" in (yaml.safe_load(p.read_text()) or {})]
    assert {p.stem for p in specs} >= {"r_init", "beta", "aux_mode", "mask_band"}
    parser = ParseOnlyCLI(args=["--config", str(ROOT / "configs/mnist/ablations/base.yaml")], run=False).parser
    for path in specs:
        spec = sweep.load_spec(path)
        definition = sweep.build_definition(spec["configs"], spec.get("args", []), spec["grid"],
                                            spec.get("average_over", []), spec.get("env"), "/tmp/unused")
        for point in sweep.grid_points(definition):
            command = sweep.trial_command(definition, point, Path("/tmp/unused"), "s", "v")
            config = parser.parse_args(command[command.index("--config"):])
            for key, value in point.items():
                node = config
                for part in key.split("."):
                    node = node[part]
                assert node == (yaml.safe_load(value) if isinstance(value, str) else value), (path.name, key)
