"""OneStepPipeline: built from a live teacher it samples as DiMOModule.generate (and as the draws written out by hand),
built from an exported folder it samples as generate did for the network it was exported from; the evaluation
callbacks, `dimo predict` and the consistency diagnostic sample through it."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dimo_lightning.core.masking import hybrid_initial_sequence
from dimo_lightning.core.sampling import sample_tokens
from dimo_lightning.core.seeding import SAMPLE_SEED_MODULUS, derive_seed
from dimo_lightning.data.labels import ClassLabelDataModule
from dimo_lightning.evaluation.callbacks.common import student_pipeline
from dimo_lightning.evaluation.callbacks.consistency_monitor import ConsistencyMonitor
from dimo_lightning.inference.export import export_student, load_student
from dimo_lightning.inference.pipeline import LabelConditioner, OneStepPipeline, SamplingDefaults
from dimo_lightning.training.ema import StudentEMA, evaluation_student
from dimo_lightning.training.module import DiMOModule

LABELS = torch.tensor([0, 3, 9, 9, 1])


def _module(teacher, **kwargs) -> DiMOModule:
    groups = {"student": {"r_init": [0.4, 0.8], "top_k": 12}, "sampling": {"temperature": 0.8},
              "optim": {"train_dropout": False}, "run": {"seed": 0}}
    for key, value in kwargs.items():  # "group__field" overrides
        group, field = key.split("__")
        groups.setdefault(group, {})[field] = value
    return DiMOModule(teacher, **groups)


def _perturbed(network: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``network`` with noisy weights (an EMA that differs from the student)."""
    other = copy.deepcopy(network)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return other


def _by_hand(teacher, network, labels, r_init, sigma, temperature, top_k, seed) -> torch.Tensor:
    """The one-step sample written out: hybrid input, one forward in eval mode, tokens never the mask slot."""
    generator = torch.Generator().manual_seed(seed)
    x_init = hybrid_initial_sequence(len(labels), teacher.seq_len, teacher.codebook_size, r_init, teacher.mask_id,
                                     generator)
    was_training = network.training
    with torch.no_grad():
        z = teacher.apply_network(network.eval(), x_init, labels, None, sigma, 1.0, generator)
    network.train(was_training)
    exclude = tuple(range(teacher.codebook_size, z.shape[-1]))
    return sample_tokens(z, temperature, top_k, 0.0, exclude, generator)


def test_sampling_defaults_come_from_the_module_settings(tiny_teacher):
    module = _module(tiny_teacher)
    defaults = module.sampling_defaults()
    assert defaults.r_init == pytest.approx(0.6)  # the midpoint of [0.4, 0.8]
    assert defaults == SamplingDefaults(r_init=defaults.r_init, emb_noise_sigma=0.1, emb_noise_scale=1.0,
                                        temperature=0.8, top_k=12, top_p=0.0)
    overridden = _module(tiny_teacher, sampling__r_init=0.3, sampling__emb_noise_sigma=0.2).sampling_defaults()
    assert (overridden.r_init, overridden.emb_noise_sigma) == (0.3, 0.2)
    assert SamplingDefaults.from_dict({**overridden.to_dict(), "unknown": 1}) == overridden


