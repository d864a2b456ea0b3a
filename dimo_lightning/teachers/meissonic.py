"""MeissonicTeacher: the released Meissonic (1024 px text-to-image, about 1B parameters) from its published folder.

Download (Apache-2.0), e.g. ``huggingface-cli download MeissonFlow/Meissonic --local-dir Meissonic``; the folder
holds ``transformer/``, ``vqvae/``, ``text_encoder/``, ``tokenizer/`` (and ``scheduler/``, ``model_index.json``,
which are not used). Download, layout and memory: docs/meissonic.md.

* ``transformer/``: :class:`~dimo_lightning.nn.meissonic.MeissonicTransformer` (config.json +
  diffusion_pytorch_model[.fp16].safetensors), loaded strictly.
* ``vqvae/``: diffusers ``VQModel``, decode only
  (:class:`~dimo_lightning.tokenizers.diffusers_vq.DiffusersVQTokenizer`).
* ``text_encoder/`` + ``tokenizer/``: transformers ``CLIPTextModelWithProjection`` (CLIP-H text tower) and
  ``CLIPTokenizer``; the transformer gets the penultimate hidden state and the pooled projection.

CFG, the negative prompt, micro-conditions and the timestep convention come from
:class:`~dimo_lightning.teachers.prompt.TextConditionalTeacher`.
"""

from __future__ import annotations

from pathlib import Path

from dimo_lightning.core.conditions import TextCondition
from dimo_lightning.nn.meissonic import MeissonicTransformer
from dimo_lightning.teachers.prompt import TextConditionalTeacher, encode_with_clip, load_clip_text_encoder
from dimo_lightning.tokenizers.diffusers_vq import DiffusersVQTokenizer, read_diffusers_config

MEISSONIC_REPO = "MeissonFlow/Meissonic"
AMUSED_REPOS = ("amused/amused-256", "amused/amused-512")
# The negative prompt of Meissonic's inference script, which the official distillation uses as the teacher's
# unconditional branch (distil_neg_prompt; docs/method.md#targets-and-the-divergence).
MEISSONIC_NEGATIVE_PROMPT = (
    "worst quality, low quality, low res, blurry, distortion, watermark, logo, signature, text, jpeg artifacts, "
    "signature, sketch, duplicate, ugly, identifying mark"
)
RELEASED_LAYOUT = ("transformer", "vqvae", "text_encoder", "tokenizer")


def check_released_layout(root: Path, what: str, repos: str, transformer: str | None = None) -> None:
    """Raise ``FileNotFoundError`` naming the folder, the missing part and the expected layout."""
    if not root.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {root} (download {repos}; expected subfolders "
                                f"{', '.join(s + '/' for s in RELEASED_LAYOUT)})")
    needed = [s for s in RELEASED_LAYOUT if not (s == "transformer" and transformer is not None)]
    for sub in needed:
        if not (root / sub).is_dir():
            raise FileNotFoundError(
                f"{what} folder {root} lacks {sub}/: expected the published layout "
                f"{', '.join(s + '/' for s in RELEASED_LAYOUT)} (download {repos})"
            )
    if transformer is not None and not Path(transformer).is_dir():
        raise FileNotFoundError(f"transformer folder not found: {transformer} (a `dimo export --format diffusers` "
                                "output's transformer/, or the released one)")


class ReleasedTextTeacher(TextConditionalTeacher):
    """What the released text-to-image teachers share: a CLIP text encoder with its tokenizer, a diffusers VQ model
    (decode only), and checks that the parts agree (text widths, codebook size, grid). Subclasses load
    ``self.network``, then call :meth:`_load_shared`."""

    def _load_shared(self, root: Path, variant: str | None, decode_batch_size: int, max_length: int | None,
                     text_width: int, pooled_width: int, what: str) -> None:
        self.tokenizer = DiffusersVQTokenizer.from_pretrained(root / "vqvae", variant, decode_batch_size)
        if self.tokenizer.codebook_size != self.network.codebook_size:
            raise ValueError(
                f"codebook mismatch in {root}: vqvae/ has {self.tokenizer.codebook_size} codes (num_vq_embeddings) "
                f"but the {what} transformer expects codebook_size={self.network.codebook_size}"
            )
        self.text_encoder, self.text_tokenizer = load_clip_text_encoder(
            root / "text_encoder", root / "tokenizer", variant
        )
        config = self.text_encoder.config
        if config.hidden_size != text_width or config.projection_dim != pooled_width:
            raise ValueError(
                f"text encoder of {root} gives states of width {config.hidden_size} and pooled {config.projection_dim}"
                f", the {what} transformer expects {text_width} and {pooled_width}"
            )
        self.max_length = max_length or config.max_position_embeddings
        self.eval().requires_grad_(False)

    def encode_prompts(self, prompts: list[str]) -> TextCondition:
        return encode_with_clip(self.text_encoder, self.text_tokenizer, prompts, self.max_length)

    @property
    def resolution(self) -> int:
        """Image side in pixels."""
        return self.grid_size * self.tokenizer.downsample_factor


