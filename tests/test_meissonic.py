"""MeissonicTransformer: released key layout, numerics of its pieces, files, checkpointing, diffusers cross-check."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re

import pytest
import torch

from dimo_lightning.nn.meissonic import (
    FP16_WEIGHTS_NAME,
    WEIGHTS_NAME,
    MeissonicTransformer,
    RMSNorm,
    apply_rope,
    image_position_ids,
    rope_frequencies,
    sinusoidal_embedding,
)
from dimo_lightning.nn.transformer import count_parameters

# transformer/config.json of MeissonFlow/Meissonic (teachers.md 2.2).
RELEASED_CONFIG = {
    "_class_name": "Transformer2DModel", "_diffusers_version": "0.30.2", "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56], "codebook_size": 8192, "downsample": True, "guidance_embeds": False,
    "in_channels": 64, "joint_attention_dim": 1024, "num_attention_heads": 8, "num_layers": 14,
    "num_single_layers": 28, "patch_size": 1, "pooled_projection_dim": 1024, "upsample": True, "vocab_size": 8256,
}
TINY = dict(attention_head_dim=8, num_attention_heads=2, num_layers=2, num_single_layers=2, joint_attention_dim=12,
            pooled_projection_dim=16, axes_dims_rope=[2, 2, 4], vocab_size=21, codebook_size=16)


def tiny(seed: int = 0, **overrides) -> MeissonicTransformer:
    torch.manual_seed(seed)
    model = MeissonicTransformer(**{**TINY, **overrides})
    with torch.no_grad():  # non-trivial norms and modulations, so a swapped weight would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm_" in name or name.endswith("layer_norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def inputs(b: int = 3, side: int = 4, length: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, TINY["vocab_size"], (b, side, side), generator=g)
    return (codes, torch.randn(b, length, TINY["joint_attention_dim"], generator=g),
            torch.randn(b, TINY["pooled_projection_dim"], generator=g),
            torch.rand(b, 5, generator=g) * torch.tensor([1024.0, 1024, 10, 10, 8]))


def test_released_config_on_meta_device_has_the_released_keys_and_parameters():
    with torch.device("meta"):
        model = MeissonicTransformer.from_config(RELEASED_CONFIG)
    state = model.state_dict()
    assert len(state) == 867
    assert count_parameters(model) == 1_006_946_304
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    expected = {
        "embed.embeddings.weight": (8256, 1024), "embed.layer_norm.weight": (1024,),
        "embed.conv.weight": (1024, 1024, 1, 1), "down_block.downsample.norm.weight": (1024,),
        "down_block.downsample.conv.weight": (1024, 1024, 2, 2), "project_to_hidden_norm.weight": (1024,),
        "project_to_hidden.weight": (1024, 1024), "context_embedder.weight": (1024, 1024),
        "context_embedder.bias": (1024,), "encoder_proj_layer_norm.weight": (1024,),
        "cond_embed.linear_1.weight": (1024, 2304), "cond_embed.linear_2.weight": (1024, 1024),
        "time_text_embed.timestep_embedder.linear_1.weight": (1024, 256),
        "time_text_embed.timestep_embedder.linear_1.bias": (1024,),
        "time_text_embed.timestep_embedder.linear_2.weight": (1024, 1024),
        "time_text_embed.timestep_embedder.linear_2.bias": (1024,),
        "time_text_embed.text_embedder.linear_1.bias": (1024,),
        "time_text_embed.text_embedder.linear_2.weight": (1024, 1024),
        "time_text_embed.text_embedder.linear_1.weight": (1024, 1024),
        "time_text_embed.text_embedder.linear_2.bias": (1024,),
        "project_from_hidden_norm.weight": (1024,), "project_from_hidden.weight": (1024, 1024),
        "up_block.upsample.norm.weight": (1024,), "up_block.upsample.conv.weight": (1024, 1024, 2, 2),
        "mlm_layer.conv1.weight": (1024, 1024, 1, 1), "mlm_layer.layer_norm.weight": (1024,),
        "mlm_layer.conv2.weight": (8192, 1024, 1, 1),
    }
    for key, shape in expected.items():
        assert shapes.pop(key) == shape, key
    dual = {
        r"norm1(_context)?\.linear\.weight": (6144, 1024), r"norm1(_context)?\.linear\.bias": (6144,),
        r"attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)\.weight": (1024, 1024),
        r"attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)\.bias": (1024,),
        r"attn\.norm_(added_)?[qk]\.weight": (128,),
        r"ff(_context)?\.net\.0\.proj\.weight": (4096, 1024), r"ff(_context)?\.net\.0\.proj\.bias": (4096,),
        r"ff(_context)?\.net\.2\.weight": (1024, 4096), r"ff(_context)?\.net\.2\.bias": (1024,),
    }
    single = {
        r"norm\.linear\.weight": (3072, 1024), r"norm\.linear\.bias": (3072,),
        r"proj_mlp\.weight": (4096, 1024), r"proj_mlp\.bias": (4096,),
        r"proj_out\.weight": (1024, 5120), r"proj_out\.bias": (1024,),
        r"attn\.to_[qkv]\.weight": (1024, 1024), r"attn\.to_[qkv]\.bias": (1024,), r"attn\.norm_[qk]\.weight": (128,),
    }
    for prefix, count, per_block, patterns in (("transformer_blocks", 14, 32, dual),
                                               ("single_transformer_blocks", 28, 14, single)):
        for i in range(count):
            keys = [k for k in list(shapes) if k.startswith(f"{prefix}.{i}.")]
            assert len(keys) == per_block, (prefix, i, keys)
            for key in keys:
                rest = key[len(f"{prefix}.{i}."):]
                match = [shape for pattern, shape in patterns.items() if re.fullmatch(pattern, rest)]
                assert match == [shapes.pop(key)], key
    assert not shapes  # every key accounted for
    assert not list(model.buffers())


@pytest.mark.parametrize("down", [True, False])
def test_tiny_forward_backward_shapes(down):
    model = tiny(downsample=down, upsample=down).train()
    codes, states, pooled, micro = inputs()
    logits = model(codes, states, pooled, micro)
    assert logits.shape == (3, 16, 16)
    flat = model(codes.reshape(3, -1), states, pooled, micro)
    torch.testing.assert_close(flat, logits)
    logits.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert ("down_block.downsample.conv.weight" in model.state_dict()) == down


def test_rms_norm_matches_independent_formula():
    x = torch.randn(4, 7, 10)
    norm = RMSNorm(10, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    expected = torch.stack([row / math.sqrt(float((row**2).mean()) + 1e-6) for row in x.reshape(-1, 10)])
    torch.testing.assert_close(norm(x), expected.reshape(4, 7, 10) * norm.weight)
    assert RMSNorm(10, elementwise_affine=False).weight is None
    half = norm(x.half())
    assert half.dtype == torch.float16


def test_rope_matches_complex_rotation_and_is_identity_on_zero_ids():
    axes = (4, 6, 6)
    ids = torch.cat([torch.zeros(3, 3), image_position_ids(2, 3)])  # 3 text ids, 6 image ids
    cos, sin = rope_frequencies(ids, axes)
    assert cos.shape == (9, 16)
    x = torch.randn(2, 3, 9, 16)
    out = apply_rope(x, cos, sin)
    # independent: each (even, odd) pair is a complex number multiplied by exp(i * pos * theta^(-2j/d))
    angles = []
    for axis, dim in enumerate(axes):
        freqs = torch.tensor([10000.0 ** (-2 * j / dim) for j in range(dim // 2)], dtype=torch.float64)
        angles.append(ids[:, axis].double()[:, None] * freqs)
    angle = torch.cat(angles, dim=1)  # (9, 8)
    z = torch.view_as_complex(x.double().reshape(2, 3, 9, 8, 2).contiguous())
    expected = torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).reshape(2, 3, 9, 16)
    torch.testing.assert_close(out, expected.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, :, :3], x[:, :, :3])  # text rows: identity
    assert not torch.allclose(out[:, :, 4:], x[:, :, 4:])
    # rows of the image ids are (0, row, col) in row-major order
    assert image_position_ids(2, 3).tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]


def test_sinusoid_is_cos_then_sin():
    emb = sinusoidal_embedding(torch.tensor([0.0, 3.0]), 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))
    assert emb[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_batch_independence_and_text_permutation_invariance():
    model = tiny()
    codes, states, pooled, micro = inputs(b=3, length=6)
    full = model(codes, states, pooled, micro)
    alone = model(codes[1:2], states[1:2], pooled[1:2], micro[1:2])
    torch.testing.assert_close(full[1:2], alone, atol=1e-5, rtol=1e-5)
    # text ids are all 0 and no text mask is used: the image logits cannot depend on the order of text tokens
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(model(codes, states[:, perm], pooled, micro), full, atol=1e-5, rtol=1e-5)
    # ... but they do depend on the image layout (RoPE over rows/cols) and on every condition input
    assert not torch.allclose(model(codes.flip(1), states, pooled, micro).reshape(3, 4, 4, -1).flip(1), full.reshape(
        3, 4, 4, -1))
    assert not torch.allclose(model(codes, states, pooled + 1, micro), full)
    assert not torch.allclose(model(codes, states, pooled, micro + 1), full)
    assert not torch.allclose(model(codes, states, pooled, micro, timestep=0.5), full)
    torch.testing.assert_close(model(codes, states, pooled, micro, timestep=torch.zeros(3)), full)


def test_embedding_noise_is_seeded_and_variance_preserving():
    model = tiny()
    codes, states, pooled, micro = inputs()
    clean = model(codes, states, pooled, micro)
    torch.testing.assert_close(model(codes, states, pooled, micro, emb_noise_sigma=0.0), clean)

    def noisy(c, sigma, seed=3):
        return model(c, states, pooled, micro, emb_noise_sigma=sigma, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(noisy(codes, 0.3), noisy(codes, 0.3))
    assert not torch.allclose(noisy(codes, 0.3), clean)
    assert not torch.allclose(noisy(codes, 0.3, seed=4), noisy(codes, 0.3))
    # sigma = 1: the input embedding is pure noise, so the codes no longer matter
    other = (codes + 1) % TINY["vocab_size"]
    torch.testing.assert_close(noisy(other, 1.0), noisy(codes, 1.0))
    per_sample = noisy(codes, torch.tensor([0.0, 1.0, 1.0]))
    torch.testing.assert_close(per_sample[0], clean[0])
    assert model.code_embedding_rms() > 0


def test_gradient_checkpointing_gives_identical_outputs_and_gradients():
    plain = tiny().train()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing = True
    codes, states, pooled, micro = inputs()
    out_a = plain(codes, states, pooled, micro)
    out_b = ckpt(codes, states, pooled, micro)
    torch.testing.assert_close(out_a, out_b)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert MeissonicTransformer.from_config({**TINY, "gradient_checkpointing": True}).gradient_checkpointing


def test_save_and_load_round_trip_and_errors(tmp_path):
    model = tiny()
    folder = model.save_pretrained(tmp_path / "transformer")
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "Transformer2DModel" and config["vocab_size"] == 21
    loaded = MeissonicTransformer.from_pretrained(folder).eval()
    codes, states, pooled, micro = inputs()
    torch.testing.assert_close(loaded(codes, states, pooled, micro), model(codes, states, pooled, micro))
    assert loaded.mask_id == 20 and next(loaded.parameters()).device.type == "cpu"
    # the half-precision variant alone
    fp16 = tmp_path / "fp16"
    fp16.mkdir()
    (fp16 / "config.json").write_text((folder / "config.json").read_text())
    from safetensors.torch import save_file

    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(fp16 / FP16_WEIGHTS_NAME))
    half_loaded = MeissonicTransformer.from_pretrained(fp16)
    assert next(half_loaded.parameters()).dtype == torch.float32
    torch.testing.assert_close(half_loaded(codes, states, pooled, micro), model(codes, states, pooled, micro),
                               atol=0.05, rtol=0.05)
    # bad keys are listed
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    state = {k: v for k, v in model.state_dict().items() if k != "mlm_layer.conv2.weight"}
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(bad / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"missing keys: mlm_layer\.conv2\.weight.*unexpected keys: extra\.weight"):
        MeissonicTransformer.from_pretrained(bad)
    with pytest.raises(FileNotFoundError, match="config.json"):
        MeissonicTransformer.from_pretrained(tmp_path / "nowhere")
    (bad / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        MeissonicTransformer.from_pretrained(bad)


def test_bad_configs_and_inputs_are_rejected():
    with pytest.raises(ValueError, match="unknown Meissonic transformer config keys: typo"):
        MeissonicTransformer.from_config({**TINY, "typo": 1})
    with pytest.raises(ValueError, match="axes_dims_rope"):
        MeissonicTransformer(**{**TINY, "axes_dims_rope": [2, 2, 2]})
    with pytest.raises(ValueError, match="pooled_projection_dim"):
        MeissonicTransformer(**{**TINY, "pooled_projection_dim": 12})
    model = tiny()
    codes, states, pooled, micro = inputs()
    with pytest.raises(ValueError, match="even token grid"):
        model(codes[:, :3, :3], states, pooled, micro)
    with pytest.raises(ValueError, match="not a square"):
        model(codes.reshape(3, -1)[:, :15], states, pooled, micro)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(codes, states[:2], pooled, micro)


# ---- numerical cross-check against diffusers (skipped when it is not installed) ------------------------------------
diffusers_missing = importlib.util.find_spec("diffusers") is None


@pytest.mark.skipif(diffusers_missing, reason="diffusers not installed")
def test_blocks_match_diffusers_with_copied_weights():
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, TimestepEmbedding
    from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm
    from diffusers.models.transformers.transformer_flux import (
        FluxPosEmbed,
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )
    from diffusers.models.upsampling import Upsample2D

    model = tiny()
    dim, heads, head_dim = 16, 2, 8

    def copied(reference, ours):
        reference.load_state_dict(ours.state_dict(), strict=True)  # also proves the key names agree
        return reference.eval()

    x = torch.randn(2, 6, dim)
    context = torch.randn(2, 3, dim)
    temb = torch.randn(2, dim)
    ids = torch.cat([torch.zeros(3, 3), image_position_ids(2, 3)])
    rope = rope_frequencies(ids, (2, 2, 4))
    ref_rope = FluxPosEmbed(theta=10000, axes_dim=[2, 2, 4])(ids)
    torch.testing.assert_close(rope[0], ref_rope[0])
    torch.testing.assert_close(rope[1], ref_rope[1])

    ours = model.transformer_blocks[0]
    ref = copied(FluxTransformerBlock(dim, heads, head_dim, qk_norm="rms_norm", eps=1e-6), ours)
    ref_ctx, ref_x = ref(hidden_states=x, encoder_hidden_states=context, temb=temb, image_rotary_emb=ref_rope)
    our_ctx, our_x = ours(x, context, temb, rope)
    torch.testing.assert_close(our_x, ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_ctx, ref_ctx, atol=1e-5, rtol=1e-5)

    ours = model.single_transformer_blocks[0]
    ref = copied(FluxSingleTransformerBlock(dim, heads, head_dim), ours)
    ref_ctx, ref_x = ref(hidden_states=x, encoder_hidden_states=context, temb=temb, image_rotary_emb=ref_rope)
    joint = ours(torch.cat([context, x], dim=1), temb, rope)
    torch.testing.assert_close(joint, torch.cat([ref_ctx, ref_x], dim=1), atol=1e-5, rtol=1e-5)

    grid = torch.randn(2, dim, 4, 4)
    ref = copied(Downsample2D(dim, use_conv=True, out_channels=dim, padding=0, name="Conv2d_0", kernel_size=2,
                              norm_type="rms_norm", eps=1e-6, elementwise_affine=True, bias=False),
                 model.down_block.downsample)
    torch.testing.assert_close(model.down_block(grid), ref(grid), atol=1e-5, rtol=1e-5)
    ref = copied(Upsample2D(dim, use_conv_transpose=True, out_channels=dim, kernel_size=2, padding=0, name="conv",
                            norm_type="rms_norm", eps=1e-6, elementwise_affine=True, bias=False, interpolate=False),
                 model.up_block.upsample)
    torch.testing.assert_close(model.up_block(grid), ref(grid), atol=1e-5, rtol=1e-5)

    ref = copied(DiffusersRMSNorm(dim, eps=1e-6, elementwise_affine=True), model.project_to_hidden_norm)
    torch.testing.assert_close(model.project_to_hidden_norm(x), ref(x))
    ref = copied(TimestepEmbedding(16 + 5 * 256, dim, sample_proj_bias=False), model.cond_embed)
    pooled_micro = torch.randn(2, 16 + 5 * 256)
    torch.testing.assert_close(model.cond_embed(pooled_micro), ref(pooled_micro))
    ref = copied(CombinedTimestepTextProjEmbeddings(dim, 16), model.time_text_embed)
    timestep = torch.tensor([0.0, 370.0])
    pooled = torch.randn(2, 16)
    torch.testing.assert_close(model.time_text_embed(timestep, pooled), ref(timestep, pooled), atol=1e-5, rtol=1e-5)
    # the micro-condition sinusoid is diffusers' get_timestep_embedding(flip_sin_to_cos=True, shift=0)
    from diffusers.models.embeddings import get_timestep_embedding

    values = torch.tensor([1024.0, 0.0, 6.0])
    torch.testing.assert_close(sinusoidal_embedding(values, 256),
                               get_timestep_embedding(values, 256, flip_sin_to_cos=True, downscale_freq_shift=0))
