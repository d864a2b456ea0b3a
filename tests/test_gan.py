"""The Soft-Di[M]O discriminator: frozen teacher trunk, trainable heads, mask augmentation, GAN losses."""

from __future__ import annotations

import pytest
import torch

from dimo_lightning.core.sampling import sample_tokens
from dimo_lightning.objectives.gan import (
    TeacherDiscriminator,
    default_head_layers,
    discriminator_gan_loss,
    generator_gan_loss,
    mask_augment,
)

torch.set_num_threads(1)


def _trunk(teacher):
    return teacher.network.eval()  # frozen by MNISTTeacher; eval: no dropout, deterministic features


def test_forward_features_reuses_the_forward_path(tiny_teacher) -> None:
    net = _trunk(tiny_teacher)
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, net.mask_id + 1, (3, net.seq_len), generator=generator)
    labels = torch.tensor([0, 4, 9])
    drop = torch.tensor([False, True, False])
    (first, last) = net.forward_features(net.tok_emb(codes), labels, drop, layers=(0, 1))
    assert first.shape == last.shape == (3, net.seq_len + 1, net.hidden_dim)
    # The last block's state through the output head gives exactly forward's logits.
    logits = (net.last_layer(last) @ net.tok_emb.weight.T + net.bias)[:, : net.seq_len, : net.logit_width]
    torch.testing.assert_close(logits, net(codes, labels, drop), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"layers must .* \[0, 1\]"):
        net.forward_features(net.tok_emb(codes), labels, layers=(2,))
    with pytest.raises(ValueError, match="image_embeddings"):
        net.forward_features(net.tok_emb(codes)[:, :5], labels, layers=(1,))


def test_default_head_layers() -> None:
    assert default_head_layers(3) == (1, 2, 3)
    assert default_head_layers(24) == (8, 16, 24)
    assert default_head_layers(1) == (1,)
    assert default_head_layers(2) == (1, 2)


