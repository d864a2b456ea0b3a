"""Numerics of the Di[M]O losses against autograd of the true divergences."""

import pytest
import torch
import torch.nn.functional as F

from dimo_lightning.core.losses import aux_loss, distribution_matching_grad, finite_rows, generator_loss


def kl(p_logits, q_logits):
    """KL(softmax p || softmax q) per token."""
    lp, lq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.2, 0.5])
@pytest.mark.parametrize("temps", [(1.0, 1.0), (0.7, 1.3)])
def test_distribution_matching_grad_equals_autograd(beta, temps):
    torch.manual_seed(0)
    t_temp, a_temp = temps
    teacher = torch.randn(3, 5, 11, dtype=torch.float64) * 2
    aux = torch.randn(3, 5, 11, dtype=torch.float64) * 2
    # The gradient is with respect to the (temperature-scaled) aux logits z = aux / T_a.
    z = (aux / a_temp).clone().requires_grad_(True)
    target = teacher / t_temp
    forward_kl = kl(target, z).sum()  # KL(p_T || softmax z)
    reverse_kl = kl(z, target).sum()  # KL(softmax z || p_T)
    g_fkl, = torch.autograd.grad(forward_kl, z)
    g_rkl, = torch.autograd.grad(reverse_kl, z)
    expected = (1 - beta) * g_fkl + beta * g_rkl
    got = distribution_matching_grad(teacher, aux, beta, teacher_temperature=t_temp, aux_temperature=a_temp)
    assert got.shape == (3, 5, 11)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_distribution_matching_grad_zero_when_equal():
    logits = torch.randn(2, 4, 9)
    for beta in (0.0, 1.0, 0.3):
        assert distribution_matching_grad(logits, logits.clone(), beta).abs().max() < 1e-6


def test_reverse_kl_handles_zero_probabilities():
    aux = torch.tensor([[[0.0, -1e4, 1.0]]])  # one aux probability underflows to 0
    teacher = torch.tensor([[[1.0, 0.0, -2.0]]])
    g = distribution_matching_grad(teacher, aux, 1.0)
    assert torch.isfinite(g).all()


def test_generator_loss_gradient_is_grad_times_mask_over_batch():
    torch.manual_seed(0)
    z = torch.randn(4, 6, 7, requires_grad=True)
    g = torch.randn(4, 6, 7)
    mask = torch.rand(4, 6) < 0.5
    generator_loss(z, g, mask).backward()
    torch.testing.assert_close(z.grad, g * mask[..., None] / 4)


def test_generator_loss_value():
    z = torch.zeros(2, 1, 2, requires_grad=True)
    g = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])
    mask = torch.tensor([[True], [False]])
    # 0.5 * (1 + 4) / 2
    assert float(generator_loss(z, g, mask)) == pytest.approx(1.25)


def test_generator_loss_drops_nonfinite_rows():
    z = torch.randn(3, 4, 5)
    z[1, 2, 3] = float("nan")
    z.requires_grad_(True)
    g = torch.randn(3, 4, 5)
    mask = torch.ones(3, 4, dtype=torch.bool)
    valid = finite_rows(z.detach())
    assert valid.tolist() == [True, False, True]
    loss = generator_loss(z, g, mask, row_weight=valid)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(z.grad[1], torch.zeros(4, 5))
    torch.testing.assert_close(z.grad[0], g[0] / 2)  # divided by the 2 valid rows


def test_aux_loss_hard_matches_cross_entropy_on_masked_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 8)
    targets = torch.randint(0, 8, (2, 5))
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    got = aux_loss(logits, targets, mask, label_smoothing=0.1)
    expected = F.cross_entropy(logits[mask], targets[mask], label_smoothing=0.1)
    torch.testing.assert_close(got, expected)


def test_aux_loss_soft_is_kl_summed_over_vocab():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 6)
    p = torch.softmax(torch.randn(1, 3, 6), -1)
    mask = torch.tensor([[True, True, False]])
    got = aux_loss(logits, torch.zeros(1, 3, dtype=torch.long), mask, soft_targets=p, soft_weight=1.0)
    per_token = (p * (p.log() - logits.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(got, per_token[mask].mean())
    with pytest.raises(ValueError, match="soft_targets"):
        aux_loss(logits, torch.zeros(1, 3, dtype=torch.long), mask, soft_weight=0.5)


def test_finite_rows_matches_an_elementwise_check():
    t = torch.randn(6, 5, 7)
    t[1, 2, 3] = float("nan")
    t[2, 0, 0] = float("inf")
    t[3, 4, 6] = -float("inf")
    t[4] = 1e38  # large but finite
    other = torch.randn(6, 5, 7)
    other[5, 1, 1] = float("nan")
    expected = torch.isfinite(t).reshape(6, -1).all(1) & torch.isfinite(other).reshape(6, -1).all(1)
    assert finite_rows(t, other).tolist() == expected.tolist() == [True, False, False, False, True, False]
    assert finite_rows(torch.zeros(3, 0)).tolist() == [True, True, True]  # an empty row has nothing non-finite
