"""Text-to-image teacher pretraining on captioned MNIST: a tiny CLIP text encoder trained jointly with a tiny
:class:`~dimo_lightning.nn.meissonic.MeissonicTransformer` (no down/up-sampling on the 7x7 grid) by masked-token
prediction over the PatchVQ codes, with caption dropout (the empty prompt) for classifier-free guidance.

The result is written in the diffusers folder layout that :class:`~dimo_lightning.teachers.prompt.PromptTeacher`
loads (``transformer/``, ``text_encoder/``, ``tokenizer/`` + ``codebook.safetensors``), the same loader as for the
released Meissonic transformer. The tokenizer is word-level over
:func:`~dimo_lightning.data.captions.caption_vocabulary` (built with ``tokenizers``, saved as a transformers
tokenizer folder).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from dimo_lightning.assets import asset_path
from dimo_lightning.core.masking import MASK_SCHEDULES, mask_tokens, sample_mask_ratio
from dimo_lightning.core.weight_files import give_default_mode
from dimo_lightning.data.captions import caption_vocabulary, split_captions
from dimo_lightning.data.labels import check_counts
from dimo_lightning.data.mnist import load_mnist_split
from dimo_lightning.nn.meissonic import MeissonicTransformer
from dimo_lightning.pretraining.class_conditional import masked_token_loss
from dimo_lightning.tokenizers.patch_vq import PatchVQTokenizer

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")


def build_word_tokenizer(words: list[str]):
    """A transformers fast tokenizer: lower-case, non-alphanumerics as spaces, one id per word of ``words``,
    ``[BOS] ... [EOS]`` around every prompt, ``[PAD]`` padding, ``[UNK]`` for unknown words."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *sorted(set(words))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"[^a-z0-9]+"), " ")])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")


class CaptionedDigits(Dataset):
    """(codes (N,), caption) pairs: every digit of a split with ``captions_per_digit`` phrasings."""

    def __init__(self, codes: torch.Tensor, captions: list[str], captions_per_digit: int) -> None:
        if len(captions) != len(codes) * captions_per_digit:
            raise ValueError(f"{len(captions)} captions for {len(codes)} digits x {captions_per_digit}")
        self.codes = codes
        self.captions = captions
        self.per_digit = captions_per_digit

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int):
        return self.codes[index // self.per_digit], self.captions[index]


def collate_captioned(items):
    codes, captions = zip(*items)
    return torch.stack(codes), list(captions)


class CaptionedMNISTDataModule(pl.LightningDataModule):
    """Real MNIST digits as (codes (B, 49), captions) for text-to-image teacher pretraining.

    Args:
        batch_size: pairs per batch.
        codebook: PatchVQ codebook (safetensors); None uses the shipped asset.
        captions_per_digit: phrasings per train digit (validation: one).
        num_workers: DataLoader workers.
    """

    def __init__(self, batch_size: int = 128, codebook: str | None = None, captions_per_digit: int = 4,
                 num_workers: int = 0) -> None:
        super().__init__()
        check_counts(batch_size=batch_size, captions_per_digit=captions_per_digit)
        check_counts(0, num_workers=num_workers)
        self.batch_size = batch_size
        self.codebook = codebook
        self.captions_per_digit = captions_per_digit
        self.num_workers = num_workers

    @override
    def setup(self, stage: str | None = None) -> None:

        tokenizer = PatchVQTokenizer.from_file(self.codebook)
        self.datasets = {}
        for split, per_digit in (("train", self.captions_per_digit), ("val", 1)):
            images, _ = load_mnist_split(split)
            codes = tokenizer.encode(images).reshape(len(images), -1)
            self.datasets[split] = CaptionedDigits(codes, split_captions(split, per_digit), per_digit)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["train"], batch_size=self.batch_size, shuffle=True, drop_last=True,
                          collate_fn=collate_captioned, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["val"], batch_size=self.batch_size, collate_fn=collate_captioned,
                          num_workers=self.num_workers)


