"""The MaskGIT-style transformer: released key layout, fused attention, embedding noise."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from dimo_lightning.nn.transformer import MaskTransformer, count_parameters


def test_imagenet256_layout_on_meta_device():
    with torch.device("meta"):
        net = MaskTransformer(codebook_size=1024, num_classes=1000, grid_size=16, hidden_dim=768, depth=24,
                              heads=16, mlp_dim=3072)
    state = net.state_dict()
    assert len(state) == 305
    assert count_parameters(net) == 174_160_874
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["tok_emb.weight"] == (2026, 768)
    assert shapes["pos_emb"] == (1, 257, 768)
    assert shapes["bias"] == (257, 2026)
    assert shapes["first_layer.0.weight"] == (768,)
    assert shapes["first_layer.6.weight"] == (768, 768)
    assert shapes["transformer.layers.23.0.fn.mha.in_proj_weight"] == (2304, 768)
    assert shapes["transformer.layers.0.0.fn.mha.out_proj.weight"] == (768, 768)
    assert shapes["transformer.layers.0.1.fn.net.0.weight"] == (3072, 768)
    assert shapes["transformer.layers.0.1.fn.net.3.weight"] == (768, 3072)
    assert shapes["last_layer.4.bias"] == (768,)
    assert not list(net.buffers())


def test_forward_shapes_token_layout_and_cfg_null_class():
    torch.manual_seed(0)
    net = MaskTransformer(16, 10, 7, 32, 1, 2, 64, 0.0).eval()
    codes = torch.randint(0, 17, (3, 7, 7))
    labels = torch.tensor([0, 4, 9])
    out = net(codes, labels)
    assert out.shape == (3, 49, 17)
    assert net.mask_id == 16 and net.null_class_id == 27 and net.vocab_size == 28
    dropped = net(codes, labels, drop_label=torch.tensor([True, True, True]))
    other_labels = net(codes, torch.tensor([1, 2, 3]), drop_label=torch.tensor([True, True, True]))
    torch.testing.assert_close(dropped, other_labels)  # the null class ignores the label
    assert not torch.allclose(out, dropped)
    with pytest.raises(ValueError, match="49 tokens"):
        net(torch.zeros(1, 48, dtype=torch.long), labels[:1])


def test_attention_uses_fused_sdpa_and_never_materialises_weights():
    net = MaskTransformer(16, 10, 7, 32, 2, 2, 64, 0.1)
    codes = torch.randint(0, 17, (2, 49))
    with mock.patch("torch.nn.functional.scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as m, \
            mock.patch("torch.softmax", side_effect=AssertionError("attention weights materialised")):
        net(codes, torch.tensor([1, 2]))
    assert m.call_count == 2


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    net = MaskTransformer(16, 10, 7, 32, 1, 4, 64, 0.0).eval()
    ours = net.transformer.layers[0][0].fn.mha
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 50, 32)
    torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)


def test_embedding_noise_is_variance_preserving_and_seeded():
    torch.manual_seed(0)
    net = MaskTransformer(16, 10, 7, 32, 1, 2, 64, 0.0).eval()
    codes = torch.randint(0, 17, (2, 49))
    labels = torch.tensor([1, 2])
    clean = net(codes, labels)
    a = net(codes, labels, emb_noise_sigma=0.3, generator=torch.Generator().manual_seed(1))
    b = net(codes, labels, emb_noise_sigma=0.3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, clean)
    torch.testing.assert_close(net(codes, labels, emb_noise_sigma=0.0), clean)
    # the perturbation itself: e' = sigma * scale * eps + sqrt(1 - sigma^2) * e on image tokens only
    captured = {}
    net.first_layer.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    net(codes, labels, emb_noise_sigma=0.5, emb_noise_scale=2.0, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(2, 49, 32, generator=torch.Generator().manual_seed(3))
    emb = net.tok_emb(codes)
    expected_img = 0.5 * 2.0 * eps + (1 - 0.25) ** 0.5 * emb + net.pos_emb[:, :49]
    torch.testing.assert_close(captured["x"][:, :49], expected_img)
    torch.testing.assert_close(captured["x"][:, 49], net.tok_emb(labels + 17) + net.pos_emb[:, 49])
    assert net.code_embedding_rms() == pytest.approx(float(net.tok_emb.weight[:16].pow(2).mean().sqrt()))