def test_losses_match_an_independent_computation() -> None:
    generator = torch.Generator().manual_seed(1)
    real = torch.randn(7, generator=generator, dtype=torch.float64) * 4
    fake = torch.randn(5, generator=generator, dtype=torch.float64) * 4
    sigmoid = torch.sigmoid
    expected_d = -torch.log(sigmoid(real)).mean() - torch.log(1 - sigmoid(fake)).mean()
    expected_g = -torch.log(sigmoid(fake)).mean()
    torch.testing.assert_close(discriminator_gan_loss(real, fake).double(), expected_d, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(generator_gan_loss(fake).double(), expected_g, rtol=1e-6, atol=1e-6)
    # The softplus form stays finite where log(sigmoid) underflows.
    assert torch.isfinite(generator_gan_loss(torch.tensor([-200.0])))
    assert generator_gan_loss(torch.tensor([-200.0])).item() == pytest.approx(200.0)


def test_mask_augment_masks_the_exact_count() -> None:
    generator = torch.Generator().manual_seed(2)
    embeddings = torch.randn(64, 49, 8, generator=generator)
    mask_embedding = torch.full((8,), 7.0)
    out, mask, ratio = mask_augment(embeddings, mask_embedding, 0.95, torch.Generator().manual_seed(3))
    counts = mask.sum(1)
    torch.testing.assert_close(counts.float(), ratio * 49)
    assert float(ratio.max()) <= 0.95 and float(ratio.min()) >= 0.0 and counts.unique().numel() > 10
    assert bool((out[mask] == 7.0).all()) and torch.equal(out[~mask], embeddings[~mask])
    again, mask_again, _ = mask_augment(embeddings, mask_embedding, 0.95, torch.Generator().manual_seed(3))
    assert torch.equal(mask, mask_again) and torch.equal(out, again)  # seeded
    _, none, zero = mask_augment(embeddings, mask_embedding, 0.0, generator)
    assert not none.any() and not zero.any()
    with pytest.raises(ValueError, match="max_mask_ratio"):
        mask_augment(embeddings, mask_embedding, 1.5)


@pytest.mark.parametrize("augment", [True, False])
def test_heads_learn_while_the_trunk_stays_frozen(tiny_teacher, augment: bool) -> None:
    trunk = _trunk(tiny_teacher)
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    torch.manual_seed(0)
    disc = TeacherDiscriminator.for_trunk(trunk, head_dim=32, mask_augment=augment, max_mask_ratio=0.5)
    assert disc.layers == (1,) and not any(k.startswith("trunk") for k in disc.state_dict())
    generator = torch.Generator().manual_seed(4)
    # Trivially separable: real sequences use codes 0..7, the "student" puts its mass on codes 8..15.
    real = torch.randint(0, 8, (32, trunk.seq_len), generator=generator)
    fake_logits = torch.full((32, trunk.seq_len, trunk.logit_width), -10.0)
    fake_logits[..., 8:16] = torch.randn(32, trunk.seq_len, 8, generator=generator)
    labels = torch.randint(0, 10, (32,), generator=generator)
    optimizer = torch.optim.Adam(disc.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss, logs = disc.discriminator_loss(trunk, real, labels, fake_logits, labels, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    assert logs["accuracy"] > 0.9 and logs["logit_real"] > 0 > logs["logit_fake"]
    assert all(not p.requires_grad and p.grad is None for p in trunk.parameters())
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_trainable_trunk_is_refused(tiny_teacher) -> None:
    trunk = _trunk(tiny_teacher)
    disc = TeacherDiscriminator.for_trunk(trunk, head_dim=8)
    trunk.first_layer.requires_grad_(True)
    with pytest.raises(ValueError, match="trunk must be frozen"):
        disc.generator_loss(trunk, torch.zeros(1, trunk.seq_len, trunk.logit_width), torch.zeros(1, dtype=torch.long))


def test_generator_gradient_flows_through_the_soft_path_only(tiny_teacher) -> None:
    trunk = _trunk(tiny_teacher)
    torch.manual_seed(1)
    disc = TeacherDiscriminator.for_trunk(trunk, head_dim=16).double()
    trunk.double()
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(4, trunk.seq_len, trunk.logit_width, generator=generator, dtype=torch.float64)
    logits.requires_grad_(True)
    labels = torch.tensor([1, 2, 3, 4])

    def loss_at(z: torch.Tensor) -> torch.Tensor:
        return disc.generator_loss(trunk, z, labels, torch.Generator().manual_seed(6))  # same augmentation each time

    loss_at(logits).backward()
    grad = logits.grad
    assert grad is not None and grad[..., : trunk.codebook_size].abs().sum() > 0
    assert grad[..., trunk.codebook_size :].abs().max() == 0  # the mask slot is not part of the soft embedding
    # Sampled tokens carry no gradient path: integer codes, no autograd history.
    codes = sample_tokens(logits.detach(), 1.0, generator=generator)
    assert not codes.dtype.is_floating_point and not codes.requires_grad and codes.grad_fn is None
    # The loss is smooth in the logits: a central difference along a random direction matches autograd.
    direction = torch.randn(logits.shape, generator=generator, dtype=torch.float64)
    eps = 1e-4
    with torch.no_grad():
        numeric = (loss_at(logits + eps * direction) - loss_at(logits - eps * direction)) / (2 * eps)
    torch.testing.assert_close(numeric, (grad * direction).sum(), rtol=1e-4, atol=1e-8)


def test_discriminator_loss_leaves_the_student_alone(tiny_teacher) -> None:
    trunk = _trunk(tiny_teacher)
    disc = TeacherDiscriminator.for_trunk(trunk, head_dim=8)
    logits = torch.randn(2, trunk.seq_len, trunk.logit_width, requires_grad=True)
    real = torch.randint(0, trunk.codebook_size, (3, trunk.seq_len))
    loss, _ = disc.discriminator_loss(trunk, real, torch.tensor([0, 1, 2]), logits, torch.tensor([3, 4]))
    loss.backward()
    assert logits.grad is None
    assert all(p.grad is not None for p in disc.parameters())
    with pytest.raises(ValueError, match=r"real codes must lie in \[0, 16\)"):
        disc.discriminator_loss(trunk, real + 16, torch.tensor([0, 1, 2]), logits, torch.tensor([3, 4]))


def test_generator_loss_skips_rows_that_are_not_finite(tiny_teacher) -> None:
    trunk = _trunk(tiny_teacher)
    torch.manual_seed(2)
    disc = TeacherDiscriminator.for_trunk(trunk, head_dim=8, mask_augment=False)
    logits = torch.randn(3, trunk.seq_len, trunk.logit_width)
    logits[1, 0, 0] = float("nan")
    logits.requires_grad_(True)
    labels = torch.tensor([5, 6, 7])
    keep = torch.tensor([True, False, True])
    loss = disc.generator_loss(trunk, logits, labels, row_weight=keep)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all() and logits.grad[1].abs().max() == 0
    expected = disc.generator_loss(trunk, logits.detach()[keep], labels[keep])
    torch.testing.assert_close(loss, expected)
    nothing = disc.generator_loss(trunk, logits, labels, row_weight=torch.zeros(3, dtype=torch.bool))
    assert nothing.item() == 0.0 and nothing.requires_grad
