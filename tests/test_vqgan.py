"""VQGANTokenizer: taming key layout (full size on meta), folder loading, errors, and numerics of the decode path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_tiny_vqgan, write_vqgan_folder

from dimo_lightning.core.weight_files import load_torch_file
from dimo_lightning.tokenizers.vqgan import VQGANTokenizer

torch.set_num_threads(1)

# A tiny two-level VQGAN (stride 2): nin_shortcut at level 1, attention at level 1 (16 px of a 32 px "resolution").
TINY = dict(
    embed_dim=8, n_embed=16, z_channels=8, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
    num_res_blocks=1, attn_resolutions=[16], dropout=0.0,
)


def tiny_vqgan(seed: int = 0) -> VQGANTokenizer:
    return make_tiny_vqgan(TINY, seed)


# ---- full size, meta device --------------------------------------------------------------------------------------
def test_full_size_layout_on_meta() -> None:
    with torch.device("meta"):
        model = VQGANTokenizer()  # the ImageNet f16 / 1024-code config of teachers.md 1.6
    state = model.state_dict()
    assert len(state) == 343
    assert sum(p.numel() for p in model.parameters()) == 72_141_699
    assert not any(k.startswith("loss.") for k in state)
    shapes = {k: list(v.shape) for k, v in state.items()}
    assert shapes["quantize.embedding.weight"] == [1024, 256]
    assert shapes["decoder.conv_in.weight"] == [512, 256, 3, 3]
    assert shapes["post_quant_conv.weight"] == [256, 256, 1, 1]
    assert shapes["quant_conv.weight"] == [256, 256, 1, 1]
    assert shapes["decoder.conv_out.weight"] == [3, 128, 3, 3]
    assert shapes["decoder.up.1.block.0.nin_shortcut.weight"] == [128, 256, 1, 1]
    assert shapes["encoder.down.4.attn.1.proj_out.weight"] == [512, 512, 1, 1]
    assert shapes["decoder.norm_out.weight"] == [128]
    # Attention only at the lowest level; resamplers between levels.
    assert {k.split(".")[2] for k in state if k.startswith("decoder.up.") and ".attn." in k} == {"4"}
    assert {k.split(".")[2] for k in state if ".upsample." in k} == {"1", "2", "3", "4"}
    assert {k.split(".")[2] for k in state if ".downsample." in k} == {"0", "1", "2", "3"}
    assert model.downsample_factor == 16


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="double_z"):
        VQGANTokenizer(**{**TINY, "double_z": True})
    with pytest.raises(ValueError, match="multiples of 32"):
        VQGANTokenizer(**{**TINY, "ch": 16})


# ---- numerics ----------------------------------------------------------------------------------------------------
def _reference_decoder(sd: dict[str, torch.Tensor], z: torch.Tensor, n_levels: int, n_blocks: int) -> torch.Tensor:
    """taming's Decoder.forward written with functional ops over the raw state dict (bmm attention)."""

    def conv(x: torch.Tensor, p: str, padding: int = 1) -> torch.Tensor:
        return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], padding=padding)

    def norm(x: torch.Tensor, p: str) -> torch.Tensor:
        return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)

    def resnet(x: torch.Tensor, p: str) -> torch.Tensor:
        h = norm(x, p + ".norm1")
        h = conv(h * torch.sigmoid(h), p + ".conv1")
        h = norm(h, p + ".norm2")
        h = conv(h * torch.sigmoid(h), p + ".conv2")
        if p + ".nin_shortcut.weight" in sd:
            x = conv(x, p + ".nin_shortcut", padding=0)
        return x + h

    def attn(x: torch.Tensor, p: str) -> torch.Tensor:
        h_ = norm(x, p + ".norm")
        q, k, v = (conv(h_, f"{p}.{n}", padding=0) for n in "qkv")
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)  # (B, HW, C)
        w_ = torch.bmm(q, k.reshape(b, c, hh * ww)) * c**-0.5  # (B, HW_q, HW_k)
        w_ = torch.softmax(w_, dim=2)
        h_ = torch.bmm(v.reshape(b, c, hh * ww), w_.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + conv(h_, p + ".proj_out", padding=0)

    h = conv(z, "decoder.conv_in")
    h = resnet(h, "decoder.mid.block_1")
    h = attn(h, "decoder.mid.attn_1")
    h = resnet(h, "decoder.mid.block_2")
    for i in reversed(range(n_levels)):
        for j in range(n_blocks + 1):
            h = resnet(h, f"decoder.up.{i}.block.{j}")
            if f"decoder.up.{i}.attn.{j}.q.weight" in sd:
                h = attn(h, f"decoder.up.{i}.attn.{j}")
        if i != 0:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.up.{i}.upsample.conv")
    h = norm(h, "decoder.norm_out")
    return conv(h * torch.sigmoid(h), "decoder.conv_out")


def test_decode_matches_hand_computed_first_stage_and_reference_decoder() -> None:
    model = tiny_vqgan()
    sd = model.state_dict()
    codes = torch.randint(0, TINY["n_embed"], (2, 5, 3))  # non-square grid: catches h/w mix-ups
    images = model.decode(codes)
    assert images.shape == (2, 3, 10, 6) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1

    # get_codebook_entry: embedding(indices) -> (B, h, w, C) -> (B, C, h, w) -> post_quant_conv -> decoder.
    emb = sd["quantize.embedding.weight"][codes].permute(0, 3, 1, 2)
    z = F.conv2d(emb, sd["post_quant_conv.weight"], sd["post_quant_conv.bias"])
    with torch.no_grad():
        raw = model.decoder(z)
    torch.testing.assert_close(images, (raw / 2 + 0.5).clamp(0, 1))
    reference = _reference_decoder(sd, z, len(TINY["ch_mult"]), TINY["num_res_blocks"])
    torch.testing.assert_close(raw, reference, atol=1e-5, rtol=1e-4)
    # The test weights must make the clamp matter less than everything else: most pixels are inside (0, 1).
    assert ((images > 0) & (images < 1)).float().mean() > 0.2


def test_decode_in_chunks_and_encode_roundtrip_shapes() -> None:
    model = tiny_vqgan()
    codes = torch.randint(0, TINY["n_embed"], (5, 4, 4))
    torch.testing.assert_close(model.decode(codes, batch_size=2), model.decode(codes))
    images = model.decode(codes)
    assert model.encode(images).shape == (5, 4, 4)
    assert model.encode(images).dtype == torch.long
    # Exact codebook vectors quantize back to themselves.
    assert torch.equal(model.quantize.nearest(model.codes_to_latents(codes)), codes)


def test_encode_matches_taming_quantization() -> None:
    model = tiny_vqgan()
    images = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        z = model.quant_conv(model.encoder(images * 2 - 1))  # (B, C, h, w)
    flat = z.permute(0, 2, 3, 1).reshape(-1, TINY["embed_dim"])
    e = model.quantize.embedding.weight
    d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1)[None] - 2 * flat @ e.T
    assert torch.equal(model.encode(images), d.argmin(1).reshape(2, 4, 4))


