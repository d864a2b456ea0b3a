"""The settings of :class:`~dimo_lightning.training.module.DiMOModule`, in groups.

Each group is a dataclass whose fields carry their documentation (``dimo fit --help`` and ``--print_config`` show
it) and whose ``__post_init__`` rejects a bad value with one line naming ``group.field``, so a bad flag fails when
the settings are built, before any network is. In YAML and on the command line a field is
``model.init_args.<group>.<field>`` (``--model.init_args.aux.rounds=2``).

=========  ==============================================================================================
student    the student's input (hybrid r_init, embedding noise) and its token sampling during training
targets    what the student is pulled towards: the teacher's guided logits, the divergence, the re-masking
aux        the aux model's update (its loss, its sample, how often)
optim      stopping, clipping, micro-batches, dropout, frozen embeddings
sampling   one-step sampling at evaluation and ``dimo predict``; ``sampling.teacher`` decodes the teacher
gan        Soft-Di[M]O's terms on real data (GAN and coverage); off by default
run        seed, where the student starts, teacher checks, speed switches
=========  ==============================================================================================

:data:`LEGACY_KEYS` maps the flat arguments of earlier versions to their place here; the CLI names it for an old
key and :mod:`~dimo_lightning.training.checkpoint_state` migrates old checkpoints with it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from dimo_lightning.core.masking import MASK_SCHEDULES, SIGMA_SCHEDULES, parse_range, sigma_at
from dimo_lightning.core.teacher_sampling import TeacherSampling, coerce_settings

MaskSchedule = Literal["linear", "square", "cosine", "arccos", "mage"]
AUX_MODES = ("full", "none")
AUX_SAMPLE_MODES = ("fresh", "reuse")
PREDICT_WITH = ("student", "teacher")
FAKE_INPUTS = ("soft", "straight_through")
COVERAGE_SPACES = ("trunk", "pixels")


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _within(name: str, value: float, low: float = 0.0, high: float = 1.0) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low:g}, {high:g}], got {value}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        raise ValueError(f"{name} must be >= {low:g}, got {value}")


def _band(name: str, value: list[float] | None) -> None:
    if value is not None and (len(value) != 2 or not 0.0 <= value[0] <= value[1] <= 1.0):
        raise ValueError(f"{name} must be [low, high] within [0, 1], got {value}")


@dataclass
class StudentSettings:
    """The student's input and its token sampling during training (docs/method.md#student-input)."""


    r_init: float | list[float] = 0.6
    """Share of masked tokens in the student's input, fixed or a [low, high] range drawn once per iteration (shared
    by the generator and aux updates of that iteration)."""
    emb_noise_sigma: float = 0.1
    """Sigma of the student's embedding perturbation (the target value of its schedule)."""
    emb_noise_schedule: Literal["constant", "linear", "exp", "cos"] = "constant"
    """``constant``, or a warm-up from 0 to sigma: ``linear``, ``exp``, ``cos``."""
    emb_noise_warmup_steps: int = 0
    """Generator steps of the warm-up."""
    emb_noise_relative: bool = False
    """Scale the noise by the RMS of the teacher's code embeddings (small models); False is the paper's absolute
    form for unit-scale embeddings."""
    temperature: float = 1.0
    """Temperature of the student's token sampling (training)."""
    top_k: int = 0
    """Top-k of the student's sampling (0: off)."""
    top_p: float = 0.0
    """Top-p of the student's sampling (0: off)."""
    exclude_mask: bool = True
    """Never let the student sample the mask id."""

    def __post_init__(self) -> None:
        low, high = parse_range(self.r_init, "student.r_init")
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"student.r_init must lie in [0, 1], got {self.r_init}")
        _within("student.emb_noise_sigma", self.emb_noise_sigma)
        _one_of("student.emb_noise_schedule", self.emb_noise_schedule, SIGMA_SCHEDULES)
        _at_least("student.emb_noise_warmup_steps", self.emb_noise_warmup_steps, 0)
        _positive("student.temperature", self.temperature)
        _at_least("student.top_k", self.top_k, 0)
        _within("student.top_p", self.top_p)

    @property
    def r_init_range(self) -> tuple[float, float]:
        """``r_init`` as (low, high) (equal when fixed)."""
        return parse_range(self.r_init, "student.r_init")

    def draw_r_init(self, seed: int) -> float:
        """r_init of the iteration with ``seed``: a host-side draw (a Python float decides the mask count, so no
        device value has to be read back)."""
        low, high = self.r_init_range
        if low == high:
            return low
        return low + (high - low) * random.Random(seed).random()

    def sigma_at(self, generator_step: int) -> float:
        """The embedding-noise sigma at ``generator_step`` (the schedule)."""
        return sigma_at(generator_step, self.emb_noise_sigma, self.emb_noise_schedule, self.emb_noise_warmup_steps)