class MeissonicTeacher(ReleasedTextTeacher):
    """The released Meissonic, loaded strictly from its published folder (module docstring).

    Args:
        path: the downloaded ``MeissonFlow/Meissonic`` folder.
        transformer: another ``transformer/`` folder to use instead of ``path/transformer`` (e.g. a distilled
            student written by ``dimo export --format diffusers``); the other parts still come from ``path``.
        variant: None reads the fp32 files (falling back to ``.fp16`` ones where only those exist); "fp16" reads the
            fp16 files. Weights are held in float32 either way (bf16 autocast runs the forward).
        resolution: image side in pixels (1024: the released model's; a multiple of 32).
        negative_prompt: the teacher's unconditional branch for CFG (official: Meissonic's negative prompt); null
            uses the empty prompt.
        timestep: the transformer's timestep input, a fraction in [0, 1] (x1000 inside). The official distillation
            passes ``mask_ratio.long() * 1000``, i.e. 0 for every ratio below 1, so 0 (the default) reproduces it.
        micro_conds: [orig width, orig height, crop top, crop left, aesthetic score] for every sample; null gives
            [resolution, resolution, 0, 0, 6] ([1024, 1024, 0, 0, 6], as the official recipe).
        gradient_checkpointing: recompute each transformer block in backward (student and aux inherit it; the
            frozen teacher runs without gradients, so it is unaffected). The official recipe turns it on.
        decode_batch_size: images the VQ decoder decodes at once: it bounds the decoder's activation memory, which
            peaks at about 3.9 GiB per 1024 px image in float32 (measured; 1.3 GiB at 512 px).
        max_length: text tokens; null uses the text encoder's 77 positions.
    """

    def __init__(
        self,
        path: str,
        transformer: str | None = None,
        variant: str | None = None,
        resolution: int = 1024,
        negative_prompt: str | None = MEISSONIC_NEGATIVE_PROMPT,
        timestep: float = 0.0,
        micro_conds: list[float] | None = None,
        gradient_checkpointing: bool = False,
        decode_batch_size: int = 2,
        max_length: int | None = None,
    ) -> None:
        root = Path(path)
        check_released_layout(root, "Meissonic", MEISSONIC_REPO, transformer)
        factor = vq_downsample_factor(root)  # 16 for the released VQ model
        step = factor * 2  # the transformer halves the token grid inside
        if resolution < step or resolution % step:
            raise ValueError(f"resolution must be a positive multiple of {step} (VQ stride {factor} x the "
                             f"transformer's 2x down-sampling), got {resolution}")
        if micro_conds is None:
            micro_conds = [float(resolution), float(resolution), 0.0, 0.0, 6.0]
        super().__init__(resolution // factor, negative_prompt, timestep, micro_conds)
        transformer_folder = Path(transformer) if transformer is not None else root / "transformer"
        self.network = MeissonicTransformer.from_pretrained(transformer_folder, variant, gradient_checkpointing)
        config = self.network.config
        self._load_shared(root, variant, decode_batch_size, max_length, config["joint_attention_dim"],
                          config["pooled_projection_dim"], "Meissonic")


def vq_downsample_factor(root: Path) -> int:
    """Pixels per token side of the VQ model in ``root/vqvae`` (2^(levels - 1), 16 for the released one), read from
    its config before any weights are."""

    config = read_diffusers_config(root / "vqvae", "VQ model")
    channels = config.get("block_out_channels")
    if not isinstance(channels, list) or not channels:
        raise ValueError(f"{root / 'vqvae' / 'config.json'}: block_out_channels must be a non-empty list")
    return 2 ** (len(channels) - 1)