def test_pipeline_from_the_teacher_samples_as_generate(tiny_teacher):
    module = _module(tiny_teacher)
    ema = _perturbed(module.student, 1)
    for network in (module.student, ema):
        pipeline = OneStepPipeline.from_teacher(module.teacher, network, module.sampling_defaults(), module.device)
        assert pipeline.network is network  # the live network, not a copy
        for seed in (0, 1):
            codes = module.generate(LABELS, network=network, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(pipeline.sample_codes(LABELS, torch.Generator().manual_seed(seed)), codes)
            assert torch.equal(pipeline.sample_codes(cond=LABELS, generator=torch.Generator().manual_seed(seed)),
                               codes)
            assert torch.equal(_by_hand(module.teacher, network, LABELS, (0.4 + 0.8) / 2, 0.1, 0.8, 12, seed), codes)
            assert codes.max() < module.teacher.codebook_size  # never the mask slot
        over = module.generate(LABELS, network=network, temperature=1.3, r_init=0.2, sigma=0.3,
                               generator=torch.Generator().manual_seed(2))
        assert torch.equal(pipeline.sample_codes(LABELS, torch.Generator().manual_seed(2), temperature=1.3,
                                                 r_init=0.2, emb_noise_sigma=0.3), over)
        assert torch.equal(_by_hand(module.teacher, network, LABELS, 0.2, 0.3, 1.3, 12, 2), over)
        assert torch.equal(pipeline(LABELS, seed=3),
                           module.teacher.decode(module.generate(LABELS, network=network,
                                                                 generator=torch.Generator().manual_seed(3))).float())
    assert not torch.equal(module.generate(LABELS, generator=torch.Generator().manual_seed(0)),
                           module.generate(LABELS, network=ema, generator=torch.Generator().manual_seed(0)))
    module.student.train()
    OneStepPipeline.from_teacher(module.teacher, module.student, module.sampling_defaults()).sample_codes(LABELS)
    assert module.student.training  # sampled in eval mode, left in its mode
    with pytest.raises(ValueError, match="exactly one"):
        pipeline.sample_codes(LABELS, cond=LABELS)


def test_predict_and_the_evaluation_sample_through_the_pipeline(tiny_teacher):
    """`dimo predict` and the evaluation callbacks (FID monitor, report, grid) draw what generate draws for the
    (EMA) student: the same numbers as before the pipeline."""
    module = _module(tiny_teacher, sampling__predict_seed=4)
    module.add_module("student_ema", _perturbed(module.student, 2))  # as load_from_checkpoint keeps an average
    network = evaluation_student(module)
    assert network is module.student_ema
    out = module.predict_step({"conditions": LABELS, "index": torch.arange(5) + 10}, 0)
    generator = torch.Generator().manual_seed(derive_seed(4, salt=10, modulus=SAMPLE_SEED_MODULUS))
    expected = module.teacher.decode(module.generate(LABELS, network=network, generator=generator)).float()
    assert torch.equal(out["images"], expected) and torch.equal(out["index"], torch.arange(5) + 10)
    pipeline = student_pipeline(module)
    assert pipeline.network is network
    for seed in (0, 5):
        codes = module.generate(module.teacher.encode_condition(LABELS), network=network,
                                generator=torch.Generator().manual_seed(seed))
        assert torch.equal(pipeline.sample_codes(LABELS, torch.Generator().manual_seed(seed)), codes)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step distillation with the EMA and a last.ckpt."""
    from helpers import save_tiny_mnist_teacher

    from dimo_lightning.teachers.mnist import MNISTTeacher

    root = tmp_path_factory.mktemp("pipeline")
    weights, codebook = save_tiny_mnist_teacher(root / "teacher")
    module = _module(MNISTTeacher(str(weights), str(codebook)), optim__max_generator_steps=2)
    ema = StudentEMA(decay=0.5)
    trainer = pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, max_epochs=-1, logger=False,
                         num_sanity_val_steps=0, limit_val_batches=0, enable_model_summary=False,
                         enable_progress_bar=False,
                         callbacks=[ema, ModelCheckpoint(dirpath=root / "ckpt", save_last=True)])
    trainer.fit(module, ClassLabelDataModule(10, 4, 2))
    return {"module": module, "ema": ema.module, "ckpt": root / "ckpt" / "last.ckpt"}


@pytest.mark.parametrize("use_ema", [True, False])
def test_an_exported_folder_samples_as_generate_for_its_network(trained, tmp_path, use_ema):
    module = trained["module"]
    network = trained["ema"] if use_ema else module.student
    pipeline = load_student(export_student(trained["ckpt"], tmp_path / "exp", ema=use_ema))
    assert isinstance(pipeline.conditioner, LabelConditioner) and pipeline.conditioning_type == "class_label"
    assert pipeline.defaults == module.sampling_defaults()
    assert not pipeline.network.training and pipeline.device == torch.device("cpu")
    for seed in (0, 1):
        codes = module.generate(LABELS, network=network, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(pipeline.sample_codes(LABELS, torch.Generator().manual_seed(seed)), codes)
        assert torch.equal(pipeline(LABELS, seed=seed), module.teacher.decode(codes).float())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\] \(the student's classes\); got \[12\]"):
        pipeline.sample_codes(torch.tensor([0, 12]))


def test_consistency_monitor_samples_with_an_r_init_range(tiny_teacher):
    """The diagnostic draws the iteration's r_init from its seed (a range once failed here)."""
    module = _module(tiny_teacher)
    reduced = []
    trainer = SimpleNamespace(global_rank=0, world_size=1, datamodule=None,
                              strategy=SimpleNamespace(reduce=lambda t, reduce_op: reduced.append(t) or t))
    monitor = ConsistencyMonitor(num_samples=12, batch_size=5)
    first, again = monitor.measure(trainer, module), monitor.measure(trainer, module)
    assert first == again and first["all"] > 0  # seeded by (seed, rank, step): the same draws
    assert float(reduced[0][1].sum()) == 12  # every sample lands in a band
