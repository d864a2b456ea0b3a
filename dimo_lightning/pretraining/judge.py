"""CausalJudgeModule: trains the small causal LM that judges text samples (generative perplexity), a transformers
``GPT2LMHeadModel`` over the text teacher's tokenizer, and exports it with ``save_pretrained`` (plus the tokenizer,
so :func:`dimo_lightning.evaluation.metrics.text.load_judge` reads the folder as it reads gpt2-large).

It trains on the same packed rows as the teacher (:class:`~dimo_lightning.data.text_corpus.TextCorpusDataModule`,
MDLM's wrapping: ``[BOS] ... [EOS]`` rows that cut through documents, each document followed by EOS), here of the
judge's full context, by next-token cross-entropy at every position. The tokenizer is used as it is (no mask token:
``len(tokenizer)`` embedding rows, tied to the output layer). Validation pools the next-token NLL over every target of
every held-out row (``val/nll``, ``val/ppl``); the export's ``metrics.json`` keeps the last one.
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
from torchmetrics.aggregation import SumMetric
from typing_extensions import override

from dimo_lightning.data.text_corpus import copy_text_tokenizer, load_text_tokenizer

METRICS_NAME = "metrics.json"
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CausalJudgeModule(pl.LightningModule):
    """Trains a ``GPT2LMHeadModel`` on packed rows (B, L) by next-token prediction.

    Args:
        tokenizer: the tokenizer folder (None: the shipped text tokenizer); the vocabulary is its size.
        n_positions: the context length (``--data.init_args.seq_len`` must not exceed it).
        n_embd: width.
        n_layer: transformer blocks.
        n_head: attention heads.
        dropout: residual, embedding and attention dropout while training.
        optimizer: optimizer factory (LightningCLI fills it from YAML).
        scheduler: optional LR-scheduler factory, stepped every optimizer step.
        export_dir: on fit end, the judge folder ``<log_dir>/<export_dir>`` (config.json, model.safetensors,
            generation_config.json, the tokenizer files, metrics.json); None disables the export.
        export_dtype: dtype of the stored weights (float32, float16, bfloat16). ``config.json``'s ``dtype`` stays
            float32, so ``from_pretrained`` (and ``load_judge`` without ``dtype``) upcasts them on load: half the
            bytes on disk, float32 arithmetic (CPU float16 matmuls are slow and lose precision).
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        n_positions: int = 256,
        n_embd: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        dropout: float = 0.1,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        export_dir: str | None = "text_judge",
        export_dtype: str = "float16",
    ) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        if export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export_dtype must be one of {', '.join(EXPORT_DTYPES)}, got {export_dtype!r}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.tokenizer = load_text_tokenizer(tokenizer)
        eos = self.tokenizer.eos_token_id
        config = GPT2Config(vocab_size=len(self.tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                            n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                            bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True)
        self.network = GPT2LMHeadModel(config)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_nll = SumMetric().set_dtype(torch.float64)
        self.val_tokens = SumMetric().set_dtype(torch.float64)
        self.last_validation: dict[str, float] = {}

    def nll_sum(self, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(summed next-token NLL of rows (B, L), float32; number of targets B * (L - 1))."""
        if rows.shape[1] > self.hparams.n_positions:
            raise ValueError(f"rows of {rows.shape[1]} tokens exceed n_positions {self.hparams.n_positions}: "
                             "--data.init_args.seq_len must be <= --model.init_args.n_positions")
        logits = self.network(input_ids=rows).logits[:, :-1].float()  # (B, L - 1, V)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum")
        return nll, rows.shape[0] * (rows.shape[1] - 1)

    @override
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        nll, count = self.nll_sum(batch)
        loss = nll / count
        self.log("train/nll", loss, prog_bar=True, batch_size=batch.shape[0])
        return loss

    @override
    def on_validation_epoch_start(self) -> None:
        self.val_nll.reset()
        self.val_tokens.reset()

    @override
    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        nll, count = self.nll_sum(batch)
        self.val_nll.update(nll.double())
        self.val_tokens.update(float(count))

    @override
    def on_validation_epoch_end(self) -> None:
        tokens = float(self.val_tokens.compute())
        if tokens == 0:
            return
        nll = float(self.val_nll.compute()) / tokens
        self.last_validation = {"val_nll": nll, "val_ppl": math.exp(nll), "val_tokens": tokens,
                                "global_step": int(self.global_step)}
        self.log("val/nll", nll, prog_bar=True)
        self.log("val/ppl", math.exp(nll))

    @override
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.network.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def export(self, folder: str | Path) -> Path:
        """``save_pretrained`` of the network (in ``export_dtype``), the tokenizer files and ``metrics.json``
        (parameters and the last validation) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        network = self.network
        dtype = EXPORT_DTYPES[self.hparams.export_dtype]
        if dtype != torch.float32:  # a copy: the trained module stays in float32
            from transformers import GPT2LMHeadModel

            network = GPT2LMHeadModel(self.network.config)
            network.load_state_dict(self.network.state_dict())
            network = network.to(dtype)
        network.save_pretrained(str(folder))
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        config["dtype"] = "float32"  # the compute dtype from_pretrained picks by default (class docstring)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_text_tokenizer(folder, self.hparams.tokenizer)
        metrics: dict[str, Any] = {
            "parameters": sum(p.numel() for p in self.network.parameters()),
            "export_dtype": self.hparams.export_dtype, "context_length": self.hparams.n_positions,
            **self.last_validation,
        }
        (folder / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
        return folder

    @override
    def on_fit_end(self) -> None:
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        if not self.hparams.export_dir or getattr(self.trainer, "fast_dev_run", False):
            return
        if self.trainer.is_global_zero:
            path = self.export(Path(log_dir) / self.hparams.export_dir)
            print(f"text judge written to {path} (install with: python scripts/build_assets.py text_judge {log_dir})")