@dataclass
class TargetSettings:
    """The generator update's targets: re-masking, teacher guidance, aux logits and the divergence
    (docs/method.md#targets-and-the-divergence)."""


    cfg_scale: float = 2.0
    """Guidance scale of the teacher's targets (1 disables CFG)."""
    adaptive_cfg: bool = False
    """Per-sample scale 1 + (cfg_scale - 1) * mask ratio."""
    teacher_eval: bool = True
    """Keep the teacher in eval mode (no dropout in the targets); False mimics the official code."""
    divergence_beta: float = 0.0
    """0 forward KL, 1 reverse KL, otherwise (1 - beta) FKL + beta RKL."""
    teacher_temperature: float = 1.0
    """Temperature of the teacher's softmax in the divergence."""
    aux_temperature: float = 1.0
    """Temperature of the aux softmax in the divergence."""
    mask_schedule: MaskSchedule = "arccos"
    """Mask-ratio schedule of the generator update's re-masking."""
    mask_ratio_band: list[float] | None = None
    """Optional [low, high]: the generator update draws its mask ratios from its schedule conditioned on this band
    (a clamp would pile the draws on the band's edges); the consistency ablation."""
    mask_ratio_clamp: list[float] | None = None
    """Optional [low, high] clamp of the mask ratios of both updates (the Meissonic recipe uses [0.02, 0.98])."""
    exclude_mask_from_grad: bool = False
    """Zero the token gradient on the mask logit."""

    def __post_init__(self) -> None:
        _positive("targets.teacher_temperature", self.teacher_temperature)
        _positive("targets.aux_temperature", self.aux_temperature)
        _one_of("targets.mask_schedule", self.mask_schedule, MASK_SCHEDULES)
        _band("targets.mask_ratio_band", self.mask_ratio_band)
        _band("targets.mask_ratio_clamp", self.mask_ratio_clamp)


@dataclass
class AuxSettings:
    """The aux model's update (docs/method.md#the-aux-update)."""


    mode: Literal["full", "none"] = "full"
    """``full`` is Di[M]O; ``none`` is the ablation the paper argues against: the aux logits are replaced by the
    student's own detached logits on the re-masked sample, and the aux model is neither run nor trained (its weights
    and optimizer stay in checkpoints, unchanged)."""
    rounds: int = 1
    """Aux updates per student update (the student steps on every ``rounds``-th iteration)."""
    sample: Literal["fresh", "reuse"] = "fresh"
    """``fresh`` draws a new student sample for the aux update (official); ``reuse`` reuses the generator step's
    detached sample and saves one student forward."""
    mask_schedule: MaskSchedule = "arccos"
    """Mask-ratio schedule of the aux update."""
    label_smoothing: float = 0.1
    """Label smoothing of the aux cross-entropy."""
    soft_weight: float = 0.0
    """Weight of the soft (KL to the student's probabilities) aux loss; 0 is hard CE only."""
    soft_temperature: float = 1.0
    """Temperature of the soft aux loss."""
    cfg_drop_ratio: float = 0.0
    """Share of aux training samples whose condition is replaced by the null condition."""

    def __post_init__(self) -> None:
        _one_of("aux.mode", self.mode, AUX_MODES)
        _at_least("aux.rounds", self.rounds, 1)
        _one_of("aux.sample", self.sample, AUX_SAMPLE_MODES)
        _one_of("aux.mask_schedule", self.mask_schedule, MASK_SCHEDULES)
        _within("aux.label_smoothing", self.label_smoothing)
        _within("aux.soft_weight", self.soft_weight)
        _positive("aux.soft_temperature", self.soft_temperature)
        if not 0.0 <= self.cfg_drop_ratio < 1.0:
            raise ValueError(f"aux.cfg_drop_ratio must lie in [0, 1), got {self.cfg_drop_ratio}")


