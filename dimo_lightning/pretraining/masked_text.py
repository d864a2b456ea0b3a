"""MaskedTextDiffusionModule: pretrains an MDLM text teacher (our :class:`~dimo_lightning.nn.mdlm.MDLM` DiT) with
MDLM's continuous-time objective, and exports it in the released ``kuleshov-group/mdlm-owt`` folder layout.

The objective is MDLM's (Sahoo et al. 2024; kuleshov-group/mdlm ``diffusion.py`` ``_forward_pass_diffusion`` and
``noise_schedule.py`` ``LogLinearNoise``, checked against the code):

- time ``t = (1 - sampling_eps) u + sampling_eps`` with ``u ~ U[0, 1)``, antithetic over the batch
  (``u_i = (u_i / B + i / B) mod 1``), ``sampling_eps = 1e-3``;
- log-linear noise: ``sigma(t) = -log(1 - (1 - eps) t)``, ``dsigma/dt = (1 - eps) / (1 - (1 - eps) t)``,
  ``eps = 1e-3``; each token is masked independently with probability ``1 - exp(-sigma) = (1 - eps) t``;
- SUBS parameterisation (:func:`~dimo_lightning.core.subs.subs_log_probs`: the mask is never predicted, unmasked
  tokens are carried over, so they contribute 0);
- the NELBO weight ``dsigma / expm1(sigma)`` (equal to ``1 / t`` for this schedule) on ``-log p_theta(x_0)`` at
  every position; the loss is the sum over all positions divided by the number of tokens (every row is full: MDLM's
  wrapped rows have an all-ones attention mask).

That loss is an unbiased estimate of the NELBO per token in nats, an upper bound on the negative log-likelihood, so
``exp(NELBO)`` bounds the perplexity from above. Validation evaluates it on the held-out rows with a fixed noise
draw per batch (``derive_seed(seed, 0, batch_idx, VALIDATION_SALT)``), so every validation pass sees the same
times and masks, and pools it over tokens (``val/nelbo``, ``val/ppl_bound``).

The network is conditioned on sigma only if ``time_conditioning`` (the released mdlm-owt: no). Sampling needs no
new decoder: :func:`~dimo_lightning.core.sampling.maskgit_decode` works on (B, L) sequences as it does on image
tokens (:func:`sample_teacher`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from safetensors.torch import save_file
from torchmetrics.aggregation import SumMetric
from typing_extensions import override

from dimo_lightning.core.sampling import maskgit_decode
from dimo_lightning.core.seeding import derive_seed, seeded_generator
from dimo_lightning.core.subs import subs_log_probs
from dimo_lightning.core.weight_folders import CONFIG_NAME, WEIGHTS_NAME
from dimo_lightning.data.text_corpus import copy_text_tokenizer, load_text_tokenizer
from dimo_lightning.nn.mdlm import IGNORED_KEYS, MDLM, ROTARY_BASE, MDLMConfig, check_mdlm_tokenizer

NOISE_EPS = 1e-3  # LogLinearNoise(eps=1e-3)
SAMPLING_EPS = 1e-3  # training.sampling_eps
VALIDATION_SALT = 7_001  # names the validation noise stream
METRICS_NAME = "metrics.json"
TOKENIZER_DIR = "tokenizer"
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- the objective (pure functions) ----------------------------------------------------------------------------------
def loglinear_sigma(t: torch.Tensor, eps: float = NOISE_EPS) -> torch.Tensor:
    """Total noise ``sigma(t) = -log1p(-(1 - eps) t)`` (B,) for t in [0, 1]."""
    return -torch.log1p(-(1 - eps) * t)


def loglinear_dsigma(t: torch.Tensor, eps: float = NOISE_EPS) -> torch.Tensor:
    """Noise rate ``dsigma/dt = (1 - eps) / (1 - (1 - eps) t)`` (B,)."""
    return (1 - eps) / (1 - (1 - eps) * t)


def sample_times(batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 sampling_eps: float = SAMPLING_EPS, antithetic: bool = True) -> torch.Tensor:
    """MDLM's ``_sample_t``: (B,) times in [sampling_eps, 1), stratified over the batch when ``antithetic``."""
    u = torch.rand(batch_size, generator=generator, device=device)
    if antithetic:
        u = (u / batch_size + torch.arange(batch_size, device=u.device) / batch_size) % 1
    return (1 - sampling_eps) * u + sampling_eps


