"""TeacherSampling: the one set of settings with which the teacher is decoded, wherever it is sampled.

``dimo predict --model.init_args.sampling.predict_with=teacher`` (``DiMOModule.predict_step``) and the
:class:`~dimo_lightning.evaluation.callbacks.evaluation_report.EvaluationReport` both read the module's
``sampling.teacher`` settings, so the same teacher cannot be scored with one choice temperature and sampled with
another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from dimo_lightning.core.sampling import DECODE_SCHEDULES


def coerce_settings(cls: type, value: Any, name: str) -> Any:
    """A settings dataclass from itself, a plain mapping (a checkpoint's hyperparameters) or None (its defaults);
    unknown keys and other types are errors naming the ``name`` argument."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown {name} keys: {', '.join(unknown)}")
        return cls(**value)
    raise ValueError(f"{name} must be a mapping of settings, got {type(value).__name__}")

@dataclass
class TeacherSampling:
    """MaskGIT decoding of the teacher (see :func:`dimo_lightning.core.sampling.maskgit_decode`).

    Args:
        steps: decoding steps of ``dimo predict`` with ``sampling.predict_with: teacher`` (the report has its own
            list of step counts, one row each).
        cfg_scale: classifier-free guidance; None uses the module's ``targets.cfg_scale`` (the distillation target).
        choice_temperature: initial Gumbel temperature of the confidence (MaskGIT: 4.5 for 256 tokens; the 49-token
            MNIST teacher is best at 16).
        schedule: how many tokens each step reveals: root, linear, square, cosine, arccos.
        softmax_temperature: the logits are divided by it before sampling.
        cfg_ramp: ramp the guidance from 1 at the first step to ``cfg_scale`` at the last.
        cfg_batched: one network pass of 2B per guided step (True) or two passes of B (False): the same logits up
            to float rounding. On a GPU the batched pass fills the device better; on one CPU thread two passes of
            B were 2-15% faster at batch 64 for the MNIST teacher (``dimo bench``, the batched_cfg rows).
    """

    steps: int = 16
    cfg_scale: float | None = None
    choice_temperature: float = 4.5
    schedule: str = "arccos"
    softmax_temperature: float = 1.0
    cfg_ramp: bool = True
    cfg_batched: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sampling.teacher.steps must be >= 1, got {self.steps}")
        if self.schedule not in DECODE_SCHEDULES:
            raise ValueError(
                f"sampling.teacher.schedule must be one of {', '.join(DECODE_SCHEDULES)}, got {self.schedule!r}"
            )
        if self.choice_temperature < 0:
            raise ValueError(f"sampling.teacher.choice_temperature must be >= 0, got {self.choice_temperature}")
        if self.softmax_temperature <= 0:
            raise ValueError(f"sampling.teacher.softmax_temperature must be > 0, got {self.softmax_temperature}")

    @classmethod
    def coerce(cls, value: TeacherSampling | Mapping[str, Any] | None) -> TeacherSampling:
        """Accept the dataclass, a plain dict (from a checkpoint's hyperparameters) or None (defaults)."""
        return coerce_settings(cls, value, "sampling.teacher")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sample_kwargs(self, default_cfg_scale: float, steps: int | None = None) -> dict[str, Any]:
        """Keyword arguments of ``MaskedTeacher.sample`` (``steps`` overrides the configured count)."""
        return {
            "steps": self.steps if steps is None else steps,
            "cfg_scale": default_cfg_scale if self.cfg_scale is None else self.cfg_scale,
            "cfg_ramp": self.cfg_ramp,
            "cfg_batched": self.cfg_batched,
            "schedule": self.schedule,
            "softmax_temperature": self.softmax_temperature,
            "choice_temperature": self.choice_temperature,
        }
