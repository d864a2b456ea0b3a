"""Soft embeddings and the differentiable decodes of the tokenizers (Soft-Di[M]O)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_tiny_vqgan

from dimo_lightning.core.soft_embedding import soft_embedding, soft_probabilities
from dimo_lightning.tokenizers.patch_vq import PatchVQTokenizer

torch.set_num_threads(1)

VQGAN = dict(
    embed_dim=8, n_embed=16, z_channels=8, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
    num_res_blocks=1, attn_resolutions=[16], dropout=0.0,
)


def one_hot_logits(codes: torch.Tensor, width: int, margin: float = 60.0) -> torch.Tensor:
    """Logits whose softmax is one-hot at ``codes`` to float32 precision (margin 60: exp(-60) ~ 1e-26)."""
    return F.one_hot(codes, width).float() * margin


def test_soft_embedding_of_one_hot_logits_is_the_embedding() -> None:
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(21, 6, generator=generator)  # 17 ids covered by the logits + 4 rows (mask, classes)
    codes = torch.randint(0, 17, (3, 5), generator=generator)
    out = soft_embedding(one_hot_logits(codes, 17), table)
    assert out.shape == (3, 5, 6)
    torch.testing.assert_close(out, F.embedding(codes, table), rtol=0, atol=1e-6)


def test_soft_embedding_is_the_expectation_under_the_softmax() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 9, generator=generator) * 3
    table = torch.randn(12, 5, generator=generator)
    out = soft_embedding(logits, table)
    # Independent: explicit exp-normalise and a sum over ids (rows 9..11 never enter).
    weights = logits.exp() / logits.exp().sum(-1, keepdim=True)
    expected = sum(weights[..., j, None] * table[j] for j in range(9))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # Sliced logits drop the mask slot: the softmax then renormalises over the codes only.
    probs = soft_probabilities(logits, num_codes=8)
    assert probs.shape == (2, 4, 8)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4))


def test_soft_embedding_gradient_reaches_the_logits() -> None:
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    table = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: soft_embedding(z, table), (logits,))
    soft_embedding(logits, table).pow(2).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_soft_embedding_bad_input() -> None:
    with pytest.raises(ValueError, match="only 4 rows"):
        soft_embedding(torch.zeros(1, 2, 5), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"\(B, N, V\)"):
        soft_embedding(torch.zeros(2, 5), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="num_codes"):
        soft_probabilities(torch.zeros(1, 2, 5), num_codes=6)


def test_patch_vq_decode_soft_equals_decode_for_one_hot_and_is_differentiable() -> None:
    generator = torch.Generator().manual_seed(3)
    tokenizer = PatchVQTokenizer(torch.rand(16, 16, generator=generator))
    codes = torch.randint(0, 16, (2, 3, 5), generator=generator)  # non-square grid: catches h/w mix-ups
    probs = one_hot_logits(codes.reshape(2, 15), 16).softmax(-1)
    soft = tokenizer.decode_soft(probs, grid_shape=(3, 5))
    assert soft.shape == (2, 1, 12, 20)
    torch.testing.assert_close(soft, tokenizer.decode(codes), rtol=0, atol=1e-6)
    torch.testing.assert_close(tokenizer.decode_soft(probs.reshape(2, 3, 5, 16)), soft)

    codebook64 = tokenizer.codebook.double()
    tokenizer64 = PatchVQTokenizer(codebook64)
    logits = torch.randn(1, 4, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: tokenizer64.decode_soft(z.softmax(-1)).double(), (logits,))
    with pytest.raises(ValueError, match="square grid"):
        tokenizer.decode_soft(torch.rand(1, 6, 16))


def test_vqgan_decode_soft_equals_decode_for_one_hot_and_carries_gradient() -> None:
    model = make_tiny_vqgan(VQGAN, seed=0).requires_grad_(False)
    generator = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 16, (2, 2, 3), generator=generator)
    probs = one_hot_logits(codes.reshape(2, 6), 16).softmax(-1)
    soft = model.decode_soft(probs, grid_shape=(2, 3))
    assert soft.shape == (2, 3, 4, 6)  # f = 2
    torch.testing.assert_close(soft, model.decode(codes), rtol=1e-5, atol=1e-5)

    logits = torch.randn(1, 6, 16, generator=generator, requires_grad=True)
    images = model.decode_soft(logits.softmax(-1), grid_shape=(2, 3))
    images.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # frozen weights are not what learns here


def test_teacher_decode_soft(tiny_teacher) -> None:
    generator = torch.Generator().manual_seed(5)
    codes = torch.randint(0, tiny_teacher.codebook_size, (3, tiny_teacher.seq_len), generator=generator)
    probs = one_hot_logits(codes, tiny_teacher.codebook_size).softmax(-1)
    torch.testing.assert_close(tiny_teacher.decode_soft(probs), tiny_teacher.decode(codes), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="tokens, codes"):
        tiny_teacher.decode_soft(torch.rand(3, tiny_teacher.seq_len, tiny_teacher.logit_width))