def mask_by_time(x0: torch.Tensor, t: torch.Tensor, mask_id: int, generator: torch.Generator | None = None,
                 eps: float = NOISE_EPS) -> torch.Tensor:
    """x_t (B, L): each token of x0 replaced by ``mask_id`` independently with probability ``1 - exp(-sigma(t))``."""
    move_chance = -torch.expm1(-loglinear_sigma(t, eps))[:, None]  # (B, 1) = (1 - eps) t
    moved = torch.rand(x0.shape, generator=generator, device=x0.device) < move_chance
    return torch.where(moved, torch.full_like(x0, mask_id), x0)


def nelbo_per_token(logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, mask_id: int,
                    eps: float = NOISE_EPS) -> torch.Tensor:
    """MDLM's continuous-time SUBS loss terms (B, L) float32: ``-log p_theta(x0 | xt) * dsigma / expm1(sigma)``
    (0 at unmasked positions). Their mean over tokens is the NELBO estimate in nats per token. The reference form,
    written with :func:`subs_log_probs` over every position; :func:`nelbo_sum` computes the same sum."""
    log_p = subs_log_probs(logits, xt, mask_id).gather(-1, x0[..., None])[..., 0]  # (B, L)
    return -log_p * nelbo_weight(t, eps)[:, None]


def nelbo_weight(t: torch.Tensor, eps: float = NOISE_EPS) -> torch.Tensor:
    """MDLM's weight ``dsigma / expm1(sigma)`` (B,) float32 (``1 / t`` for the log-linear schedule)."""
    t = t.float()
    return loglinear_dsigma(t, eps) / torch.expm1(loglinear_sigma(t, eps))


def nelbo_sum(logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, mask_id: int,
              eps: float = NOISE_EPS) -> torch.Tensor:
    """The sum of :func:`nelbo_per_token` over (B, L), computed at the masked positions only (a scalar, float32).

    SUBS gives unmasked positions a log-probability of exactly 0 for the clean token (carry-over), so only masked
    positions add to the sum; there the SUBS posterior is the softmax with the mask logit at -inf, which is
    ``cross_entropy`` on the gathered rows. Same value and gradients as the reference form, without building the
    (B, L, V) carry-over tensors (a fifth of a CPU training step at V = 4097).
    """
    masked = xt == mask_id  # (B, L)
    rows = logits[masked].float()  # (M, V)
    rows[:, mask_id] = float("-inf")
    nll = F.cross_entropy(rows, x0[masked], reduction="none")  # (M,)
    weight = nelbo_weight(t, eps)[:, None].expand_as(xt)[masked]
    return (nll * weight).sum()


