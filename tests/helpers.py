"""Shared test helpers: tiny random-weight teachers saved in the real file layouts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from dimo_lightning.nn.transformer import MaskTransformer
from dimo_lightning.tokenizers.patch_vq import PatchVQTokenizer
from dimo_lightning.tokenizers.vqgan import VQGANTokenizer

SETTINGS_GROUPS = ("student", "targets", "aux", "optim", "sampling", "gan", "run")


def merge_settings(defaults: dict, overrides: dict) -> dict:
    """DiMOModule keyword arguments: ``overrides`` over ``defaults``, settings groups (plain dicts) merged field by
    field, so ``optim={"max_generator_steps": 2}`` keeps the other ``optim`` defaults."""
    merged = dict(defaults)
    for key, value in overrides.items():
        if key in SETTINGS_GROUPS and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def make_context(teacher, conditions, real=None, *, student=None, aux=None, r_init: float = 0.6,
                 sigma: float = 0.1, noise_scale: float = 1.0, seed: int = 0, temperature: float = 1.0,
                 exclude_mask: bool = True, gan_weight: float = 0.0):
    """A hand-built one-micro-batch :class:`IterationContext` (student and aux: copies of the teacher's network)."""
    import copy

    from dimo_lightning.inference.one_step import StudentInput, TokenSampling
    from dimo_lightning.objectives.context import IterationContext

    exclude = (teacher.mask_id,) if exclude_mask and teacher.logit_width > teacher.mask_id else ()
    return IterationContext(
        teacher, student if student is not None else copy.deepcopy(teacher.network),
        aux if aux is not None else copy.deepcopy(teacher.network), [conditions],
        None if real is None else [real], StudentInput(r_init, sigma, noise_scale),
        TokenSampling(temperature, exclude=exclude), torch.Generator().manual_seed(seed), torch.device("cpu"),
        gan_weight=gan_weight,
    )


TINY_ARCH = dict(codebook_size=16, num_classes=10, grid_size=7, hidden_dim=32, depth=1, heads=2, mlp_dim=64,
                 dropout=0.1)


def save_tiny_mnist_teacher(directory: Path, seed: int = 0, **overrides) -> tuple[Path, Path]:
    """A random MaskTransformer + 16-code PatchVQ codebook in the MNISTTeacher layout -> (weights, codebook)."""
    torch.manual_seed(seed)
    arch = {**TINY_ARCH, **overrides}
    net = MaskTransformer(**arch)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    (directory / "teacher.json").write_text(json.dumps(arch))
    codebook = directory / "codebook.safetensors"
    PatchVQTokenizer(torch.rand(arch["codebook_size"], 16)).save(codebook)
    return weights, codebook


def make_tiny_vqgan(config: dict, seed: int = 0) -> VQGANTokenizer:
    """A random VQGAN of ``config`` with non-trivial norms/biases and a unit-scale codebook."""
    torch.manual_seed(seed)
    model = VQGANTokenizer(**config)
    with torch.no_grad():  # non-trivial norms/biases, so that a swapped weight/bias would show in the outputs
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.quantize.embedding.weight.normal_()
    return model.eval()


def write_vqgan_folder(
    model: VQGANTokenizer, config: dict, folder: Path, layout: str = "hf", n_embed: int | None = None
) -> Path:
    """Save ``model`` like the published VQGAN: Lightning-style last.ckpt (with loss.* keys) + OmegaConf model.yaml."""
    config_path, ckpt_path = {
        "hf": (folder / "model.yaml", folder / "last.ckpt"),
        "taming": (folder / "configs" / "model.yaml", folder / "ckpts" / "last.ckpt"),
    }[layout]
    config_path.parent.mkdir(parents=True, exist_ok=True)
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    ddconfig = {"double_z": False, **{k: v for k, v in config.items() if k not in ("embed_dim", "n_embed")}}
    yaml_config = {
        "model": {
            "base_learning_rate": 4.5e-6,
            "target": "taming.models.vqgan.VQModel",
            "params": {
                "embed_dim": config["embed_dim"],
                "n_embed": n_embed or config["n_embed"],
                "ddconfig": ddconfig,
                "lossconfig": {
                    "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                    "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 0,
                               "disc_weight": 0.75, "codebook_weight": 1.0},
                },
            },
        }
    }
    config_path.write_text(yaml.safe_dump(yaml_config, sort_keys=False))
    state = dict(model.state_dict())
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(4, 3, 3, 3)
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 4, 1, 1)
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    state["loss.logvar"] = torch.zeros(())
    opt = torch.optim.Adam(model.decoder.conv_out.parameters())
    model.decoder.conv_out.weight.sum().backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    torch.save(
        {"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8", "state_dict": state,
         "optimizer_states": [opt.state_dict()], "lr_schedulers": []},
        ckpt_path,
    )
    return folder


def load_script(name: str):
    """A module of scripts/ (not part of the installed package), imported from its file."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