def test_codes_out_of_range_raise() -> None:
    model = tiny_vqgan()
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model.decode(torch.full((1, 2, 2), 16))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model.decode(torch.full((1, 2, 2), -1))
    with pytest.raises(ValueError, match="integer"):
        model.decode(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        model.decode(torch.zeros(1, 4, dtype=torch.long))


# ---- loading -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["hf", "taming"])
def test_from_folder_both_layouts(tmp_path: Path, layout: str) -> None:
    model = tiny_vqgan()
    write_vqgan_folder(model, TINY, tmp_path, layout)
    loaded = VQGANTokenizer.from_folder(tmp_path, keep_encoder=True)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    codes = torch.randint(0, 16, (2, 3, 3))
    torch.testing.assert_close(loaded.decode(codes), model.decode(codes))
    images = torch.rand(2, 3, 8, 8)
    assert torch.equal(loaded.encode(images), model.encode(images))


def test_from_folder_drops_encoder_by_default(tmp_path: Path) -> None:
    model = tiny_vqgan()
    write_vqgan_folder(model, TINY, tmp_path)
    loaded = VQGANTokenizer.from_folder(str(tmp_path))
    assert not loaded.has_encoder
    assert not any(k.startswith(("encoder.", "quant_conv.")) for k in loaded.state_dict())
    codes = torch.randint(0, 16, (1, 2, 2))
    torch.testing.assert_close(loaded.decode(codes), model.decode(codes))
    with pytest.raises(RuntimeError, match="without its encoder"):
        loaded.encode(torch.rand(1, 3, 4, 4))


def test_missing_files_name_file_and_source(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="llvictorll/Maskgit-pytorch") as err:
        VQGANTokenizer.from_folder(tmp_path / "nope")
    assert "nope" in str(err.value) and "pretrained_maskgit/VQGAN/last.ckpt" in str(err.value)
    (tmp_path / "model.yaml").write_text("model: {}\n")
    with pytest.raises(FileNotFoundError, match="last.ckpt") as err:
        VQGANTokenizer.from_folder(tmp_path)
    assert "configs/model.yaml" in str(err.value) and "llvictorll/Maskgit-pytorch" in str(err.value)


def _edit_ckpt(folder: Path, edit) -> None:
    path = folder / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt["state_dict"])
    torch.save(ckpt, path)


def test_strict_loading_errors(tmp_path: Path) -> None:
    write_vqgan_folder(tiny_vqgan(), TINY, tmp_path)
    _edit_ckpt(tmp_path, lambda sd: sd.__setitem__("decoder.extra.weight", torch.zeros(1)))
    with pytest.raises(ValueError, match=r"1 unexpected keys: decoder\.extra\.weight"):
        VQGANTokenizer.from_folder(tmp_path)
    _edit_ckpt(tmp_path, lambda sd: (sd.pop("decoder.extra.weight"), sd.pop("post_quant_conv.bias")))
    with pytest.raises(ValueError, match=r"1 missing keys: post_quant_conv\.bias"):
        VQGANTokenizer.from_folder(tmp_path)
    _edit_ckpt(tmp_path, lambda sd: sd.__setitem__("post_quant_conv.bias", torch.zeros(9)))
    with pytest.raises(ValueError, match=r"shape mismatches: post_quant_conv\.bias: file \[9\] vs model \[8\]"):
        VQGANTokenizer.from_folder(tmp_path)


def test_bad_config_raises(tmp_path: Path) -> None:
    write_vqgan_folder(tiny_vqgan(), TINY, tmp_path)
    (tmp_path / "model.yaml").write_text("model:\n  params:\n    n_embed: 16\n")
    with pytest.raises(ValueError, match="not a taming VQModel config"):
        VQGANTokenizer.from_folder(tmp_path)


def test_load_torch_file_legacy_and_corrupt(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)  # no mmap
    assert torch.equal(load_torch_file(tmp_path / "legacy.pth")["a"], torch.ones(2))
    (tmp_path / "corrupt.ckpt").write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(ValueError, match="corrupt.ckpt"):
        load_torch_file(tmp_path / "corrupt.ckpt")