@dataclass
class OptimSettings:
    """Stopping, clipping, micro-batches and what trains (the optimizers themselves are ``optimizer_*``)."""


    max_generator_steps: int = 1000
    """Stop after this many student updates."""
    gen_grad_clip: float = 1.0
    """Max gradient norm of the student (0: no clipping; norms are logged either way)."""
    aux_grad_clip: float = 1.0
    """Max gradient norm of the aux model."""
    accumulate_micro_batches: int = 1
    """Split each batch into this many micro-batches, one optimizer step per update."""
    train_dropout: bool = True
    """Run student and aux in train mode while they learn (dropout on, as the official code); False runs them in
    eval mode: deterministic updates and, for small models on a CPU, about 1.7x faster iterations."""
    fix_emb_layer: bool = True
    """Freeze the token table (tied output head), output bias and positions of student and aux."""

    def __post_init__(self) -> None:
        _at_least("optim.max_generator_steps", self.max_generator_steps, 1)
        _at_least("optim.gen_grad_clip", self.gen_grad_clip, 0)
        _at_least("optim.aux_grad_clip", self.aux_grad_clip, 0)
        _at_least("optim.accumulate_micro_batches", self.accumulate_micro_batches, 1)


@dataclass
class SamplingSettings:
    """One-step sampling at evaluation and ``dimo predict``, and the teacher's decoding wherever it is sampled."""


    temperature: float = 1.0
    """Temperature of the student's one-step sampling at evaluation."""
    r_init: float | None = None
    """r_init at evaluation (None: the midpoint of ``student.r_init``)."""
    emb_noise_sigma: float | None = None
    """Sigma at evaluation (None: ``student.emb_noise_sigma``)."""
    predict_with: Literal["student", "teacher"] = "student"
    """What ``dimo predict`` samples: the (EMA) student in one step, or the teacher."""
    predict_seed: int = 0
    """Seed of ``dimo predict`` samples."""
    teacher: TeacherSampling = field(default_factory=TeacherSampling)
    """How the teacher is decoded wherever it is sampled (``dimo predict`` with ``predict_with: teacher`` and the
    EvaluationReport): steps, cfg_scale (None: ``targets.cfg_scale``), choice_temperature, schedule,
    softmax_temperature, cfg_ramp, cfg_batched."""

    def __post_init__(self) -> None:
        self.teacher = TeacherSampling.coerce(self.teacher)
        _positive("sampling.temperature", self.temperature)
        if self.r_init is not None:
            _within("sampling.r_init", self.r_init)
        if self.emb_noise_sigma is not None:
            _within("sampling.emb_noise_sigma", self.emb_noise_sigma)
        _one_of("sampling.predict_with", self.predict_with, PREDICT_WITH)


@dataclass
class RunSettings:
    """Seed, where the student starts, teacher checks and speed switches."""


    seed: int | None = None
    """Base seed of all random draws (None: the CLI's ``seed_everything`` value, else 0)."""
    student_init: str | None = None
    """A trained Di[M]O checkpoint whose student (and aux and EMA, where present) weights the fit starts from (loaded
    in ``setup``; a ``--ckpt_path`` resume overrides them). A two-optimizer run cannot be resumed with the GAN on
    (``--ckpt_path`` restores optimizers one for one): this starts a new one."""
    allow_teacher_change: bool = False
    """Resume (``--ckpt_path``) with a teacher other than the one the checkpoint was trained against; without it
    that is an error naming both."""
    full_output_head: bool = False
    """Compute the networks' output head over all positions and ids before slicing (the reference computation, a
    benchmark baseline); False computes only the returned logits (same values)."""
    compile_networks: list[Literal["student", "aux", "teacher"]] | None = None
    """Which networks to ``torch.compile`` in place; the checkpoint layout is unchanged. Pays off on GPUs; measure
    with ``dimo bench`` before using it on a CPU."""


