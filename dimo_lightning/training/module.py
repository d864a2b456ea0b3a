"""DiMOModule: Di[M]O distillation of a masked diffusion teacher into a one-step student, on Lightning manual
optimization (docs/method.md#the-iteration, with the departures of docs/method.md#deviations).

One training step is one Di[M]O iteration: an :class:`~dimo_lightning.objectives.context.IterationContext`
(conditions per micro-batch, real codes when the GAN or coverage term is on, r_init, sigma, one random generator),
then up to three updates, each an objective accumulated over the micro-batches and one guarded optimizer step:

1. generator (every ``aux.rounds``-th iteration): :class:`~dimo_lightning.objectives.dimo_generator.DiMOGenerator`;
2. aux (``aux.mode: full``): :class:`~dimo_lightning.objectives.aux_update.AuxUpdate`;
3. discriminator (``gan.weight > 0``): :class:`~dimo_lightning.objectives.gan.DiscriminatorUpdate`.

All random draws of an iteration come from a generator seeded by (seed, rank, iteration), and dropout runs under a
forked global RNG seeded the same way, so ranks differ and a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from typing_extensions import override

from dimo_lightning.core.conditions import move_condition, split_condition
from dimo_lightning.core.seeding import SAMPLE_SEED_MODULUS, derive_seed
from dimo_lightning.data.batch import ConditionBatch
from dimo_lightning.inference.one_step import StudentInput, TokenSampling, student_logits
from dimo_lightning.inference.pipeline import OneStepPipeline, SamplingDefaults
from dimo_lightning.inference.text_pipeline import TextPipeline
from dimo_lightning.objectives.aux_update import AuxUpdate
from dimo_lightning.objectives.context import IterationContext, Objective, split_real
from dimo_lightning.objectives.coverage import CoverageTerm
from dimo_lightning.objectives.dimo_generator import DiMOGenerator
from dimo_lightning.objectives.gan import DiscriminatorUpdate, GANGeneratorTerm, build_discriminator, feature_trunk
from dimo_lightning.teachers.base import MaskedTeacher
from dimo_lightning.training import checkpoint_state, speed
from dimo_lightning.training.config_checks import check_data_matches_module, check_real_data_matches_teacher
from dimo_lightning.training.distributed import is_sharded, shard_network
from dimo_lightning.training.ema import evaluation_student
from dimo_lightning.training.settings import (
    AuxSettings,
    DiMOSettings,
    GANSettings,
    OptimSettings,
    RunSettings,
    SamplingSettings,
    StudentSettings,
    TargetSettings,
)
from dimo_lightning.training.stepping import GuardedStep, accumulate


class DiMOModule(pl.LightningModule):
    """Distills ``teacher`` into a one-step student with an auxiliary model (Di[M]O).

    Args:
        teacher: the frozen teacher (``class_path`` in YAML). Student and aux start as copies of its network. Its
            class path and arguments are recorded in every checkpoint, so ``DiMOModule.load_from_checkpoint(path)``
            rebuilds it (a ``{"class_path", "init_args"}`` mapping is accepted here for that purpose).
        optimizer_gen: optimizer factory of the student.
        optimizer_aux: optimizer factory of the aux model.
        optimizer_disc: optimizer factory of the discriminator heads (the third optimizer; only with the GAN).
        scheduler_gen: optional LR-scheduler factory of the student (stepped after each student step).
        scheduler_aux: optional LR-scheduler factory of the aux model (stepped after each aux step).
        scheduler_disc: optional LR-scheduler factory of the heads (stepped after each discriminator step).
        student: the student's input (r_init, embedding noise) and its token sampling in training.
        targets: the generator update's targets: re-masking, teacher CFG, the divergence.
        aux: the aux model's update.
        optim: stopping (``max_generator_steps``), clipping, micro-batches, dropout, frozen embeddings.
        sampling: one-step sampling at evaluation and ``dimo predict``; ``sampling.teacher`` decodes the teacher.
        gan: Soft-Di[M]O's GAN and coverage terms on real data (off by default); on, batches carry real codes.
        run: seed, ``student_init``, teacher checks, speed switches.

    The groups' fields are documented in :mod:`dimo_lightning.training.settings` (and ``dimo fit --help``); a
    group may also be a plain mapping.
    """

    def __init__(
        self,
        teacher: MaskedTeacher,
        optimizer_gen: OptimizerCallable = torch.optim.Adam,
        optimizer_aux: OptimizerCallable = torch.optim.Adam,
        optimizer_disc: OptimizerCallable = torch.optim.Adam,
        scheduler_gen: LRSchedulerCallable | None = None,
        scheduler_aux: LRSchedulerCallable | None = None,
        scheduler_disc: LRSchedulerCallable | None = None,
        student: StudentSettings = StudentSettings(),
        targets: TargetSettings = TargetSettings(),
        aux: AuxSettings = AuxSettings(),
        optim: OptimSettings = OptimSettings(),
        sampling: SamplingSettings = SamplingSettings(),
        gan: GANSettings = GANSettings(),
        run: RunSettings = RunSettings(),
    ) -> None:
        super().__init__()
        if isinstance(teacher, Mapping):  # load_from_checkpoint: the recorded class path and arguments
            teacher = MaskedTeacher.from_record(teacher)
        self.settings = s = DiMOSettings.build(student=student, targets=targets, aux=aux, optim=optim,
                                               sampling=sampling, gan=gan, run=run)
        self.save_hyperparameters(ignore=["teacher", "optimizer_gen", "optimizer_aux", "optimizer_disc",
                                          "scheduler_gen", "scheduler_aux", "scheduler_disc"])
        # Checkpoints stay plain: the teacher's record (not its weights) rebuilds it, and each group is a dict.
        try:
            self.hparams["teacher"] = teacher.init_record()
        except ValueError:
            self.hparams["teacher"] = None
        self.hparams.update(s.to_hparams())
        self.automatic_optimization = False
        self.teacher = teacher.requires_grad_(False)
        self._set_teacher_mode()
        # Student and aux start as copies of the teacher's token network; tokenizer and condition encoder stay
        # with the teacher and are never copied.
        self.student = copy.deepcopy(teacher.network).train(s.optim.train_dropout).requires_grad_(True)
        self.aux = copy.deepcopy(teacher.network).train(s.optim.train_dropout).requires_grad_(True)
        if s.optim.fix_emb_layer:
            for name in teacher.frozen_parameter_names():
                for net in (self.student, self.aux):
                    net.get_parameter(name).requires_grad_(False)
        networks = {"student": self.student, "aux": self.aux, "teacher": teacher.network}
        speed.set_full_head(networks.values(), s.run.full_output_head)
        speed.compile_networks(networks, s.run.compile_networks)
        self.optimizer_gen, self.optimizer_aux, self.optimizer_disc = optimizer_gen, optimizer_aux, optimizer_disc
        self.scheduler_gen, self.scheduler_aux, self.scheduler_disc = scheduler_gen, scheduler_aux, scheduler_disc
        self.emb_noise_scale = teacher.embedding_rms() if s.student.emb_noise_relative else 1.0
        # Counters persisted in checkpoints (global_step counts every optimizer's steps, so it cannot pace the
        # sigma schedule or the stopping rule).
        self.generator_step = self.iteration = self.skipped_steps = self.disc_step = 0
        # Lightning checkpoints omit the teacher; load them non-strictly and check the rest by hand.
        self.strict_loading = False
        # The teacher is re-loaded from its own source: keep its weights out of every state dict, so neither
        # Lightning's full checkpoints nor FSDP's distributed (DCP) checkpoints save or expect them.
        self.register_state_dict_post_hook(checkpoint_state.drop_teacher_keys)
        self.guarded_step = GuardedStep()
        self.discriminator = build_discriminator(
            feature_trunk(teacher, "gan.weight > 0"), self.seed + 1_009, s.gan.num_layers, layers=s.gan.layers,
            head_dim=s.gan.head_dim, mask_augment=s.gan.mask_augment, max_mask_ratio=s.gan.max_mask_ratio,
        ) if s.gan.enabled else None
        self.coverage = CoverageTerm(
            teacher, space=s.gan.coverage_space, num_layers=s.gan.num_layers, fake_input=s.gan.coverage_input,
            layers=s.gan.coverage_layers or (self.discriminator.layers if self.discriminator is not None else None),
            temperature=s.gan.coverage_temperature or s.sampling.temperature, pixel_pool=s.gan.coverage_pixel_pool,
        ) if s.gan.coverage_weight > 0 else None
        gan_term = GANGeneratorTerm(self.discriminator, s.gan.fake_input) if self.discriminator is not None else None
        t = s.targets
        self.generator_objective = DiMOGenerator(
            cfg_scale=t.cfg_scale, adaptive_cfg=t.adaptive_cfg, divergence_beta=t.divergence_beta,
            teacher_temperature=t.teacher_temperature, aux_temperature=t.aux_temperature, mask_schedule=t.mask_schedule,
            mask_ratio_band=t.mask_ratio_band, mask_ratio_clamp=t.mask_ratio_clamp,
            exclude_mask_from_grad=t.exclude_mask_from_grad, aux_from_student=s.aux.mode == "none", gan=gan_term,
            coverage=self.coverage, coverage_weight=s.gan.coverage_weight, gan_only=s.gan.only,
        )
        a = s.aux
        self.aux_objective = AuxUpdate(
            sample=a.sample, mask_schedule=a.mask_schedule, mask_ratio_clamp=s.targets.mask_ratio_clamp,
            label_smoothing=a.label_smoothing, soft_weight=a.soft_weight, soft_temperature=a.soft_temperature,
            cfg_drop_ratio=a.cfg_drop_ratio,
        )
        self.disc_objective = DiscriminatorUpdate(self.discriminator, s.gan.fake_input) if gan_term else None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> DiMOModule:
        """Lightning's ``load_from_checkpoint``; a checkpoint written before the settings groups is migrated in
        memory first (:func:`~dimo_lightning.training.checkpoint_state.migrated_checkpoint`)."""
        return super().load_from_checkpoint(checkpoint_state.migrated_checkpoint(checkpoint_path), *args, **kwargs)

    # ---- randomness and the student's one step -----------------------------------------------------------------
    @property
    def seed(self) -> int:
        seed = self.settings.run.seed
        return int(seed) if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def iteration_seed(self, iteration: int) -> int:
        """Seed of all draws of ``iteration`` on this rank."""
        return derive_seed(self.seed, self.global_rank, iteration, salt=17)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def draw_r_init(self, seed: int) -> float:
        """r_init of the iteration with ``seed`` (:meth:`StudentSettings.draw_r_init`)."""
        return self.settings.student.draw_r_init(seed)

    def current_sigma(self) -> float:
        return self.settings.student.sigma_at(self.generator_step)

    def student_input(self, r_init: float, sigma: float) -> StudentInput:
        return StudentInput(r_init, sigma, self.emb_noise_scale)  # the noise scale: relative to the embedding RMS

    def token_sampling(self) -> TokenSampling:
        """The student's token sampling in training (the mask id excluded when ``student.exclude_mask``)."""
        s, t = self.settings.student, self.teacher
        exclude = (t.mask_id,) if s.exclude_mask and t.logit_width > t.mask_id else ()
        return TokenSampling(s.temperature, s.top_k, s.top_p, exclude)

    def student_logits(self, network: torch.nn.Module, cond: Any, r_init: float, sigma: float,
                       generator: torch.Generator) -> torch.Tensor:
        """One forward of ``network`` on a fresh hybrid initial sequence -> logits (B, N, V)."""
        return student_logits(self.teacher, network, cond, self.student_input(r_init, sigma), generator, self.device)

    def sampling_defaults(self) -> SamplingDefaults:
        """The one-step sampling settings (the ``sampling`` group, the student's top-k/p): what ``generate`` and an
        export of this module sample with."""
        return SamplingDefaults(emb_noise_scale=float(self.emb_noise_scale), **self.settings.one_step_defaults())

    @torch.no_grad()
    def generate(self, cond: Any, network: torch.nn.Module | None = None, temperature: float | None = None,
                 r_init: float | None = None, sigma: float | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """One-step sampling: codes (B, N) in [0, K) from the student (or ``network``, e.g. its EMA) for the encoded
        conditions ``cond``, through :class:`~dimo_lightning.inference.pipeline.OneStepPipeline`.

        Runs the network in eval mode; defaults come from :meth:`sampling_defaults`.
        """
        pipeline = OneStepPipeline.from_teacher(self.teacher, self.student if network is None else network,
                                                self.sampling_defaults(), self.device)
        generator = generator or self._generator(self.iteration_seed(-1))
        return pipeline.sample_codes(cond=cond, generator=generator, temperature=temperature, r_init=r_init,
                                     emb_noise_sigma=sigma)

    # ---- Lightning hooks ----------------------------------------------------------------------------------------
    @override
    def configure_optimizers(self):
        opt_g = self.optimizer_gen([p for p in self.student.parameters() if p.requires_grad])
        opt_a = self.optimizer_aux([p for p in self.aux.parameters() if p.requires_grad])
        optimizers = [opt_g, opt_a]
        schedulers = []
        if (self.scheduler_gen is None) != (self.scheduler_aux is None):
            raise ValueError("give both scheduler_gen and scheduler_aux, or neither")
        if self.scheduler_gen is not None:
            schedulers.append({"scheduler": self.scheduler_gen(opt_g), "interval": "step"})
            schedulers.append({"scheduler": self.scheduler_aux(opt_a), "interval": "step"})
        if self.discriminator is not None:  # the third optimizer (Soft-Di[M]O), last so the first two keep places
            optimizers.append(self.optimizer_disc(list(self.discriminator.parameters())))
            if self.scheduler_disc is not None:
                schedulers.append({"scheduler": self.scheduler_disc(optimizers[2]), "interval": "step"})
        return optimizers, schedulers

    def _schedulers(self) -> tuple[Any, Any, Any]:
        """(student, aux, discriminator) schedulers, None where not configured."""
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return None, None, None
        schedulers = list(schedulers) if isinstance(schedulers, list) else [schedulers]
        sch_g = sch_a = None
        if self.scheduler_gen is not None:
            sch_g, sch_a, *schedulers = schedulers
        return sch_g, sch_a, (schedulers[0] if schedulers else None)

    def _set_teacher_mode(self) -> None:
        # Tokenizer and condition encoder always run in eval mode; only the token network's dropout is switchable
        # (the official MaskGIT code leaves it on, docs/method.md#official-defaults).
        self.teacher.eval()
        self.teacher.network.train(not self.settings.targets.teacher_eval)

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.settings.run.student_init:
            self.load_student_init(self.settings.run.student_init)

    def load_student_init(self, path: str) -> None:
        """Start from a trained Di[M]O checkpoint's networks (:func:`checkpoint_state.load_student_init`)."""
        checkpoint_state.load_student_init(self, path)

    @override
    def on_fit_start(self) -> None:
        check_data_matches_module(self, self.trainer.datamodule)
        check_real_data_matches_teacher(self.trainer.datamodule, self.teacher)
        self._set_teacher_mode()
        if self.coverage is not None:
            self.coverage.real_bank = None
            if self.settings.gan.coverage_bank > 0:
                self.coverage.build_bank(self.trainer.datamodule, self.settings.gan.coverage_bank, self.seed + 2_003,
                                         self.device)

    @override
    def on_train_epoch_start(self) -> None:
        # Lightning leaves module modes alone since 2.2, but a validation loop could have flipped them.
        self.student.train(self.settings.optim.train_dropout)
        self.aux.train(self.settings.optim.train_dropout)
        self._set_teacher_mode()

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Validate conditions while the batch is still on the host: the same check on the device would stall the
        # training step on a device-to-host read. Training batches are ConditionBatch, prediction batches
        # {"conditions", "index"}, validation batches the bare conditions (dimo_lightning.data.batch).
        conditions = batch.conditions if isinstance(batch, ConditionBatch) else (
            batch["conditions"] if isinstance(batch, dict) else batch)
        self.teacher.check_condition(conditions)
        return batch

    # ---- one iteration -----------------------------------------------------------------------------------------
    @override
    def training_step(self, batch: ConditionBatch, batch_idx: int) -> None:
        s = self.settings
        seed = self.iteration_seed(self.iteration)
        devices = [self.device] if self.device.type == "cuda" else []
        # Dropout draws from the global RNG: fork it and seed it per iteration so resumes are exact.
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(seed)
            ctx = self.iteration_context(batch, self._generator(seed), self.draw_r_init(seed))
            opt_g, opt_a, *opt_d = self.optimizers()
            sch_g, sch_a, sch_d = self._schedulers()
            logs: dict[str, Any] = {"train/r_init": ctx.student_input.r_init, "train/sigma": ctx.student_input.sigma}
            if self.iteration % s.aux.rounds == 0:
                logs.update(self._generator_update(ctx, opt_g, sch_g))
            if s.aux.mode == "full":  # aux.mode none: no aux forward, no aux step
                totals, norm, _ = self._update(opt_a, sch_a, self.aux_objective, ctx, s.optim.aux_grad_clip)
                logs.update({"train/loss_aux": totals["loss"], "train/grad_norm_aux": norm,
                             "train/valid_rows_aux": totals["kept_rows"]})
            if self.discriminator is not None:
                logs.update(self._disc_update(ctx, opt_d[0], sch_d))
            logs.update({"train/generator_step": float(self.generator_step),
                         "train/skipped_steps": float(self.skipped_steps),
                         "train/lr_gen": opt_g.param_groups[0]["lr"], "train/lr_aux": opt_a.param_groups[0]["lr"]})
            batch_size = sum(self.teacher.condition_batch_size(c) for c in ctx.conditions)
            shown = {k: logs.pop(k) for k in ("train/loss_gen", "train/loss_aux", "train/loss_disc") if k in logs}
            self.log_dict(shown, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size)
            self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=batch_size)
        self.iteration += 1
        if self.generator_step >= s.optim.max_generator_steps:
            self.trainer.should_stop = True

    def iteration_context(self, batch: ConditionBatch, generator: torch.Generator, r_init: float) -> IterationContext:
        """The iteration's conditions (encoded, split into micro-batches), real codes, student input and draws."""
        s = self.settings
        cond = move_condition(self.teacher.encode_condition(batch.conditions), self.device)
        conditions = split_condition(cond, s.optim.accumulate_micro_batches)
        real = None
        if s.gan.needs_real_data:
            if batch.real is None:
                flag = "gan.weight > 0" if s.gan.enabled else "gan.coverage_weight > 0"
                raise ValueError(f"{flag} trains on real data: the batches must carry real codes, e.g. "
                                 "--data dimo_lightning.data.real_codes.RealCodesDataModule")
            real = split_real(batch.real, conditions, self.teacher, self.device)
        gan_weight = s.gan.weight_at(self.generator_step) if self.discriminator is not None else 0.0
        return IterationContext(self.teacher, self.student, self.aux, conditions, real,
                                self.student_input(r_init, self.current_sigma()), self.token_sampling(), generator,
                                self.device, gan_weight=gan_weight)

    def _update(self, optimizer: Any, scheduler: Any, objective: Objective, ctx: IterationContext, max_norm: float,
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
        """``objective`` over the micro-batches, then one guarded step -> (mean logs, gradient norm, stepped)."""
        totals = accumulate(self, optimizer, objective, ctx)
        kept_rows = totals.get("kept_rows", torch.ones((), device=self.device))
        norm, stepped = self.guarded_step.step(self, optimizer, max_norm, kept_rows)
        if stepped and scheduler is not None:
            scheduler.step()
        return totals, norm, stepped

    def _generator_update(self, ctx: IterationContext, opt_g: Any, sch_g: Any) -> dict[str, Any]:
        totals, norm, stepped = self._update(opt_g, sch_g, self.generator_objective, ctx,
                                             self.settings.optim.gen_grad_clip)
        self.generator_step += int(stepped)
        logs = {"train/loss_gen": totals["loss"], "train/grad_norm_gen": norm,
                "train/valid_rows_gen": totals["kept_rows"]}
        zero = torch.zeros((), device=self.device)
        if self.discriminator is not None:
            logs["train/loss_gan"] = totals.get("gan", zero) / max(ctx.gan_weight, 1e-12)  # L_gan, without its weight
            logs["train/gan_weight"] = ctx.gan_weight
        if self.coverage is not None:
            logs["train/coverage_energy"] = totals.get("coverage", zero)  # ~0 when the student's and real sets agree
        return logs

    def _disc_update(self, ctx: IterationContext, opt_d: Any, sch_d: Any) -> dict[str, Any]:
        # A non-finite loss gives a non-finite norm: the step is skipped (and counted) like the other two.
        totals, norm, stepped = self._update(opt_d, sch_d, self.disc_objective, ctx, self.settings.gan.grad_clip)
        self.disc_step += int(stepped)
        return {"train/loss_disc": totals["loss"], "train/disc_accuracy": totals["accuracy"],
                "train/disc_logit_real": totals["logit_real"], "train/disc_logit_fake": totals["logit_fake"],
                "train/grad_norm_disc": norm, "train/lr_disc": opt_d.param_groups[0]["lr"],
                "train/disc_step": float(self.disc_step)}

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.guarded_step.before_optimizer_step(self, optimizer)  # the clip / skip decision (training/stepping.py)

    # ---- sharding ------------------------------------------------------------------------------------------------
    @override
    def configure_model(self) -> None:
        """FSDP2 (a strategy with a device mesh; idempotent): shard student, aux, the StudentEMA copy and the heads over
        the data-parallel mesh. The frozen teacher stays replicated: nothing of it to shard, and a replica spares two
        all-gathers per layer in each of its (CFG-doubled) forwards and in the decoder."""
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return
        dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
        if dp_mesh.ndim != 1:
            raise ValueError(f"configure_model shards over a 1-D data-parallel mesh, got {mesh}")
        if mesh.mesh_dim_names and "tensor_parallel" in mesh.mesh_dim_names and mesh["tensor_parallel"].size() > 1:
            raise ValueError("tensor parallelism is not supported: use ModelParallelStrategy(tensor_parallel_size=1)")
        # The discriminator heads (GAN on) are one small unit: sharded, their gradients are reduced over the ranks
        # like the others' (a replica outside FSDP would keep rank-local gradients and drift apart).
        for name in ("student", "aux", "student_ema", "discriminator"):
            network = getattr(self, name, None)
            if network is not None and not is_sharded(network):
                shard_network(network, dp_mesh)

    # ---- validation and prediction -----------------------------------------------------------------------------
    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing per batch: the evaluation callbacks (EvaluationReport, FIDMonitor) do the work."""

    @override
    @torch.no_grad()
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Samples for the conditions of ``batch`` (raw conditions, or ``{"conditions", "index"}`` with global sample
        indices) -> {"images": (B, C, H, W) in [0, 1], "labels": the conditions, "index": (B,) if given}.

        A text teacher (``teacher.modality == "text"``) gives {"codes": (B, L) token rows, prompts kept, "labels",
        "index"} instead: nothing is decoded here (TextSampleWriter decodes to strings as it writes)."""
        sampling = self.settings.sampling
        conditions, index = (batch["conditions"], batch["index"]) if isinstance(batch, dict) else (batch, None)
        cond = move_condition(self.teacher.encode_condition(conditions), self.device)
        # seeded by the first global index when known: the same samples on any number of ranks
        offset = int(index[0]) if index is not None and len(index) else self.global_rank * 7_919 + batch_idx
        generator = self._generator(derive_seed(sampling.predict_seed, salt=offset, modulus=SAMPLE_SEED_MODULUS))
        text = getattr(self.teacher, "modality", "image") == "text"
        pipeline = (TextPipeline if text else OneStepPipeline).from_teacher(
            self.teacher, evaluation_student(self), self.sampling_defaults(), self.device)
        if sampling.predict_with == "teacher":
            codes = self.teacher.sample(cond, generator=generator, **self.settings.teacher_sample_kwargs())
        else:
            codes = pipeline.sample_codes(cond=cond, generator=generator)
        out = {"codes": codes, "labels": conditions} if text else {"images": pipeline.decode(codes),
                                                                   "labels": conditions}
        return out if index is None else {**out, "index": index}

    # ---- checkpoints (training/checkpoint_state.py) ----------------------------------------------------------------
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint_state.save_state(self, checkpoint)

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        keys = super().load_state_dict(state_dict, strict=strict, assign=assign)
        # The teacher's keys are missing by design; load_from_checkpoint would otherwise warn about each of them
        # (on_load_checkpoint checks the rest).
        keys.missing_keys[:] = checkpoint_state.without_teacher(keys.missing_keys)
        return keys

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint_state.restore_state(self, checkpoint)
