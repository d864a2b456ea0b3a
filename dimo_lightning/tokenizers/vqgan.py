"""VQGANTokenizer: the taming-transformers VQModel (VQGAN) that turns MaskGIT codes into images and back.

Our own implementation of the architecture of ``taming.models.vqgan.VQModel`` with the module names of its
checkpoints, so that the ImageNet f16 / 1024-code model used by MaskGIT PyTorch v1.0 (HF ``llvictorll/Maskgit-pytorch``,
``pretrained_maskgit/VQGAN/``) loads strictly: 343 keys, 72,141,699 parameters once the ``loss.*`` keys (LPIPS and
PatchGAN discriminator, training only) are dropped. Facts from taming-transformers (MIT),
``taming/modules/diffusionmodules/model.py`` and ``taming/modules/vqvae/quantize.py``:
https://github.com/CompVis/taming-transformers

Pixel conventions: the public API speaks images in [0, 1]; the network itself works in [-1, 1].
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from dimo_lightning.core.soft_embedding import expected_codebook, grid_probabilities
from dimo_lightning.core.weight_files import load_state_dict_checked, load_torch_file

HF_REPO = "llvictorll/Maskgit-pytorch"
HF_VQGAN_FILES = ("pretrained_maskgit/VQGAN/last.ckpt", "pretrained_maskgit/VQGAN/model.yaml")
# (config, weights) relative to the VQGAN folder: the published / DiMO layout first, then taming's own.
VQGAN_LAYOUTS = (("model.yaml", "last.ckpt"), ("configs/model.yaml", "ckpts/last.ckpt"))
_DDCONFIG_KEYS = (
    "double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
    "attn_resolutions", "dropout",
)


# ---- checkpoint helpers (shared with the MaskGIT teacher) ------------------------------------------------------------
# ---- building blocks (taming names) ----------------------------------------------------------------------------------
def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> swish -> conv3x3 -> GroupNorm -> swish -> dropout -> conv3x3, plus a (1x1) shortcut.

    taming builds it with ``temb_channels=0`` inside VQModel, so there is no ``temb_proj``.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections ``q, k, v, proj_out`` and a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, c, h * w).transpose(2, 3)  # (B, 1, HW, C): one head over all channels

        # SDPA's default scale c**-0.5 and key-softmax are taming's bmm formulation, without the (HW, HW) matrix.
        out = F.scaled_dot_product_attention(tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)))
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Zero-pad right/bottom by one, then a stride-2 3x3 conv (taming's asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block.{j}``, ``attn.{j}`` (possibly empty) and an optional resampler."""

    def __init__(self, channels_in: int, channels_out: int, n_blocks: int, attention: bool, dropout: float) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(channels_in if j == 0 else channels_out, channels_out, dropout) for j in range(n_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(channels_out) for _ in range(n_blocks if attention else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        return x


class _Mid(nn.Module):
    """``block_1 -> attn_1 -> block_2`` at the lowest resolution."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) in [-1, 1] -> latents (B, z_channels, H/f, W/f), f = 2**(len(ch_mult) - 1)."""

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float,
        in_channels: int,
        resolution: int,
        z_channels: int,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        current = resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = _Level(ch * in_mult[i], ch * mult, num_res_blocks, current in attn_resolutions, dropout)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(ch * mult)
                current //= 2
            self.down.append(level)
        channels = ch * ch_mult[-1]
        self.mid = _Mid(channels, dropout)
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, z_channels, h, w) -> image (B, out_ch, f*h, f*w), roughly in [-1, 1]; fully convolutional.

    ``attn_resolutions`` is relative to ``resolution`` (the training size), so the attention levels stay fixed
    whatever size is decoded (e.g. 32x32 latents of a 512 px image still get attention at level 4 only).
    """

    def __init__(
        self,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float,
        resolution: int,
        z_channels: int,
    ) -> None:
        super().__init__()
        channels = ch * ch_mult[-1]
        current = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, channels, 3, padding=1)
        self.mid = _Mid(channels, dropout)
        levels: list[_Level] = []
        for i in reversed(range(len(ch_mult))):
            level = _Level(channels, ch * ch_mult[i], num_res_blocks + 1, current in attn_resolutions, dropout)
            channels = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample(channels)
                current *= 2
            levels.insert(0, level)  # up.{i} is indexed by level, lowest resolution last
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """The codebook, stored as ``embedding.weight`` (n_embed, embed_dim) like taming's ``VectorQuantizer2``."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) long -> latents (B, embed_dim, h, w) (taming's ``get_codebook_entry``)."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """latents (B, embed_dim, h, w) -> codes (B, h, w) of the nearest entries (squared L2, first on ties)."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c).float()  # (B*h*w, C)
        codebook = self.embedding.weight.float()
        # ||z||^2 + ||e||^2 - 2 z.e, as taming computes it; ||z||^2 does not change the argmin and is skipped.
        distances = codebook.pow(2).sum(1)[None] - 2 * flat @ codebook.T  # (B*h*w, n_embed)
        return distances.argmin(dim=1).reshape(b, h, w)