@dataclass
class GANSettings:
    """Soft-Di[M]O's terms on real data: ``L_gen = L_DiMO + weight * L_gan + coverage_weight * coverage``, a
    discriminator on the frozen teacher trunk (:mod:`dimo_lightning.objectives.gan`) and a coverage term
    (:mod:`dimo_lightning.objectives.coverage`); docs/method.md#soft-dimo."""


    weight: float = 0.0
    """w_gan; 0 turns the GAN (and, without coverage, the need for real data) off."""
    only: bool = False
    """Ablation: drop ``L_DiMO`` (the student learns from ``L_gan`` alone; the aux model still trains)."""
    weight_warmup_steps: int = 0
    """Ramp w_gan linearly from 0 over this many generator steps (0: full weight at once), so the heads learn before
    their gradient reaches the student."""
    num_layers: int = 3
    """Heads on this many evenly spaced trunk layers (ignored when ``layers`` is given)."""
    layers: list[int] | None = None
    """Explicit trunk layers of the heads (0 = after the input layer, l = after block l)."""
    head_dim: int = 256
    """Hidden width of each head's MLP."""
    mask_augment: bool = True
    """Replace a share r ~ U[0, max_mask_ratio] of the positions of every real and fake sequence by the mask
    embedding and give r to the heads (the paper's remedy against an overfitting discriminator)."""
    max_mask_ratio: float = 0.95
    """The upper end of r."""
    grad_clip: float = 1.0
    """Max gradient norm of the heads (0: no clipping; the norm is logged either way)."""
    fake_input: Literal["soft", "straight_through"] = "soft"
    """What the discriminator sees of the student. ``soft``: the soft embedding ``softmax(z) @ E`` (the paper).
    ``straight_through``: the embedding of the student's sampled token in the forward pass, with the soft
    embedding's gradient (``E[x] + soft - sg(soft)``), so the heads cannot tell fake from real by softness."""
    coverage_weight: float = 0.0
    """Weight of the coverage term: the energy distance, per class, between the student's and the batch's real
    sequences in the frozen trunk's features, added to the generator loss (0: off). Unlike ``L_gan`` it scores the
    set of samples, so it rewards the styles a mode-seeking student leaves out. Works with or without the
    discriminator."""
    coverage_layers: list[int] | None = None
    """Trunk layers of its features (None: the heads' layers, or ``num_layers`` evenly spaced)."""
    coverage_input: Literal["soft", "straight_through"] = "soft"
    """The student's embeddings it sees: ``soft`` (expected embeddings) or ``straight_through`` (as
    ``fake_input``)."""
    coverage_bank: int = 0
    """Compare with a fixed bank of this many real sequences (their features computed once at fit start; all of a
    smaller data set) instead of the batch's real codes. Memory: ``coverage_bank x len(layers) x N x D`` floats
    (trunk) or ``coverage_bank x C x H x W / coverage_pixel_pool^2`` (pixels). 0: the batch's codes."""
    coverage_temperature: float | None = None
    """The soft embedding it scores is ``softmax(z / T) @ E``. None: ``sampling.temperature``, so the term scores
    the distribution the student is sampled from at evaluation."""
    coverage_space: Literal["trunk", "pixels"] = "trunk"
    """Where the distances are measured: ``trunk`` (the frozen trunk's features at ``coverage_layers``) or
    ``pixels`` (the images, through the tokenizer's differentiable decode; needs a teacher with ``decode_soft``)."""
    coverage_pixel_pool: int = 1
    """Average-pooling window of the pixel space (1: full resolution; 2 halves each side)."""

    def __post_init__(self) -> None:
        _at_least("gan.weight", self.weight, 0)
        if self.only and self.weight <= 0:
            raise ValueError("gan.only drops the Di[M]O loss: it needs gan.weight > 0")
        _at_least("gan.weight_warmup_steps", self.weight_warmup_steps, 0)
        _at_least("gan.num_layers", self.num_layers, 1)
        _at_least("gan.head_dim", self.head_dim, 1)
        _within("gan.max_mask_ratio", self.max_mask_ratio)
        _at_least("gan.grad_clip", self.grad_clip, 0)
        _one_of("gan.fake_input", self.fake_input, FAKE_INPUTS)
        _at_least("gan.coverage_weight", self.coverage_weight, 0)
        if self.coverage_bank < 0:
            raise ValueError(f"gan.coverage_bank must be >= 0 (0: the batch's real codes), got {self.coverage_bank}")
        if self.coverage_temperature is not None and not self.coverage_temperature > 0:
            raise ValueError(f"gan.coverage_temperature must be > 0 (or null: sampling.temperature), got "
                             f"{self.coverage_temperature}")
        _one_of("gan.coverage_space", self.coverage_space, COVERAGE_SPACES)
        _at_least("gan.coverage_pixel_pool", self.coverage_pixel_pool, 1)
        _one_of("gan.coverage_input", self.coverage_input, FAKE_INPUTS)

    @property
    def enabled(self) -> bool:
        """The discriminator (and its optimizer) exist."""
        return self.weight > 0

    @property
    def needs_real_data(self) -> bool:
        """Batches must carry real codes: the discriminator or the coverage term is on."""
        return self.weight > 0 or self.coverage_weight > 0

    def weight_at(self, generator_step: int) -> float:
        """w_gan at ``generator_step`` (the linear warm-up, then ``weight``)."""
        if self.weight_warmup_steps <= 0:
            return self.weight
        return self.weight * min(1.0, (generator_step + 1) / self.weight_warmup_steps)


