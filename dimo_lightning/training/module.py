"""DiMOModule: Di[M]O distillation of a masked diffusion teacher into a one-step student, on Lightning manual
optimization (spec sections 1-4, with the fixes of section 10).

One training step is one Di[M]O iteration:

1. draw r_init (fixed or per-iteration from a range) and sigma (schedule over generator steps);
2. generator update (every ``aux_rounds``-th iteration), over ``accumulate_micro_batches`` micro-batches:
   x_init -> student logits z -> sample x -> mask -> teacher (CFG) and aux logits -> per-token gradient g ->
   surrogate loss -> backward (no DDP all-reduce until the last micro-batch) -> clip -> step -> scheduler;
3. aux update, every iteration: fresh (or reused) student sample -> mask -> aux cross-entropy -> clip -> step.

All random draws of an iteration come from a generator seeded by (seed, rank, iteration), and dropout runs under a
forked global RNG seeded the same way, so ranks differ and a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from dimo_lightning.core.conditions import move_condition, split_condition
from dimo_lightning.core.losses import aux_loss, distribution_matching_grad, finite_rows, generator_loss
from dimo_lightning.core.masking import (
    MASK_SCHEDULES,
    hybrid_initial_sequence,
    mask_tokens,
    parse_range,
    sample_mask_ratio,
    sigma_at,
)
from dimo_lightning.core.sampling import sample_tokens
from dimo_lightning.core.seeding import SAMPLE_SEED_MODULUS, derive_seed
from dimo_lightning.core.soft_embedding import soft_probabilities
from dimo_lightning.core.teacher_sampling import TeacherSampling
from dimo_lightning.inference.export import checkpoint_records
from dimo_lightning.inference.pipeline import OneStepPipeline, SamplingDefaults
from dimo_lightning.objectives.coverage import (
    RealFeatureBank,
    bank_rows,
    conditional_energy_distance,
    group_ids,
    pixel_features,
    trunk_features,
)
from dimo_lightning.objectives.gan import TeacherDiscriminator, default_head_layers
from dimo_lightning.teachers.base import MaskedTeacher
from dimo_lightning.training import speed
from dimo_lightning.training.config_checks import check_data_matches_module, check_teacher_unchanged
from dimo_lightning.training.distributed import clip_grads_, global_grad_norm, is_sharded, shard_network
from dimo_lightning.training.ema import evaluation_student
from dimo_lightning.training.soft_dimo import (
    GANSettings,
    check_real_data_matches_teacher,
    split_real_batch,
    student_init_state,
)

AUX_SAMPLE_MODES = ("fresh", "reuse")
AUX_MODES = ("full", "none")
MaskSchedule = Literal["linear", "square", "cosine", "arccos", "mage"]


class DiMOModule(pl.LightningModule):
    """Distills ``teacher`` into a one-step student with an auxiliary model (Di[M]O).

    Args:
        teacher: the frozen teacher (``class_path`` in YAML). Student and aux start as copies of its network. Its
            class path and arguments are recorded in every checkpoint, so ``DiMOModule.load_from_checkpoint(path)``
            rebuilds it (a ``{"class_path", "init_args"}`` mapping is accepted here for that purpose).
        optimizer_gen: optimizer factory of the student.
        optimizer_aux: optimizer factory of the aux model.
        scheduler_gen: optional LR-scheduler factory of the student (stepped after each student step).
        scheduler_aux: optional LR-scheduler factory of the aux model (stepped after each aux step).
        max_generator_steps: stop after this many student updates.
        r_init: share of masked tokens in the student's input, fixed or a [low, high] range drawn once per
            iteration (shared by the generator and aux updates of that iteration).
        emb_noise_sigma: sigma of the student's embedding perturbation (target value of the schedule).
        emb_noise_schedule: ``constant``, or a warm-up from 0 to sigma: ``linear``, ``exp``, ``cos``.
        emb_noise_warmup_steps: generator steps of the warm-up.
        emb_noise_relative: scale the noise by the RMS of the teacher's code embeddings (small models); False is
            the paper's absolute form for unit-scale embeddings.
        divergence_beta: 0 forward KL, 1 reverse KL, otherwise (1 - beta) FKL + beta RKL.
        teacher_temperature: temperature of the teacher's softmax in the divergence.
        aux_temperature: temperature of the aux softmax in the divergence.
        gen_mask_schedule: mask-ratio schedule of the generator update.
        aux_mask_schedule: mask-ratio schedule of the aux update.
        mask_ratio_clamp: optional [low, high] clamp of the mask ratios (the Meissonic recipe uses [0.02, 0.98]).
        gen_mask_ratio_band: optional [low, high]: the generator update draws its mask ratios from its schedule
            conditioned on this band (a clamp would pile the draws on the band's edges); the consistency ablation.
        teacher_cfg_scale: guidance scale of the teacher's targets (1 disables CFG).
        adaptive_cfg: per-sample scale 1 + (w - 1) * mask ratio.
        teacher_eval: keep the teacher in eval mode (no dropout in the targets); False mimics the official code.
        train_dropout: run student and aux in train mode while they learn (dropout on, as the official code);
            False runs them in eval mode: deterministic updates and, for small models on a CPU, about 1.7x
            faster iterations (dropout draws dominate there).
        aux_cfg_drop_ratio: share of aux training samples whose label is replaced by the null class.
        aux_label_smoothing: label smoothing of the aux cross-entropy.
        aux_soft_weight: weight of the soft (KL to student probabilities) aux loss; 0 is hard CE only.
        aux_soft_temperature: temperature of the soft aux loss.
        aux_rounds: aux updates per student update (the student steps on every ``aux_rounds``-th iteration).
        aux_sample: ``fresh`` draws a new student sample for the aux update (official); ``reuse`` reuses the
            generator step's detached sample and saves one student forward.
        aux_mode: ``full`` is Di[M]O; ``none`` is the ablation the paper argues against: the aux logits are replaced
            by the student's own detached logits on the re-masked sample, and the aux model is neither run nor
            trained (its weights and optimizer stay in checkpoints, unchanged).
        student_temperature: temperature of the student's token sampling (training).
        student_top_k: top-k of the student's sampling (0: off).
        student_top_p: top-p of the student's sampling (0: off).
        exclude_mask_from_samples: never let the student sample the mask id.
        exclude_mask_from_grad: zero the gradient on the mask logit.
        fix_emb_layer: freeze the token table (tied output head), output bias and positions of student and aux.
        gen_grad_clip: max gradient norm of the student (0: no clipping; norms are logged either way).
        aux_grad_clip: max gradient norm of the aux model.
        accumulate_micro_batches: split each batch into this many micro-batches, one optimizer step per update.
        sample_temperature: temperature of the student's one-step sampling at evaluation.
        sample_r_init: r_init at evaluation (None: the midpoint of ``r_init``).
        sample_emb_noise_sigma: sigma at evaluation (None: ``emb_noise_sigma``).
        predict_with: what ``dimo predict`` samples: the (EMA) student in one step, or the teacher.
        predict_seed: seed of ``dimo predict`` samples.
        teacher_sampling: how the teacher is decoded wherever it is sampled (``dimo predict`` with
            ``predict_with: teacher`` and the EvaluationReport): steps, cfg_scale (None: ``teacher_cfg_scale``),
            choice_temperature, schedule, softmax_temperature, cfg_ramp.
        allow_teacher_change: resume (``--ckpt_path``) with a teacher other than the one the checkpoint was trained
            against; without it that is an error naming both.
        seed: base seed of all random draws (None: the CLI's ``seed_everything`` value, else 0).
        full_output_head: compute the networks' output head over all positions and ids before slicing (the
            reference computation, a benchmark baseline); False computes only the returned logits (same values).
        compile_networks: which networks to ``torch.compile`` in place (``student``, ``aux``, ``teacher``); the
            checkpoint layout is unchanged. Pays off on GPUs; measure with ``dimo bench`` before using it on a CPU.
        gan: Soft-Di[M]O's GAN on real data (:class:`~dimo_lightning.training.soft_dimo.GANSettings`); None or weight 0 is
            off (data-free Di[M]O). On, the batches must be ``(labels, real codes)`` (``RealCodesDataModule``).
        optimizer_disc: optimizer factory of the discriminator heads (the third optimizer; only with the GAN).
        scheduler_disc: optional LR-scheduler factory of the heads (stepped after each discriminator step).
        student_init: a trained Di[M]O checkpoint whose student (and aux and EMA, where present) weights the fit
            starts from (loaded in ``setup``; a ``--ckpt_path`` resume overrides them). A two-optimizer run cannot
            be resumed with the GAN on (``--ckpt_path`` restores optimizers one for one): this starts a new one.
    """

    def __init__(
        self,
        teacher: MaskedTeacher,
        optimizer_gen: OptimizerCallable = torch.optim.Adam,
        optimizer_aux: OptimizerCallable = torch.optim.Adam,
        scheduler_gen: LRSchedulerCallable | None = None,
        scheduler_aux: LRSchedulerCallable | None = None,
        max_generator_steps: int = 1000,
        r_init: float | list[float] = 0.6,
        emb_noise_sigma: float = 0.1,
        emb_noise_schedule: Literal["constant", "linear", "exp", "cos"] = "constant",
        emb_noise_warmup_steps: int = 0,
        emb_noise_relative: bool = False,
        divergence_beta: float = 0.0,
        teacher_temperature: float = 1.0,
        aux_temperature: float = 1.0,
        gen_mask_schedule: MaskSchedule = "arccos",
        aux_mask_schedule: MaskSchedule = "arccos",
        mask_ratio_clamp: list[float] | None = None,
        gen_mask_ratio_band: list[float] | None = None,
        teacher_cfg_scale: float = 2.0,
        adaptive_cfg: bool = False,
        teacher_eval: bool = True,
        train_dropout: bool = True,
        aux_cfg_drop_ratio: float = 0.0,
        aux_label_smoothing: float = 0.1,
        aux_soft_weight: float = 0.0,
        aux_soft_temperature: float = 1.0,
        aux_rounds: int = 1,
        aux_sample: Literal["fresh", "reuse"] = "fresh",
        aux_mode: Literal["full", "none"] = "full",
        student_temperature: float = 1.0,
        student_top_k: int = 0,
        student_top_p: float = 0.0,
        exclude_mask_from_samples: bool = True,
        exclude_mask_from_grad: bool = False,
        fix_emb_layer: bool = True,
        gen_grad_clip: float = 1.0,
        aux_grad_clip: float = 1.0,
        accumulate_micro_batches: int = 1,
        sample_temperature: float = 1.0,
        sample_r_init: float | None = None,
        sample_emb_noise_sigma: float | None = None,
        predict_with: Literal["student", "teacher"] = "student",
        predict_seed: int = 0,
        seed: int | None = None,
        teacher_sampling: TeacherSampling | None = None,
        allow_teacher_change: bool = False,
        full_output_head: bool = False,
        compile_networks: list[Literal["student", "aux", "teacher"]] | None = None,
        gan: GANSettings | None = None,
        optimizer_disc: OptimizerCallable = torch.optim.Adam,
        scheduler_disc: LRSchedulerCallable | None = None,
        student_init: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(teacher, Mapping):  # load_from_checkpoint: the recorded class path and arguments
            teacher = MaskedTeacher.from_record(teacher)
        self.save_hyperparameters(
            ignore=["teacher", "optimizer_gen", "optimizer_aux", "scheduler_gen", "scheduler_aux", "optimizer_disc",
                    "scheduler_disc"]
        )
        # Record the teacher (not its weights) so that checkpoints rebuild it, and keep hyperparameters plain.
        try:
            self.hparams["teacher"] = teacher.init_record()
        except ValueError:
            self.hparams["teacher"] = None
        self.teacher_sampling = TeacherSampling.coerce(teacher_sampling)
        self.hparams["teacher_sampling"] = self.teacher_sampling.to_dict()
        self.gan = GANSettings.coerce(gan)
        self.hparams["gan"] = self.gan.to_dict()
        self.automatic_optimization = False
        self._validate()
        self.r_init_range = parse_range(r_init, "r_init")
        self.teacher = teacher
        self.teacher.requires_grad_(False)
        self._set_teacher_mode()
        # Student and aux start as copies of the teacher's token network; tokenizer and condition encoder stay
        # with the teacher and are never copied.
        self.student = copy.deepcopy(teacher.network).train(train_dropout).requires_grad_(True)
        self.aux = copy.deepcopy(teacher.network).train(train_dropout).requires_grad_(True)
        if fix_emb_layer:
            for name in teacher.frozen_parameter_names():
                for net in (self.student, self.aux):
                    net.get_parameter(name).requires_grad_(False)
        networks = {"student": self.student, "aux": self.aux, "teacher": teacher.network}
        speed.set_full_head(networks.values(), full_output_head)
        speed.compile_networks(networks, compile_networks)
        self.optimizer_gen = optimizer_gen
        self.optimizer_aux = optimizer_aux
        self.scheduler_gen = scheduler_gen
        self.scheduler_aux = scheduler_aux
        self.emb_noise_scale = teacher.embedding_rms() if emb_noise_relative else 1.0
        # Counters persisted in checkpoints (global_step counts both optimizers' steps, so it cannot pace the
        # sigma schedule or the stopping rule).
        self.generator_step = 0
        self.iteration = 0
        self.skipped_steps = 0
        # Lightning checkpoints omit the teacher; load them non-strictly and check the rest by hand.
        self.strict_loading = False
        # The teacher is re-loaded from its own source: keep its weights out of every state dict, so neither
        # Lightning's full checkpoints nor FSDP's distributed (DCP) checkpoints save or expect them.
        self.register_state_dict_post_hook(_drop_teacher_keys)
        self._pending_step: _PendingStep | None = None
        self.optimizer_disc = optimizer_disc
        self.scheduler_disc = scheduler_disc
        self.disc_step = 0
        self.discriminator = self._build_discriminator(teacher)
        self.coverage_layers = self._coverage_layers(teacher)
        self.real_bank: RealFeatureBank | None = None  # built at fit start when gan.coverage_bank > 0

    def _validate(self) -> None:
        hp = self.hparams
        for name in ("gen_mask_schedule", "aux_mask_schedule"):
            if hp[name] not in MASK_SCHEDULES:
                raise ValueError(f"{name} must be one of {', '.join(MASK_SCHEDULES)}, got {hp[name]!r}")
        if hp.aux_mode not in AUX_MODES:
            raise ValueError(f"aux_mode must be one of {', '.join(AUX_MODES)}, got {hp.aux_mode!r}")
        band = hp.gen_mask_ratio_band
        if band is not None and (len(band) != 2 or not 0.0 <= band[0] <= band[1] <= 1.0):
            raise ValueError(f"gen_mask_ratio_band must be [low, high] within [0, 1], got {band}")
        if hp.aux_sample not in AUX_SAMPLE_MODES:
            raise ValueError(f"aux_sample must be one of {', '.join(AUX_SAMPLE_MODES)}, got {hp.aux_sample!r}")
        for name in ("max_generator_steps", "aux_rounds", "accumulate_micro_batches"):
            if hp[name] < 1:
                raise ValueError(f"{name} must be >= 1, got {hp[name]}")
        if not 0.0 <= hp.emb_noise_sigma <= 1.0:
            raise ValueError(f"emb_noise_sigma must lie in [0, 1], got {hp.emb_noise_sigma}")
        if not 0.0 <= hp.aux_cfg_drop_ratio < 1.0:
            raise ValueError(f"aux_cfg_drop_ratio must lie in [0, 1), got {hp.aux_cfg_drop_ratio}")
        if not 0.0 <= hp.aux_soft_weight <= 1.0:
            raise ValueError(f"aux_soft_weight must lie in [0, 1], got {hp.aux_soft_weight}")
        for name in ("teacher_temperature", "aux_temperature", "student_temperature", "sample_temperature"):
            if hp[name] <= 0:
                raise ValueError(f"{name} must be > 0, got {hp[name]}")
        if hp.mask_ratio_clamp is not None and (
            len(hp.mask_ratio_clamp) != 2 or not 0.0 <= hp.mask_ratio_clamp[0] <= hp.mask_ratio_clamp[1] <= 1.0
        ):
            raise ValueError(f"mask_ratio_clamp must be [low, high] within [0, 1], got {hp.mask_ratio_clamp}")
        parse_range(hp.r_init, "r_init")

    # ---- randomness --------------------------------------------------------------------------------------------
    @property
    def seed(self) -> int:
        if self.hparams.seed is not None:
            return int(self.hparams.seed)
        import os

        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def iteration_seed(self, iteration: int) -> int:
        """Seed of all draws of ``iteration`` on this rank."""
        return derive_seed(self.seed, self.global_rank, iteration, salt=17)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def draw_r_init(self, seed: int) -> float:
        """r_init of the iteration with ``seed``: a host-side draw (a Python float decides the mask count, so no
        device value has to be read back)."""
        low, high = self.r_init_range
        if low == high:
            return low
        return low + (high - low) * random.Random(seed).random()

    def current_sigma(self) -> float:
        hp = self.hparams
        return sigma_at(self.generator_step, hp.emb_noise_sigma, hp.emb_noise_schedule, hp.emb_noise_warmup_steps)

    # ---- the student ------------------------------------------------------------------------------------------
    def _exclude_ids(self) -> tuple[int, ...]:
        t = self.teacher
        return (t.mask_id,) if self.hparams.exclude_mask_from_samples and t.logit_width > t.mask_id else ()

    def student_logits(
        self,
        network: nn.Module,
        cond: Any,
        r_init: float,
        sigma: float,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """One forward of ``network`` on a fresh hybrid initial sequence -> logits (B, N, V)."""
        t = self.teacher
        b = t.condition_batch_size(cond)
        x_init = hybrid_initial_sequence(b, t.seq_len, t.codebook_size, r_init, t.mask_id, generator, self.device)
        return t.apply_network(network, x_init, cond, None, sigma, self.emb_noise_scale, generator)

    def sampling_defaults(self) -> SamplingDefaults:
        """The evaluation sampling settings (``sample_*``, ``student_top_k/p``): what ``generate`` and an export
        of this module sample with."""
        return SamplingDefaults.from_hparams(self.hparams, self.emb_noise_scale)

    @torch.no_grad()
    def generate(
        self,
        cond: Any,
        network: nn.Module | None = None,
        temperature: float | None = None,
        r_init: float | None = None,
        sigma: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
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
        gen_params = [p for p in self.student.parameters() if p.requires_grad]
        aux_params = [p for p in self.aux.parameters() if p.requires_grad]
        opt_g = self.optimizer_gen(gen_params)
        opt_a = self.optimizer_aux(aux_params)
        optimizers = [opt_g, opt_a]
        schedulers = []
        if self.scheduler_gen is not None:
            schedulers.append({"scheduler": self.scheduler_gen(opt_g), "interval": "step"})
        if self.scheduler_aux is not None:
            schedulers.append({"scheduler": self.scheduler_aux(opt_a), "interval": "step"})
        if (self.scheduler_gen is None) != (self.scheduler_aux is None):
            raise ValueError("give both scheduler_gen and scheduler_aux, or neither")
        if self.discriminator is not None:  # the third optimizer (Soft-Di[M]O), last so the first two keep places
            optimizers.append(self.optimizer_disc(list(self.discriminator.parameters())))
            if self.scheduler_disc is not None:
                schedulers.append({"scheduler": self.scheduler_disc(optimizers[2]), "interval": "step"})
        return optimizers, schedulers

    def _set_teacher_mode(self) -> None:
        # Tokenizer and condition encoder always run in eval mode; only the token network's dropout is switchable
        # (the official MaskGIT code leaves it on, spec section 4).
        self.teacher.eval()
        self.teacher.network.train(not self.hparams.teacher_eval)

    @override
    def on_fit_start(self) -> None:
        check_data_matches_module(self, self.trainer.datamodule)
        check_real_data_matches_teacher(self.trainer.datamodule, self.teacher)
        self._set_teacher_mode()
        self.real_bank = self._build_real_bank() if self.gan.coverage_bank > 0 else None

    @override
    def on_train_epoch_start(self) -> None:
        # Lightning leaves module modes alone since 2.2, but a validation loop could have flipped them.
        self.student.train(self.hparams.train_dropout)
        self.aux.train(self.hparams.train_dropout)
        self._set_teacher_mode()

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Validate conditions while the batch is still on the host: the same check on the device would stall the
        # training step on a device-to-host read.
        # Prediction batches carry their global indices: {"conditions": ..., "index": ...}.
        self.teacher.check_condition(batch["conditions"] if isinstance(batch, dict) else batch)
        return batch

    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        seed = self.iteration_seed(self.iteration)
        devices = [self.device] if self.device.type == "cuda" else []
        # Dropout draws from the global RNG: fork it and seed it per iteration so resumes are exact.
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(seed)
            generator = self._generator(seed)
            self._iteration(batch, generator, self.draw_r_init(seed))
        self.iteration += 1
        if self.generator_step >= self.hparams.max_generator_steps:
            self.trainer.should_stop = True

    def _iteration(self, batch: Any, generator: torch.Generator, r_init: float) -> None:
        hp = self.hparams
        opt_g, opt_a, *opt_rest = self.optimizers()
        sch_g, sch_a, sch_d = self._schedulers()
        batch, real_codes = split_real_batch(batch)
        cond = move_condition(self.teacher.encode_condition(batch), self.device)
        micro_conds = split_condition(cond, hp.accumulate_micro_batches)
        sigma = self.current_sigma()
        logs: dict[str, Any] = {"train/r_init": r_init, "train/sigma": sigma}

        real_parts = self._real_parts(real_codes, micro_conds) if self.gan.needs_real_data else None
        reuse: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if self.iteration % hp.aux_rounds == 0:
            reuse, gen_logs = self._generator_update(opt_g, sch_g, micro_conds, r_init, sigma, generator,
                                                     real_parts)
            logs.update(gen_logs)
        if hp.aux_mode == "full":  # aux_mode none: no aux forward, no aux step
            logs.update(self._aux_update(opt_a, sch_a, micro_conds, reuse, r_init, sigma, generator))
        if self.discriminator is not None:
            logs.update(self._disc_update(opt_rest[0], sch_d, micro_conds, real_parts, reuse, r_init, sigma,
                                          generator))
        logs["train/generator_step"] = float(self.generator_step)
        logs["train/skipped_steps"] = float(self.skipped_steps)
        logs["train/lr_gen"] = opt_g.param_groups[0]["lr"]
        logs["train/lr_aux"] = opt_a.param_groups[0]["lr"]
        batch_size = self.teacher.condition_batch_size(cond)
        shown = {k: logs.pop(k) for k in ("train/loss_gen", "train/loss_aux", "train/loss_disc") if k in logs}
        self.log_dict(shown, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=batch_size)

    def _generator_update(self, opt_g, sch_g, micro_conds, r_init, sigma, generator, real_parts=None):
        hp = self.hparams
        t = self.teacher
        parts = len(micro_conds)
        samples = []
        loss_total = torch.zeros((), device=self.device)
        gan_total = torch.zeros((), device=self.device)
        coverage_total = torch.zeros((), device=self.device)
        kept_rows = torch.zeros((), device=self.device)
        gan_weight = self.gan.weight_at(self.generator_step) if self.discriminator is not None else 0.0
        for i, cond in enumerate(micro_conds):
            with opt_g.toggle_model(sync_grad=i == parts - 1):
                z = self.student_logits(self.student, cond, r_init, sigma, generator)  # (B, N, V)
                if self.gan.only:  # ablation: L_gan alone, no teacher or aux forward
                    with torch.no_grad():
                        x = sample_tokens(z.detach(), hp.student_temperature, hp.student_top_k, hp.student_top_p,
                                          self._exclude_ids(), generator)
                        valid = finite_rows(z.detach())
                    loss = gan_weight * self._gan_generator_loss(z, x, cond, valid, generator)
                    self.manual_backward(loss / parts)
                    samples.append((x, z.detach()))
                    gan_total += loss.detach() / parts
                    loss_total += loss.detach() / parts
                    kept_rows += valid.float().mean() / parts
                    continue
                with torch.no_grad():
                    x = sample_tokens(z.detach(), hp.student_temperature, hp.student_top_k, hp.student_top_p,
                                      self._exclude_ids(), generator)  # (B, N)
                    ratio = sample_mask_ratio(x.shape[0], hp.gen_mask_schedule, generator, self.device,
                                              hp.mask_ratio_clamp, band=hp.gen_mask_ratio_band)
                    x_t, mask = mask_tokens(x, ratio, t.mask_id, generator)
                    # A Python float when the scale is fixed: the teacher decides "no CFG" without a device read.
                    adaptive = hp.adaptive_cfg and hp.teacher_cfg_scale != 1
                    scale = 1 + (hp.teacher_cfg_scale - 1) * ratio if adaptive else float(hp.teacher_cfg_scale)
                    teacher_logits = t.guided_logits(t.network, x_t, cond, scale)
                    # aux_mode none: the student's own (detached, no_grad) logits on the re-masked sample.
                    aux_logits = t.apply_network(self.aux if hp.aux_mode == "full" else self.student, x_t, cond)
                    grad = distribution_matching_grad(
                        teacher_logits, aux_logits, hp.divergence_beta,
                        teacher_temperature=hp.teacher_temperature, aux_temperature=hp.aux_temperature,
                    )
                    if hp.exclude_mask_from_grad and grad.shape[-1] > t.mask_id:
                        grad[..., t.mask_id] = 0
                    valid = finite_rows(z.detach(), teacher_logits, aux_logits)
                loss = generator_loss(z, grad, mask, row_weight=valid)
                if gan_weight > 0:  # Soft-Di[M]O: + w_gan * L_gan through the soft embedding path
                    gan_term = gan_weight * self._gan_generator_loss(z, x, cond, valid, generator)
                    gan_total += gan_term.detach() / parts
                    loss = loss + gan_term
                if self.gan.coverage_weight > 0:  # the energy distance to the real codes, per class
                    coverage_loss, coverage_value = self._coverage_loss(z, x, cond, valid, real_parts[i])
                    coverage_total += coverage_value / parts
                    loss = loss + self.gan.coverage_weight * coverage_loss
                self.manual_backward(loss / parts)
            samples.append((x, z.detach()))
            loss_total += loss.detach() / parts
            kept_rows += valid.float().mean() / parts
        norm, stepped = self._clip_and_step(opt_g, hp.gen_grad_clip, kept_rows)
        if stepped:
            self.generator_step += 1
            if sch_g is not None:
                sch_g.step()
        logs = {
            "train/loss_gen": loss_total,
            "train/grad_norm_gen": norm,
            "train/valid_rows_gen": kept_rows,
        }
        if self.discriminator is not None:
            logs["train/loss_gan"] = gan_total / max(gan_weight, 1e-12)  # L_gan itself, without its weight
            logs["train/gan_weight"] = gan_weight
        if self.gan.coverage_weight > 0:
            logs["train/coverage_energy"] = coverage_total  # ~0 when the student's and the real sets agree
        return samples, logs

    def _aux_update(self, opt_a, sch_a, micro_conds, reuse, r_init, sigma, generator):
        hp = self.hparams
        t = self.teacher
        parts = len(micro_conds)
        loss_total = torch.zeros((), device=self.device)
        kept_rows = torch.zeros((), device=self.device)
        for i, cond in enumerate(micro_conds):
            with opt_a.toggle_model(sync_grad=i == parts - 1):
                with torch.no_grad():
                    if hp.aux_sample == "reuse" and reuse is not None:
                        x, z = reuse[i]
                    else:
                        z = self.student_logits(self.student, cond, r_init, sigma, generator)
                        x = sample_tokens(z, hp.student_temperature, hp.student_top_k, hp.student_top_p,
                                          self._exclude_ids(), generator)
                    b = x.shape[0]
                    drop = None
                    if hp.aux_cfg_drop_ratio > 0:
                        drop = torch.rand(b, generator=generator, device=self.device) < hp.aux_cfg_drop_ratio
                    ratio = sample_mask_ratio(b, hp.aux_mask_schedule, generator, self.device, hp.mask_ratio_clamp)
                    x_t, mask = mask_tokens(x, ratio, t.mask_id, generator)
                    soft = (z.float() / hp.aux_soft_temperature).softmax(-1) if hp.aux_soft_weight > 0 else None
                logits = t.apply_network(self.aux, x_t, cond, drop)
                valid = finite_rows(logits.detach(), z)
                loss = aux_loss(logits, x, mask, hp.aux_label_smoothing, soft, hp.aux_soft_weight,
                                hp.aux_soft_temperature, row_weight=valid)
                self.manual_backward(loss / parts)
            loss_total += loss.detach() / parts
            kept_rows += valid.float().mean() / parts
        norm, stepped = self._clip_and_step(opt_a, hp.aux_grad_clip, kept_rows)
        if stepped and sch_a is not None:
            sch_a.step()
        return {
            "train/loss_aux": loss_total,
            "train/grad_norm_aux": norm,
            "train/valid_rows_aux": kept_rows,
        }

    # ---- Soft-Di[M]O: the GAN on real data (third optimizer) ---------------------------------------------------
    def _build_discriminator(self, teacher: MaskedTeacher) -> TeacherDiscriminator | None:
        """The discriminator heads when the GAN is on (a submodule: its weights are checkpointed as
        ``discriminator.*``); the trunk is the teacher's network, passed to every call and never owned."""
        if not self.gan.enabled:
            return None
        trunk = self._feature_trunk(teacher, "gan.weight > 0")
        # The heads' initial weights are a function of the module's seed, not of whatever drew from the global RNG
        # before (so a run and its resumed copy, built in any order, agree).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1_009)
            return TeacherDiscriminator.for_trunk(
                trunk, self.gan.num_layers, layers=self.gan.layers, head_dim=self.gan.head_dim,
                mask_augment=self.gan.mask_augment, max_mask_ratio=self.gan.max_mask_ratio,
            )

    @staticmethod
    def _feature_trunk(teacher: MaskedTeacher, flag: str) -> nn.Module:
        """The teacher's network, which the GAN heads and the coverage term run as a frozen feature trunk; a
        ``ValueError`` naming ``flag`` when it has no ``forward_features``."""
        trunk = teacher.network
        if not callable(getattr(trunk, "forward_features", None)):
            raise ValueError(
                f"{flag} needs a teacher network with forward_features (a MaskTransformer) as the frozen feature "
                f"trunk; {type(teacher).__name__}'s network is a {type(trunk).__name__}"
            )
        return trunk

    def _coverage_layers(self, teacher: MaskedTeacher) -> tuple[int, ...]:
        """The trunk layers of the coverage term's features (empty when it is off or measures pixels)."""
        if self.gan.coverage_weight <= 0:
            return ()
        if self.gan.coverage_space == "pixels":
            if not callable(getattr(teacher, "decode_soft", None)):
                raise ValueError(f"gan.coverage_space pixels needs a teacher with a differentiable decode "
                                 f"(decode_soft); {type(teacher).__name__} has none: use coverage_space trunk")
            return ()
        trunk = self._feature_trunk(teacher, "gan.coverage_weight > 0")
        if self.gan.coverage_layers:
            return tuple(self.gan.coverage_layers)
        if self.discriminator is not None:
            return self.discriminator.layers
        return default_head_layers(len(trunk.transformer.layers), self.gan.num_layers)

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

    @contextmanager
    def _trunk_in_eval(self) -> Iterator[None]:
        # The discriminator's features are deterministic (no dropout) whatever teacher_eval says of the targets.
        network = self.teacher.network
        was_training = network.training
        network.eval()
        try:
            yield
        finally:
            network.train(was_training)

    def _gan_generator_loss(self, z: torch.Tensor, x: torch.Tensor, cond: Any, valid: torch.Tensor,
                            generator: torch.Generator) -> torch.Tensor:
        """L_gan (non-saturating) of student logits z (B, N, V) with grad; x (B, N) their samples (used only by the
        straight-through input, as constants); rows not ``valid`` are left out."""
        tokens = x if self.gan.fake_input == "straight_through" else None
        with self._trunk_in_eval():
            return self.discriminator.generator_loss(self.teacher.network, z, cond, generator, row_weight=valid,
                                                     tokens=tokens)

    def _real_parts(self, real_codes: torch.Tensor | None, micro_conds: list[Any]) -> tuple[torch.Tensor, ...]:
        """The batch's real codes (B, N), on the device, split like the conditions into micro-batches."""
        if real_codes is None:
            flag = "gan.weight > 0" if self.gan.enabled else "gan.coverage_weight > 0"
            raise ValueError(
                f"{flag} trains on real data: the batches must be (labels, real codes), e.g. "
                "--data dimo_lightning.data.real_codes.RealCodesDataModule"
            )
        parts = len(micro_conds)
        real_parts = real_codes.to(self.device).chunk(parts)
        if [len(r) for r in real_parts] != [self.teacher.condition_batch_size(c) for c in micro_conds]:
            raise ValueError(f"real codes batch of {len(real_codes)} rows does not match its {parts} micro-batches")
        return real_parts

    def _coverage_loss(self, z: torch.Tensor, x: torch.Tensor, cond: Any, valid: torch.Tensor,
                       real_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(differentiable energy-distance loss, its full detached estimate) of student logits z (B, N, V) against
        the micro-batch's real codes (B, N) of the same conditions; rows not ``valid`` are left out. The soft
        embeddings come from ``z / coverage_temperature`` (null: ``sample_temperature``)."""
        trunk = self.teacher.network
        keep = valid.bool()
        temperature = self.gan.coverage_temperature or self.hparams.sample_temperature
        z = z / temperature if temperature != 1 else z
        tokens = x if self.gan.coverage_input == "straight_through" else None
        groups = group_ids(cond, z.shape[0])
        fake_cond = cond[keep] if groups is not None else cond
        fake_groups = groups[keep] if groups is not None else None
        fake_tokens = tokens[keep] if tokens is not None else None
        with self._trunk_in_eval():
            if self.gan.coverage_space == "pixels":
                fake_features = self._pixel_coverage_features(z[keep], fake_tokens)
            else:
                fake = TeacherDiscriminator.student_embeddings(trunk, z[keep], fake_tokens)
                fake_features = trunk_features(trunk, fake, fake_cond, self.coverage_layers)
            if self.real_bank is not None and fake_groups is not None:
                return conditional_energy_distance(fake_features, self.real_bank.features, fake_groups,
                                                   self.real_bank.labels, real_within=self.real_bank.within)
            with torch.no_grad():
                real_features = self._real_coverage_features(real_codes, cond)
        return conditional_energy_distance(fake_features, real_features, fake_groups, groups)

    def _pixel_coverage_features(self, z: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """Pixel-space coverage features of (tempered) student logits z (B, N, V): the tokenizer's differentiable
        decode of ``softmax(z[..., :K])``, or with ``tokens`` (B, N) the straight-through probabilities
        ``one_hot(tokens) + p - sg(p)``, pooled (:func:`pixel_features`)."""
        k = self.teacher.codebook_size
        probs = soft_probabilities(z, k)
        if tokens is not None:
            probs = F.one_hot(tokens.long(), k).to(probs.dtype) + probs - probs.detach()
        return pixel_features(self.teacher.decode_soft(probs), self.gan.coverage_pixel_pool)

    @torch.no_grad()
    def _real_coverage_features(self, codes: torch.Tensor, cond: Any) -> torch.Tensor:
        """Coverage features of real codes (B, N) of conditions ``cond``, in ``gan.coverage_space``."""
        if self.gan.coverage_space == "pixels":
            return pixel_features(self.teacher.decode(codes.reshape(codes.shape[0], -1)),
                                  self.gan.coverage_pixel_pool)
        trunk = self.teacher.network
        return trunk_features(trunk, TeacherDiscriminator.real_embeddings(trunk, codes), cond, self.coverage_layers)

    def _build_real_bank(self) -> RealFeatureBank:
        """The coverage term's real bank (``gan.coverage_bank``): trunk features of that many real sequences of the
        DataModule's codes, drawn with the module's seed (the same bank on every rank and after a resume)."""
        import numpy as np

        datamodule = self.trainer.datamodule
        if not callable(getattr(datamodule, "load", None)):
            raise ValueError("gan.coverage_bank > 0 needs a RealCodesDataModule (its codes fill the bank)")
        data = datamodule.load()
        rows = bank_rows(len(data), self.gan.coverage_bank, self.seed + 2_003).numpy()
        codes = torch.as_tensor(np.asarray(data.codes[rows]))
        labels = torch.as_tensor(np.asarray(data.labels[rows])).long()
        num_classes = int(getattr(self.teacher, "num_classes", int(labels.max()) + 1))
        with self._trunk_in_eval():
            features = torch.cat([
                self._real_coverage_features(chunk.to(self.device).long(), chunk_labels.to(self.device))
                for chunk, chunk_labels in zip(codes.split(256), labels.split(256), strict=True)
            ])
        bank = RealFeatureBank(features, labels.to(self.device), num_classes)
        megabytes = bank.features.numel() * bank.features.element_size() / 2**20
        rank_zero_info(f"coverage bank: {len(rows)} real sequences, {megabytes:.0f} MB of features")
        return bank

    def _disc_update(self, opt_d, sch_d, micro_conds, real_parts, reuse, r_init, sigma, generator):
        """One discriminator step: real codes of the batch vs the student's (detached) logits of this iteration's
        generator step (a fresh no-grad student forward when the generator did not step)."""
        hp = self.hparams
        parts = len(micro_conds)
        totals = {name: torch.zeros((), device=self.device) for name in ("loss", "logit_real", "logit_fake",
                                                                           "accuracy")}
        with self._trunk_in_eval():
            for i, cond in enumerate(micro_conds):
                with opt_d.toggle_model(sync_grad=i == parts - 1):
                    if reuse is not None:
                        x, z = reuse[i]
                    else:
                        with torch.no_grad():
                            z = self.student_logits(self.student, cond, r_init, sigma, generator)
                            x = sample_tokens(z, hp.student_temperature, hp.student_top_k, hp.student_top_p,
                                              self._exclude_ids(), generator)
                    tokens = x if self.gan.fake_input == "straight_through" else None
                    loss, stats = self.discriminator.discriminator_loss(
                        self.teacher.network, real_parts[i], cond, z, cond, generator, tokens=tokens
                    )
                    self.manual_backward(loss / parts)
                totals["loss"] += loss.detach() / parts
                for name in ("logit_real", "logit_fake", "accuracy"):
                    totals[name] += stats[name] / parts
        # A non-finite loss gives a non-finite norm: the step is skipped (and counted) like the other two.
        norm, stepped = self._clip_and_step(opt_d, self.gan.grad_clip, torch.ones((), device=self.device))
        if stepped:
            self.disc_step += 1
            if sch_d is not None:
                sch_d.step()
        return {
            "train/loss_disc": totals["loss"],
            "train/disc_accuracy": totals["accuracy"],
            "train/disc_logit_real": totals["logit_real"],
            "train/disc_logit_fake": totals["logit_fake"],
            "train/grad_norm_disc": norm,
            "train/lr_disc": opt_d.param_groups[0]["lr"],
            "train/disc_step": float(self.disc_step),
        }

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.get("student_init"):
            self.load_student_init(self.hparams.student_init)

    def load_student_init(self, path: str) -> None:
        """Copy student, aux and EMA weights of a trained Di[M]O checkpoint into this module (``student_init``).

        The EMA (``student_ema``, present once StudentEMA has set up) takes the checkpoint's average, else its
        student; the aux model keeps the teacher's copy if the checkpoint has none. The teacher must match the
        checkpoint's (unless ``allow_teacher_change``).
        """
        networks, saved_teacher = student_init_state(path)
        check_teacher_unchanged(saved_teacher, self.hparams.get("teacher"), f"{path} (student_init)",
                                self.hparams.get("allow_teacher_change", False))
        targets = {"student": self.student, "aux": self.aux, "student_ema": getattr(self, "student_ema", None)}
        sources = {"student": "student", "aux": "aux" if "aux" in networks else None,
                   "student_ema": "student_ema" if "student_ema" in networks else "student"}
        for name, network in targets.items():
            if network is None or sources[name] is None:
                continue
            try:
                network.load_state_dict(networks[sources[name]])
            except RuntimeError as err:
                raise ValueError(f"student_init: the {sources[name]} weights of {path} do not fit this teacher's "
                                 f"network: {str(err).splitlines()[0]}") from err

    def _clip_and_step(self, optimizer, max_norm: float, kept_rows: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Step ``optimizer`` through Lightning's precision plugin; clipping and the skip decision happen in
        :meth:`on_before_optimizer_step`, i.e. after the plugin has unscaled the gradients (``16-mixed``).

        A step is skipped (no weight or optimizer-state change, counted in ``skipped_steps``) when the global gradient
        norm is not finite (a fp16 overflow included: the GradScaler then skips and lowers its scale) or no rank
        kept a valid row.

        Args:
            optimizer: the LightningOptimizer of the student or the aux model.
            max_norm: clipping threshold of the global L2 norm (0: no clipping).
            kept_rows: (,) share of valid rows of this rank's batch.

        Returns:
            (pre-clipping global gradient norm (,) on device, whether the weights were updated).
        """
        self._pending_step = _PendingStep(max_norm, kept_rows.detach().float())
        try:
            optimizer.step()
            decision = self._pending_step
        finally:
            self._pending_step = None
        optimizer.zero_grad(set_to_none=True)
        if decision.stepped is None:
            raise RuntimeError("the precision plugin stepped without calling on_before_optimizer_step")
        if not decision.stepped:
            self.skipped_steps += 1
        return decision.norm, decision.stepped

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        pending = self._pending_step
        if pending is None:
            return
        if pending.max_norm > 0 and getattr(self.trainer.precision_plugin, "scaler", None) is not None and getattr(
            optimizer, "_step_supports_amp_scaling", False
        ):
            # Such (fused) optimizers unscale inside step(): the gradients here are still scaled (Lightning's own
            # clip_gradients refuses them for the same reason).
            raise RuntimeError(
                f"{type(optimizer).__name__} unscales gradients inside step(), so they cannot be clipped under "
                "16-mixed: use a non-fused optimizer, bf16-mixed, or gen_grad_clip/aux_grad_clip 0"
            )
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm, plain_norm = global_grad_norm(params)  # global over ranks and shards, computed once
        plain_norm = plain_norm.to(self.device)
        kept_anywhere = self.trainer.strategy.reduce(pending.kept_rows, reduce_op="sum") > 0
        step_ok = torch.isfinite(plain_norm) & kept_anywhere
        # The one host sync of an optimizer step: whether to step. Norm and row count are global, so every rank
        # takes the same decision and the replicas (or shards) stay consistent.
        pending.stepped = bool(step_ok)
        pending.norm = plain_norm.detach()
        if pending.stepped:
            clip_grads_(params, pending.max_norm, norm)
        else:
            # No gradient, no update: torch optimizers skip parameters without .grad (momentum must not move the
            # weights); under 16-mixed the GradScaler skips an overflow step itself and still updates its scale.
            optimizer.zero_grad(set_to_none=True)

    # ---- sharding ------------------------------------------------------------------------------------------------
    @override
    def configure_model(self) -> None:
        """FSDP2: shard student, aux (the StudentEMA copy and the discriminator heads, if present) over the
        data-parallel mesh. The frozen teacher stays replicated: it has no gradients or optimizer state to shard,
        and a replica spares two all-gathers per layer in each of its (CFG-doubled) forwards and in the decoder.
        Only under a strategy with a device mesh (ModelParallelStrategy); idempotent (Lightning may call it again).
        """
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
        indices) -> {"images": (B, C, H, W) in [0, 1], "labels": the conditions, "index": (B,) if given}."""

        hp = self.hparams
        conditions, index = (batch["conditions"], batch["index"]) if isinstance(batch, dict) else (batch, None)
        cond = move_condition(self.teacher.encode_condition(conditions), self.device)
        # seeded by the first global index when known: the same samples on any number of ranks
        offset = int(index[0]) if index is not None and len(index) else self.global_rank * 7_919 + batch_idx
        generator = self._generator(derive_seed(hp.predict_seed, salt=offset, modulus=SAMPLE_SEED_MODULUS))
        pipeline = OneStepPipeline.from_teacher(self.teacher, evaluation_student(self), self.sampling_defaults(),
                                                self.device)
        if hp.predict_with == "teacher":
            codes = self.teacher.sample(cond, generator=generator,
                                        **self.teacher_sampling.sample_kwargs(hp.teacher_cfg_scale))
        else:
            codes = pipeline.sample_codes(cond=cond, generator=generator)
        out = {"images": pipeline.decode(codes), "labels": conditions}
        return out if index is None else {**out, "index": index}

    # ---- checkpoints --------------------------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The teacher is re-loaded from its own source: keep its weights out of every checkpoint.
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]
        checkpoint["dimo"] = {
            "generator_step": self.generator_step,
            "iteration": self.iteration,
            "skipped_steps": self.skipped_steps,
            "disc_step": self.disc_step,
            "export": checkpoint_records(self),  # what `dimo export` needs besides the weights
        }

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        keys = super().load_state_dict(state_dict, strict=strict, assign=assign)
        # The teacher comes from its own files, never from checkpoints: its keys are missing by design, and
        # load_from_checkpoint would otherwise warn about each of them (on_load_checkpoint checks the rest).
        keys.missing_keys[:] = [k for k in keys.missing_keys if not k.startswith("teacher.")]
        return keys

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved_teacher = (checkpoint.get("hyper_parameters") or {}).get("teacher")
        check_teacher_unchanged(saved_teacher, self.hparams.get("teacher"), "being loaded",
                                self.hparams.get("allow_teacher_change", False))
        counters = checkpoint.get("dimo", {})
        self.generator_step = int(counters.get("generator_step", 0))
        self.iteration = int(counters.get("iteration", 0))
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        self.disc_step = int(counters.get("disc_step", 0))
        if "state_dict" not in checkpoint:
            return  # a distributed (DCP) checkpoint: the strategy has loaded (and checked) the weights already
        state = checkpoint["state_dict"]
        if not hasattr(self, "student_ema") and any(k.startswith("student_ema.") for k in state):
            # Rebuilt outside a trainer with a StudentEMA (load_from_checkpoint): keep the checkpoint's average as
            # the `student_ema` submodule that StudentEMA would have attached, rather than dropping it.
            self.add_module("student_ema", copy.deepcopy(self.student).eval().requires_grad_(False))
        for key in [k for k in self.state_dict() if k.startswith("student_ema.") and k not in state]:
            # Written without a StudentEMA (or by an older version that kept it in the callback state): the
            # average starts from the resumed student.
            source = "student." + key.removeprefix("student_ema.")
            if source in state:
                state[key] = state[source]
        expected = [k for k in self.state_dict() if not k.startswith("teacher.")]
        missing = [k for k in expected if k not in state]
        if missing:
            raise ValueError(
                f"checkpoint lacks {len(missing)} student/aux weights (e.g. {', '.join(missing[:5])}); "
                "it was not written by this DiMOModule configuration"
                + ("; to add the GAN to a trained Di[M]O run, start from it with --model.init_args.student_init="
                   "CKPT instead of --ckpt_path" if any(k.startswith("discriminator.") for k in missing) else "")
            )


class _PendingStep:
    """What :meth:`DiMOModule._clip_and_step` hands to ``on_before_optimizer_step`` and gets back."""

    def __init__(self, max_norm: float, kept_rows: torch.Tensor) -> None:
        self.max_norm = max_norm
        self.kept_rows = kept_rows
        self.norm = torch.full((), float("nan"))
        self.stepped: bool | None = None


def _drop_teacher_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "teacher.")]:
        del state_dict[key]