# ---- the tokenizer ---------------------------------------------------------------------------------------------------
class VQGANTokenizer(nn.Module):
    """taming-transformers VQModel: codes (B, h, w) <-> images (B, 3, f*h, f*w) in [0, 1], f = 2**(len(ch_mult)-1).

    The arguments are the ``model.params`` of taming's ``model.yaml`` (``ddconfig`` flattened); the defaults are the
    ImageNet f16 / 1024-code model used by MaskGIT.

    Args:
        embed_dim: codebook vector size.
        n_embed: number of codes K.
        z_channels: encoder output / decoder input channels.
        resolution: training image size (only positions the attention levels).
        in_channels: image channels fed to the encoder.
        out_ch: image channels produced by the decoder.
        ch: base width; level i has ``ch * ch_mult[i]`` channels (each a multiple of 32 for GroupNorm(32)).
        ch_mult: per-level width multipliers; ``len(ch_mult) - 1`` downsamplings.
        num_res_blocks: ResnetBlocks per encoder level (the decoder has one more).
        attn_resolutions: feature-map sizes (relative to ``resolution``) that get attention blocks.
        dropout: dropout inside the ResnetBlocks.
        double_z: must be False (a VQModel's ``quant_conv`` expects ``z_channels`` inputs).
    """

    def __init__(
        self,
        embed_dim: int = 256,
        n_embed: int = 1024,
        z_channels: int = 256,
        resolution: int = 256,
        in_channels: int = 3,
        out_ch: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        double_z: bool = False,
    ) -> None:
        super().__init__()
        if double_z:
            raise ValueError("double_z must be False for a VQGAN (taming VQModel): quant_conv takes z_channels inputs")
        if not ch_mult:
            raise ValueError("ch_mult must hold at least one level")
        bad = [ch * m for m in ch_mult if (ch * m) % 32]
        if bad:
            raise ValueError(f"ch * ch_mult must be multiples of 32 (GroupNorm(32) everywhere); got widths {bad}")
        for name, value in dict(embed_dim=embed_dim, n_embed=n_embed, z_channels=z_channels, ch=ch).items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.out_ch = out_ch
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.encoder: Encoder | None = Encoder(
            ch, ch_mult, num_res_blocks, attn_resolutions, dropout, in_channels, resolution, z_channels
        )
        self.decoder = Decoder(ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resolution, z_channels)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.quant_conv: nn.Conv2d | None = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    @property
    def codebook_size(self) -> int:
        """K: number of codes."""
        return self.n_embed

    @property
    def has_encoder(self) -> bool:
        return self.encoder is not None

    def drop_encoder(self) -> None:
        """Free the encoder and ``quant_conv`` (data-free distillation only decodes); :meth:`encode` then raises."""
        self.encoder = None
        self.quant_conv = None

    # ---- codes -> images -------------------------------------------------------------------------------------------
    def check_codes(self, codes: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``codes`` is an integer (B, h, w) tensor with values in [0, n_embed)."""
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.ndim != 3:
            raise ValueError(f"codes must have shape (B, h, w), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.n_embed):
            raise ValueError(
                f"codes must lie in [0, {self.n_embed}) (VQGAN codebook of {self.n_embed}); got range "
                f"[{int(codes.min())}, {int(codes.max())}]. Map the mask id to a code (e.g. clamp) before decoding."
            )

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook lookup: codes (B, h, w) -> quantized latents (B, embed_dim, h, w)."""
        self.check_codes(codes)
        return self.quantize.lookup(codes.long())

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Quantized latents (B, embed_dim, h, w) -> raw decoder output (B, out_ch, f*h, f*w), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Codes -> images.

        Args:
            codes: (B, h, w) integer codes in [0, n_embed).
            batch_size: decode at most this many images at a time (bounds activation memory); None = all at once.

        Returns:
            (B, out_ch, f*h, f*w) float32 images in [0, 1].
        """
        latents = self.codes_to_latents(codes)
        chunks = latents.split(batch_size) if batch_size else (latents,)
        images = torch.cat([self.decode_latents(chunk).float() for chunk in chunks])
        return (images / 2 + 0.5).clamp(0.0, 1.0)

    def decode_soft(self, probs: torch.Tensor, grid_shape: tuple[int, int] | None = None) -> torch.Tensor:
        """Differentiable decode of code probabilities: the decoder applied to the expected codebook vector.

        ``latents = probs @ codebook`` per position, then :meth:`decode_latents`. Equals :meth:`decode` when
        ``probs`` are one-hot. Not under ``no_grad``: gradients flow to ``probs`` (the weights stay frozen if the
        tokenizer is). The final clamp to [0, 1] is :meth:`decode`'s; pixels outside it get no gradient.

        Args:
            probs: (B, N, K) or (B, h, w, K) probabilities over the K codes.
            grid_shape: (h, w) for flat probs; None assumes a square grid.

        Returns:
            (B, out_ch, f*h, f*w) float32 images in [0, 1].
        """

        grid = grid_probabilities(probs, grid_shape)  # (B, h, w, K)
        latents = expected_codebook(grid, self.quantize.embedding.weight).permute(0, 3, 1, 2)  # (B, D, h, w)
        dtype = self.quantize.embedding.weight.dtype
        images = self.decode_latents(latents.to(dtype).contiguous()).float()
        return (images / 2 + 0.5).clamp(0.0, 1.0)

    # ---- images -> codes -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, in_channels, H, W) in [0, 1], H and W multiples of f -> codes (B, H/f, W/f) long."""
        if self.encoder is None or self.quant_conv is None:
            raise RuntimeError("this VQGANTokenizer was loaded without its encoder (keep_encoder=False)")
        f = self.downsample_factor
        if images.ndim != 4 or images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"images must be (B, C, H, W) with H, W multiples of {f}; got {tuple(images.shape)}")
        z = self.quant_conv(self.encoder(images * 2 - 1))
        return self.quantize.nearest(z)

    # ---- loading ---------------------------------------------------------------------------------------------------
    @staticmethod
    def resolve_folder(path: str | Path) -> tuple[Path, Path]:
        """(model.yaml, last.ckpt) inside a VQGAN folder, in the published or the taming layout.

        Raises:
            FileNotFoundError: neither layout is complete; the message names the missing file and where to get it.
        """
        folder = Path(path)
        expected = " or ".join(f"<folder>/{cfg} + <folder>/{ckpt}" for cfg, ckpt in VQGAN_LAYOUTS)
        where = (
            f"Download {' and '.join(HF_VQGAN_FILES)} from the Hugging Face repo {HF_REPO} "
            f"(e.g. `huggingface-cli download {HF_REPO} {' '.join(HF_VQGAN_FILES)} --local-dir .`) and pass "
            f"the folder pretrained_maskgit/VQGAN."
        )
        if not folder.is_dir():
            raise FileNotFoundError(f"VQGAN folder not found: {folder}. Expected {expected}. {where}")
        for cfg, ckpt in VQGAN_LAYOUTS:
            if (folder / cfg).is_file() and (folder / ckpt).is_file():
                return folder / cfg, folder / ckpt
        # Name the missing file of the layout that is closest to complete (the published one if neither is started).
        for cfg, ckpt in VQGAN_LAYOUTS:
            if (folder / cfg).is_file() or (folder / ckpt).is_file():
                missing = folder / (ckpt if (folder / cfg).is_file() else cfg)
                break
        else:
            missing = folder / VQGAN_LAYOUTS[0][0]
        raise FileNotFoundError(f"VQGAN file not found: {missing}. Expected {expected}. {where}")

    @staticmethod
    def read_config(config_path: str | Path) -> dict[str, Any]:
        """Constructor kwargs from taming's ``model.yaml`` (``model.params``; ``lossconfig`` is ignored).

        Raises:
            ValueError: the YAML is not a VQModel config, or uses features we do not implement (``remap``).
        """
        try:
            config = yaml.safe_load(Path(config_path).read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{config_path} is not valid YAML: {err}") from err
        try:
            params = config["model"]["params"]
            ddconfig = dict(params["ddconfig"])
            kwargs = {"embed_dim": int(params["embed_dim"]), "n_embed": int(params["n_embed"])}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{config_path} is not a taming VQModel config (need model.params.{{embed_dim, n_embed, ddconfig}}): "
                f"{err!r}"
            ) from err
        target = config["model"].get("target", "taming.models.vqgan.VQModel")
        if not str(target).endswith("VQModel"):
            warnings.warn(f"{config_path}: target {target} is not a VQModel; loading it as one", stacklevel=2)
        if params.get("remap") is not None:
            raise ValueError(f"{config_path}: codebook remapping (remap={params['remap']}) is not supported")
        extra = sorted(set(ddconfig) - set(_DDCONFIG_KEYS))
        if extra:
            # taming's Encoder/Decoder swallow unknown kwargs too; strict loading catches any that change the layout.
            warnings.warn(f"{config_path}: ignoring ddconfig keys {extra}", stacklevel=2)
        kwargs.update({k: ddconfig[k] for k in _DDCONFIG_KEYS if k in ddconfig})
        return kwargs

    @classmethod
    def from_folder(cls, path: str | Path, keep_encoder: bool = False) -> VQGANTokenizer:
        """Load a taming VQGAN folder: ``model.yaml`` + ``last.ckpt`` in it, or taming's own layout, a ``configs``
        subfolder with ``model.yaml`` and a ``ckpts`` subfolder with ``last.ckpt``.

        The weights are read memory-mapped and loaded strictly after dropping the ``loss.*`` keys; the result is in
        eval mode with ``requires_grad`` False.

        Args:
            path: the VQGAN folder (e.g. ``pretrained_maskgit/VQGAN``).
            keep_encoder: keep the encoder (needed only by :meth:`encode`; distillation is data-free).

        Raises:
            FileNotFoundError: missing folder or file.
            ValueError: bad config, or checkpoint keys/shapes that do not match the config.
        """
        config_path, ckpt_path = cls.resolve_folder(path)
        kwargs = cls.read_config(config_path)
        # Build on the meta device: no random init of 72M parameters that the checkpoint overwrites anyway.
        with torch.device("meta"):
            model = cls(**kwargs)
        checkpoint = load_torch_file(ckpt_path)
        if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
            raise ValueError(f"{ckpt_path} is not a Lightning checkpoint with a 'state_dict' entry")
        state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("loss.")}
        load_state_dict_checked(model, state, str(ckpt_path), hint=f"Is {config_path} the config of this checkpoint?")
        if not keep_encoder:
            model.drop_encoder()
        model.source_folder = str(Path(path).resolve())
        return model.eval().requires_grad_(False)

    def export_record(self) -> dict | None:
        """How ``dimo export`` rebuilds this tokenizer: by reference to its folder (about 1 GB; never copied)."""
        folder = getattr(self, "source_folder", None)
        if folder is None:
            return None  # built in memory, not from a folder: nothing to point an export at
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "factory": "from_folder",
                "init_args": {"path": folder}}