@dataclass(frozen=True)
class DiMOSettings:
    """All groups of one DiMOModule, built and checked together (``DiMOModule.settings``)."""

    student: StudentSettings
    targets: TargetSettings
    aux: AuxSettings
    optim: OptimSettings
    sampling: SamplingSettings
    gan: GANSettings
    run: RunSettings

    @classmethod
    def build(cls, **groups: Any) -> DiMOSettings:
        """Each group from an instance, a plain mapping or None (its defaults) (:func:`coerce_group`)."""
        return cls(**{f.name: coerce_group(f.name, groups.get(f.name)) for f in fields(cls)})

    def to_hparams(self) -> dict[str, dict[str, Any]]:
        """``{group: plain dict}``: what checkpoints record."""
        return {f.name: asdict(getattr(self, f.name)) for f in fields(self)}

    def one_step_defaults(self) -> dict[str, Any]:
        """The student's one-step sampling at evaluation: ``r_init`` (``sampling.r_init``, else the midpoint of
        ``student.r_init``), ``emb_noise_sigma`` (``sampling.emb_noise_sigma``, else ``student.emb_noise_sigma``),
        ``temperature`` (``sampling.temperature``), ``top_k`` / ``top_p`` (the student's)."""
        low, high = self.student.r_init_range
        r_init, sigma = self.sampling.r_init, self.sampling.emb_noise_sigma
        return {
            "r_init": float(r_init) if r_init is not None else (low + high) / 2,
            "emb_noise_sigma": float(sigma) if sigma is not None else float(self.student.emb_noise_sigma),
            "temperature": float(self.sampling.temperature),
            "top_k": int(self.student.top_k),
            "top_p": float(self.student.top_p),
        }

    def teacher_sample_kwargs(self, steps: int | None = None) -> dict[str, Any]:
        """Keyword arguments of ``MaskedTeacher.sample``: ``sampling.teacher``, its CFG defaulting to
        ``targets.cfg_scale`` (``steps`` overrides the configured count)."""
        return self.sampling.teacher.sample_kwargs(self.targets.cfg_scale, steps=steps)


