"""AmusedTeacher: the released aMUSEd (the open MUSE; 256 or 512 px text-to-image) from its published folder.

Download (openrail++), e.g. ``huggingface-cli download amused/amused-512 --local-dir amused-512`` (or
``amused/amused-256``); the folder holds ``transformer/`` (diffusers ``UVit2DModel``), ``vqvae/`` (``VQModel``),
``text_encoder/`` (CLIP-L ``CLIPTextModelWithProjection``), ``tokenizer/`` (``CLIPTokenizer``), plus ``scheduler/``
and ``model_index.json`` (not used). Download and layout: docs/meissonic.md#what-to-download.

The vocabulary (``codebook_size``; mask id ``vocab_size - 1``), the token grid (``sample_size``) and the
micro-conditioning widths are read from ``transformer/config.json``; the image size follows from the VQ model's
stride (16). aMUSEd has no timestep input.
"""

from __future__ import annotations

from pathlib import Path

from dimo_lightning.core.weight_files import load_state_dict_checked
from dimo_lightning.teachers.meissonic import (
    AMUSED_REPOS,
    ReleasedTextTeacher,
    check_released_layout,
    vq_downsample_factor,
)
from dimo_lightning.tokenizers.diffusers_vq import (
    build_diffusers_model,
    read_diffusers_config,
    read_diffusers_weights,
)


class AmusedTeacher(ReleasedTextTeacher):
    """The released aMUSEd, loaded strictly from its published folder (module docstring).

    Args:
        path: the downloaded ``amused/amused-256`` or ``amused/amused-512`` folder.
        transformer: another ``transformer/`` folder instead of ``path/transformer`` (e.g. a distilled student written
            by ``dimo export --format diffusers``).
        variant: None reads the fp32 files (falling back to ``.fp16`` ones where only those exist); "fp16" reads the
            fp16 files. Weights are held in float32.
        negative_prompt: the teacher's unconditional branch for CFG; null uses the empty prompt (the aMUSEd pipeline's
            default).
        micro_conds: [orig width, orig height, crop top, crop left, aesthetic score] for every sample; null gives
            [resolution, resolution, 0, 0, 6], the pipeline's defaults.
        gradient_checkpointing: recompute each attention block in backward (student and aux inherit it).
        decode_batch_size: images the VQ decoder decodes at once (its activations peak at about 1.3 GiB per 512 px
            image and 0.7 GiB per 256 px image in float32, measured).
        max_length: text tokens; null uses the text encoder's 77 positions.
    """

    def __init__(
        self,
        path: str,
        transformer: str | None = None,
        variant: str | None = None,
        negative_prompt: str | None = None,
        micro_conds: list[float] | None = None,
        gradient_checkpointing: bool = False,
        decode_batch_size: int = 4,
        max_length: int | None = None,
    ) -> None:
        from dimo_lightning.nn.amused import AmusedTransformer  # imports diffusers

        root = Path(path)
        repos = " or ".join(AMUSED_REPOS)
        check_released_layout(root, "aMUSEd", repos, transformer)
        folder = Path(transformer) if transformer is not None else root / "transformer"
        config = read_diffusers_config(folder, "aMUSEd transformer")
        grid = config.get("sample_size")
        if not isinstance(grid, int) or grid < 1:
            raise ValueError(f"{folder / 'config.json'}: sample_size (the token grid side) must be a positive integer")
        resolution = grid * vq_downsample_factor(root)
        if micro_conds is None:
            micro_conds = [float(resolution), float(resolution), 0.0, 0.0, 6.0]
        super().__init__(grid, negative_prompt, 0.0, micro_conds)
        network = build_diffusers_model(AmusedTransformer, config, "aMUSEd transformer",
                                        folder / "config.json", class_name="UVit2DModel")
        state, weights = read_diffusers_weights(folder, "aMUSEd transformer", variant)
        load_state_dict_checked(network, state, str(weights), hint=f"Is {folder / 'config.json'} the config of "
                                "these weights?")
        network.gradient_checkpointing = gradient_checkpointing
        self.network = network
        self._load_shared(root, variant, decode_batch_size, max_length, network.config.encoder_hidden_size,
                          network.config.cond_embed_dim, "aMUSEd")