@torch.no_grad()
def sample_teacher(model: MDLM, batch_size: int, steps: int = 64, length: int | None = None,
                   schedule: str = "linear", choice_temperature: float = 1.0, softmax_temperature: float = 1.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Unconditional samples (B, L) of an MDLM with the MaskGIT confidence decoder (``maskgit_decode`` on
    sequences; the mask id, the last, is never drawn). ``length`` defaults to the model's ``model_length``."""
    device = next(model.parameters()).device
    return maskgit_decode(
        lambda ids, _drop: model(ids), batch_size, length or model.config.model_length, model.mask_id,
        model.mask_id, steps=steps, schedule=schedule, choice_temperature=choice_temperature,
        softmax_temperature=softmax_temperature, device=device, generator=generator,
    )


# ---- the module ------------------------------------------------------------------------------------------------------
class MaskedTextDiffusionModule(pl.LightningModule):
    """Pretrains an :class:`MDLM` on packed token rows (B, L) with the MDLM NELBO (module docstring).

    Args:
        tokenizer: the tokenizer folder the data uses (None: the shipped one); the vocabulary is its size + 1 (the
            appended mask, GPT-2 convention) and it is copied into the export.
        model_length: L, the row length (``--data.init_args.seq_len`` must not exceed it).
        hidden_dim: D.
        cond_dim: width of the sigma embedding.
        n_blocks: transformer blocks.
        n_heads: attention heads.
        dropout: residual dropout while training.
        time_conditioning: feed sigma to the network (the released mdlm-owt: false).
        antithetic: stratify the batch's times.
        optimizer: optimizer factory (LightningCLI fills it from YAML).
        scheduler: optional LR-scheduler factory, stepped every optimizer step.
        export_dir: on fit end, the teacher folder ``<log_dir>/<export_dir>`` (config.json, model.safetensors,
            metrics.json, tokenizer/); None disables the export.
        export_dtype: dtype of the exported weights (float32, float16, bfloat16); ``load_mdlm`` casts on load.
        seed: seed of the noise streams (times and masks).
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        model_length: int = 128,
        hidden_dim: int = 128,
        cond_dim: int = 64,
        n_blocks: int = 4,
        n_heads: int = 4,
        dropout: float = 0.1,
        time_conditioning: bool = False,
        antithetic: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        export_dir: str | None = "text_teacher",
        export_dtype: str = "float16",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export_dtype must be one of {', '.join(EXPORT_DTYPES)}, got {export_dtype!r}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.tokenizer = load_text_tokenizer(tokenizer)
        self.config = MDLMConfig(vocab_size=len(self.tokenizer) + 1, model_length=model_length, hidden_dim=hidden_dim,
                                 cond_dim=cond_dim, n_blocks=n_blocks, n_heads=n_heads, dropout=dropout,
                                 time_conditioning=time_conditioning)
        check_mdlm_tokenizer(self.config.vocab_size, self.tokenizer, "--model.init_args.tokenizer")
        self.network = MDLM(self.config)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_nll = SumMetric().set_dtype(torch.float64)  # summed NELBO terms of the validation pass
        self.val_tokens = SumMetric().set_dtype(torch.float64)
        self.last_validation: dict[str, float] = {}
        self._generator: torch.Generator | None = None

    @property
    def mask_id(self) -> int:
        return self.config.mask_id

    def _train_rng(self) -> torch.Generator:
        if self._generator is None or self._generator.device != self.device:
            self._generator = seeded_generator(derive_seed(self.hparams.seed, self.global_rank), self.device)
        return self._generator

    def nelbo_total(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The summed NELBO terms (a scalar) of one noise draw for clean rows x0 (B, L)."""
        if x0.shape[1] > self.config.model_length:
            raise ValueError(f"rows of {x0.shape[1]} tokens exceed model_length {self.config.model_length}: "
                             "--data.init_args.seq_len must be <= --model.init_args.model_length")
        t = sample_times(x0.shape[0], generator, self.device, antithetic=self.hparams.antithetic)
        xt = mask_by_time(x0, t, self.mask_id, generator)
        logits = self.network(xt, loglinear_sigma(t))
        return nelbo_sum(logits, x0, xt, t, self.mask_id)

    @override
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.nelbo_total(batch, self._train_rng()) / batch.numel()
        self.log("train/nelbo", loss, prog_bar=True, batch_size=batch.shape[0])
        return loss

    @override
    def on_validation_epoch_start(self) -> None:
        self.val_nll.reset()
        self.val_tokens.reset()

    @override
    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        generator = seeded_generator(derive_seed(self.hparams.seed, 0, batch_idx, VALIDATION_SALT), self.device)
        self.val_nll.update(self.nelbo_total(batch, generator).double())
        self.val_tokens.update(float(batch.numel()))

    @override
    def on_validation_epoch_end(self) -> None:
        tokens = float(self.val_tokens.compute())
        if tokens == 0:
            return
        nelbo = float(self.val_nll.compute()) / tokens
        self.last_validation = {"val_nelbo": nelbo, "val_ppl_bound": math.exp(nelbo), "val_tokens": tokens,
                                "global_step": int(self.global_step)}
        self.log("val/nelbo", nelbo, prog_bar=True)
        self.log("val/ppl_bound", math.exp(nelbo))

    @override
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.network.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def export(self, folder: str | Path) -> Path:
        """Write the released MDLM layout into ``folder``: ``config.json`` (model_type mdlm + the MDLMConfig
        fields), ``model.safetensors`` (``backbone.*`` in ``export_dtype``, plus the float32
        ``backbone.rotary_emb.inv_freq`` buffer the reference saves), ``metrics.json`` (the last validation) and
        ``tokenizer/``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"model_type": "mdlm", **self.config.to_dict(), "return_dict": False}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        dtype = EXPORT_DTYPES[self.hparams.export_dtype]
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.network.state_dict().items()}
        head_dim = self.config.hidden_dim // self.config.n_heads
        state[IGNORED_KEYS[0]] = 1.0 / ROTARY_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        metrics: dict[str, Any] = {
            "parameters": sum(p.numel() for p in self.network.parameters()),
            "export_dtype": self.hparams.export_dtype, **self.last_validation,
        }
        (folder / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
        copy_text_tokenizer(folder / TOKENIZER_DIR, self.hparams.tokenizer)
        return folder

    @override
    def on_fit_end(self) -> None:
        # trainer.log_dir may run a collective: ask it on every rank, write on rank zero only.
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        if not self.hparams.export_dir or getattr(self.trainer, "fast_dev_run", False):
            return
        if self.trainer.is_global_zero:
            path = self.export(Path(log_dir) / self.hparams.export_dir)
            print(f"text teacher written to {path} (install with: python scripts/build_assets.py text_teacher "
                  f"{log_dir})")