GROUPS: dict[str, type] = {
    "student": StudentSettings, "targets": TargetSettings, "aux": AuxSettings, "optim": OptimSettings,
    "sampling": SamplingSettings, "gan": GANSettings, "run": RunSettings,
}



def coerce_group(name: str, value: Any) -> Any:
    """Group ``name`` from an instance (copied, so a module never shares a default instance), a plain mapping (a
    checkpoint's hyperparameters) or None (its defaults); unknown keys are errors naming the group."""
    cls = GROUPS[name]
    if isinstance(value, cls):
        value = asdict(value)
    return coerce_settings(cls, value, name)


# The flat DiMOModule arguments of earlier versions -> their place ("group.field"). The CLI names the new place
# for an old key; old checkpoints are migrated with it (training/checkpoint_state.py).
LEGACY_KEYS: dict[str, str] = {
    "r_init": "student.r_init",
    "emb_noise_sigma": "student.emb_noise_sigma",
    "emb_noise_schedule": "student.emb_noise_schedule",
    "emb_noise_warmup_steps": "student.emb_noise_warmup_steps",
    "emb_noise_relative": "student.emb_noise_relative",
    "student_temperature": "student.temperature",
    "student_top_k": "student.top_k",
    "student_top_p": "student.top_p",
    "exclude_mask_from_samples": "student.exclude_mask",
    "teacher_cfg_scale": "targets.cfg_scale",
    "adaptive_cfg": "targets.adaptive_cfg",
    "teacher_eval": "targets.teacher_eval",
    "divergence_beta": "targets.divergence_beta",
    "teacher_temperature": "targets.teacher_temperature",
    "aux_temperature": "targets.aux_temperature",
    "gen_mask_schedule": "targets.mask_schedule",
    "gen_mask_ratio_band": "targets.mask_ratio_band",
    "mask_ratio_clamp": "targets.mask_ratio_clamp",
    "exclude_mask_from_grad": "targets.exclude_mask_from_grad",
    "aux_mode": "aux.mode",
    "aux_rounds": "aux.rounds",
    "aux_sample": "aux.sample",
    "aux_mask_schedule": "aux.mask_schedule",
    "aux_label_smoothing": "aux.label_smoothing",
    "aux_soft_weight": "aux.soft_weight",
    "aux_soft_temperature": "aux.soft_temperature",
    "aux_cfg_drop_ratio": "aux.cfg_drop_ratio",
    "max_generator_steps": "optim.max_generator_steps",
    "gen_grad_clip": "optim.gen_grad_clip",
    "aux_grad_clip": "optim.aux_grad_clip",
    "accumulate_micro_batches": "optim.accumulate_micro_batches",
    "train_dropout": "optim.train_dropout",
    "fix_emb_layer": "optim.fix_emb_layer",
    "sample_temperature": "sampling.temperature",
    "sample_r_init": "sampling.r_init",
    "sample_emb_noise_sigma": "sampling.emb_noise_sigma",
    "predict_with": "sampling.predict_with",
    "predict_seed": "sampling.predict_seed",
    "teacher_sampling": "sampling.teacher",
    "seed": "run.seed",
    "student_init": "run.student_init",
    "allow_teacher_change": "run.allow_teacher_change",
    "full_output_head": "run.full_output_head",
    "compile_networks": "run.compile_networks",
}


def legacy_key_message(key: str, prefix: str = "model.init_args.") -> str | None:
    """One line naming the new place of an old flat key (``aux_rounds`` or ``teacher_sampling.steps``), else None."""
    head, _, rest = key.partition(".")
    new = LEGACY_KEYS.get(head)
    if new is None:
        return None
    where = f"{prefix}{new}" + (f".{rest}" if rest else "")
    return f"{key} moved to {where} (--{where}=...)"


def group_fields(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """``{"group.field": value}`` of the groups in ``hparams`` (``sampling.teacher`` as one value)."""
    return {f"{group}.{name}": value for group in GROUPS if isinstance(hparams.get(group), Mapping)
            for name, value in hparams[group].items()}