class TextMaskedDiffusionModule(pl.LightningModule):
    """Trains a CLIP text encoder and a MeissonicTransformer jointly by masked-token prediction.

    Args:
        codebook_size: K (must equal the codebook's).
        grid_size: token grid side (7 for MNIST).
        attention_head_dim: transformer head width (must be the sum of ``axes_dims_rope``).
        num_attention_heads: transformer heads; width D = heads x head_dim.
        num_layers: dual-stream blocks.
        num_single_layers: single-stream blocks.
        axes_dims_rope: RoPE widths per id axis.
        text_hidden_size: text encoder width (the transformer's joint_attention_dim).
        text_layers: text encoder layers (the conditioning uses the penultimate one, so >= 2).
        text_heads: text encoder heads.
        max_length: prompt length in tokens (incl. [BOS] / [EOS]).
        caption_dropout: probability of replacing a caption with the empty prompt (for CFG).
        mask_schedule: mask-ratio schedule.
        label_smoothing: cross-entropy label smoothing.
        optimizer: optimizer factory (both networks).
        scheduler: optional LR-scheduler factory, stepped every optimizer step.
        codebook: the codebook copied into the exported folder (None: the shipped asset).
        export_dir: on fit end, the teacher folder ``<log_dir>/<export_dir>``; None disables the export.
        seed: seed of masking and caption dropout.
    """

    def __init__(
        self,
        codebook_size: int = 256,
        grid_size: int = 7,
        attention_head_dim: int = 32,
        num_attention_heads: int = 4,
        num_layers: int = 2,
        num_single_layers: int = 2,
        axes_dims_rope: list[int] | None = None,
        text_hidden_size: int = 64,
        text_layers: int = 2,
        text_heads: int = 2,
        max_length: int = 16,
        caption_dropout: float = 0.1,
        mask_schedule: str = "arccos",
        label_smoothing: float = 0.1,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        codebook: str | None = None,
        export_dir: str | None = "t2i_teacher",
        seed: int = 0,
    ) -> None:
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection


        if mask_schedule not in MASK_SCHEDULES:
            raise ValueError(f"mask_schedule must be one of {MASK_SCHEDULES}, got {mask_schedule!r}")
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1), got {caption_dropout}")
        if text_layers < 2:
            raise ValueError(f"text_layers must be >= 2 (the penultimate layer conditions), got {text_layers}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        if axes_dims_rope is None:  # text/batch axis gets a quarter, rows and columns share the rest
            quarter = (attention_head_dim // 4) // 2 * 2
            rest = (attention_head_dim - quarter) // 2 // 2 * 2
            axes_dims_rope = [attention_head_dim - 2 * rest, rest, rest]
        dim = attention_head_dim * num_attention_heads
        self.network = MeissonicTransformer(
            attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads, num_layers=num_layers,
            num_single_layers=num_single_layers, joint_attention_dim=text_hidden_size, pooled_projection_dim=dim,
            axes_dims_rope=axes_dims_rope, vocab_size=codebook_size + 1, codebook_size=codebook_size,
            downsample=False, upsample=False,
        )
        self.text_tokenizer = build_word_tokenizer(caption_vocabulary())
        vocab = self.text_tokenizer.get_vocab()
        config = CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=text_hidden_size, intermediate_size=4 * text_hidden_size,
            num_hidden_layers=text_layers, num_attention_heads=text_heads, max_position_embeddings=max_length,
            projection_dim=dim, pad_token_id=vocab["[PAD]"], bos_token_id=vocab["[BOS]"],
            eos_token_id=vocab["[EOS]"],
        )
        self.text_encoder = CLIPTextModelWithProjection(config)
        self.grid_size = grid_size
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self._generator: torch.Generator | None = None

    def _rng(self) -> torch.Generator:
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device).manual_seed(self.hparams.seed + self.global_rank)
        return self._generator

    def encode(self, prompts: list[str]):
        """Prompts -> (hidden states (B, L, Dtxt) of the penultimate layer, pooled (B, D)), as PromptTeacher."""
        tokens = self.text_tokenizer(prompts, padding="max_length", max_length=self.hparams.max_length,
                                     truncation=True, return_tensors="pt")
        out = self.text_encoder(input_ids=tokens["input_ids"].to(self.device), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    def _loss(self, batch, drop_captions: bool) -> torch.Tensor:
        codes, captions = batch
        codes = codes.reshape(codes.shape[0], -1)
        gen = self._rng()
        if drop_captions and self.hparams.caption_dropout > 0:
            drop = (torch.rand(len(captions), generator=gen, device=self.device) < self.hparams.caption_dropout)
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        states, pooled = self.encode(captions)
        ratio = sample_mask_ratio(codes.shape[0], self.hparams.mask_schedule, generator=gen, device=self.device)
        masked, mask = mask_tokens(codes, ratio, self.network.mask_id, generator=gen)
        logits = self.network(masked, states, pooled)
        return masked_token_loss(logits, codes, mask, self.hparams.label_smoothing)

    @override
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch, drop_captions=True)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch[1]))
        return loss

    @override
    def validation_step(self, batch, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch, drop_captions=False), prog_bar=True, batch_size=len(batch[1]))

    @override
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def export(self, folder: str | Path) -> Path:
        """Write the teacher folder: ``transformer/``, ``text_encoder/``, ``tokenizer/``, ``codebook.safetensors``."""
        folder = Path(folder)
        self.network.save_pretrained(folder / "transformer")
        self.text_encoder.save_pretrained(str(folder / "text_encoder"))
        give_default_mode((folder / "text_encoder").glob("*.safetensors"))  # written 0600 by safetensors
        self.text_tokenizer.save_pretrained(str(folder / "tokenizer"))
        codebook = Path(self.hparams.codebook) if self.hparams.codebook else asset_path("mnist_codebook.safetensors")
        shutil.copyfile(codebook, folder / "codebook.safetensors")
        return folder

    @override
    def on_fit_end(self) -> None:
        # trainer.log_dir may run a collective: ask it on every rank, write on rank zero only.
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        if not self.hparams.export_dir or getattr(self.trainer, "fast_dev_run", False):
            return
        if self.trainer.is_global_zero:
            path = self.export(Path(log_dir) / self.hparams.export_dir)
            print(f"text-to-image teacher written to {path} (load with dimo_lightning.teachers.prompt.PromptTeacher)")
