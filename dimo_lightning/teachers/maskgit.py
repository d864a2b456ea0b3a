"""MaskGITTeacher: the class-conditional ImageNet MaskGIT (PyTorch reproduction v1.0) over VQGAN f16 tokens.

Weights: Hugging Face ``llvictorll/Maskgit-pytorch`` (MIT),
``pretrained_maskgit/MaskGIT/MaskGIT_ImageNet_{256,512}.pth`` for the transformer and
``pretrained_maskgit/VQGAN/{last.ckpt, model.yaml}`` for the tokenizer. Architecture and file layouts follow
https://github.com/valeoai/Maskgit-pytorch (tag v1.0).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from dimo_lightning.core.weight_files import load_state_dict_checked, load_torch_file
from dimo_lightning.nn.transformer import MaskTransformer
from dimo_lightning.teachers.base import ClassConditionalTeacher
from dimo_lightning.tokenizers.vqgan import HF_REPO, VQGANTokenizer

HF_MASKGIT_FILES = (
    "pretrained_maskgit/MaskGIT/MaskGIT_ImageNet_256.pth",
    "pretrained_maskgit/MaskGIT/MaskGIT_ImageNet_512.pth",
)


class MaskGITTeacher(ClassConditionalTeacher):
    """MaskGIT teacher: a :class:`MaskTransformer` (1024 codes + mask, 1000 classes) and its taming VQGAN.

    Both are loaded strictly, put in eval mode and frozen; they stay in eval mode even when a parent module calls
    ``.train()`` (the teacher's dropout must stay off during distillation). The architecture arguments default to the
    released "base" model; they exist so that tests can build tiny teachers.

    Args:
        checkpoint: path to ``MaskGIT_ImageNet_256.pth`` (or ``_512.pth``): a torch pickle with ``model_state_dict``.
        vqgan: the VQGAN folder (``model.yaml`` + ``last.ckpt``, or taming's ``configs/`` + ``ckpts/`` layout).
        resolution: image size in pixels; the token grid is resolution / 16 per side (16 for 256, 32 for 512).
        hidden_dim: transformer width.
        depth: transformer layers.
        heads: attention heads (16 for the released weights; not recoverable from the checkpoint's shapes).
        mlp_dim: MLP hidden width.
        dropout: dropout rate (inactive: the teacher runs in eval mode; kept for copies trained from it).
        codebook_size: number of VQ codes; must equal the VQGAN's ``n_embed``.
        num_classes: number of classes (labels 0..num_classes-1; the null class is handled by the network).
    """

    def __init__(
        self,
        checkpoint: str,
        vqgan: str,
        resolution: int = 256,
        hidden_dim: int = 768,
        depth: int = 24,
        heads: int = 16,
        mlp_dim: int = 3072,
        dropout: float = 0.1,
        codebook_size: int = 1024,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        checkpoint_path = Path(checkpoint)
        if not checkpoint_path.is_file():
            raise FileNotFoundError(
                f"MaskGIT checkpoint not found: {checkpoint_path}. Expected a file like MaskGIT_ImageNet_256.pth "
                f"(a torch pickle with 'model_state_dict'), published in the Hugging Face repo {HF_REPO} as "
                f"{' / '.join(HF_MASKGIT_FILES)} (e.g. `huggingface-cli download {HF_REPO} {HF_MASKGIT_FILES[0]} "
                "--local-dir .`)."
            )
        # Check the cheap things (files, configs) before reading GBs of weights.
        vqgan_config, _ = VQGANTokenizer.resolve_folder(vqgan)
        vq_kwargs = VQGANTokenizer.read_config(vqgan_config)
        if vq_kwargs["n_embed"] != codebook_size:
            raise ValueError(
                f"codebook mismatch: the VQGAN {vqgan_config} has n_embed={vq_kwargs['n_embed']} codes but the "
                f"MaskGIT transformer ({checkpoint_path}) is configured with codebook_size={codebook_size}"
            )
        factor = 2 ** (len(vq_kwargs.get("ch_mult", (1, 1, 2, 2, 4))) - 1)  # 16 for the released VQGAN
        if resolution < factor or resolution % factor:
            raise ValueError(
                f"resolution must be a positive multiple of {factor} (the VQGAN's stride), got {resolution}"
            )

        # Build on the meta device and assign the file's tensors: no random init of 174M parameters, and the
        # network (tok_emb, bias, pos_emb, ...) holds the released weights before anything can copy it.
        with torch.device("meta"):
            self.network = MaskTransformer(
                codebook_size=codebook_size, num_classes=num_classes, grid_size=resolution // factor,
                hidden_dim=hidden_dim, depth=depth, heads=heads, mlp_dim=mlp_dim, dropout=dropout,
            )
        load_state_dict_checked(
            self.network, self._read_weights(checkpoint_path), str(checkpoint_path), hint=self._hint(resolution, factor)
        )
        self.tokenizer = VQGANTokenizer.from_folder(vqgan)
        if self.tokenizer.n_embed != self.network.codebook_size:  # guards a config/ckpt disagreement inside the folder
            raise ValueError(
                f"codebook mismatch: VQGAN {vqgan} has {self.tokenizer.n_embed} codes, MaskGIT {checkpoint_path} "
                f"has {self.network.codebook_size}"
            )
        self.eval().requires_grad_(False)

    @staticmethod
    def _read_weights(path: Path) -> dict[str, torch.Tensor]:
        """``model_state_dict`` of a MaskGIT .pth, with a DataParallel/DDP ``module.`` prefix stripped (or the
        tensors of a ``.safetensors`` file with the same keys, such as a ``dimo export``-ed student)."""
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                return {k.removeprefix("module."): v for k, v in load_file(str(path)).items()}
            except (SafetensorError, OSError) as err:
                raise ValueError(f"cannot read {path}: {err}") from err
        checkpoint = load_torch_file(path)
        if not isinstance(checkpoint, Mapping):
            raise ValueError(f"{path} is not a MaskGIT checkpoint (expected a dict, got {type(checkpoint).__name__})")
        if "model_state_dict" in checkpoint:
            state = checkpoint["model_state_dict"]
        elif all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            state = checkpoint  # a plain state dict (e.g. an exported student, same keys)
        else:
            raise ValueError(
                f"{path} has no 'model_state_dict' (found keys {sorted(map(str, checkpoint))[:8]}); expected the "
                "MaskGIT v1.0 layout {iter, global_epoch, model_state_dict, optimizer_state_dict}"
            )
        return {k.removeprefix("module."): v for k, v in state.items()}

    def _hint(self, resolution: int, factor: int) -> str:
        return (
            f"Built for resolution {resolution} (grid {resolution // factor}, pos_emb "
            f"{list(self.network.pos_emb.shape)}): use resolution=256 with MaskGIT_ImageNet_256.pth and 512 with "
            "_512.pth; the other sizes (hidden_dim, depth, mlp_dim, codebook_size, num_classes) must match the file."
        )
