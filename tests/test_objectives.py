"""Each objective of an iteration alone, on a tiny teacher and a hand-built IterationContext: its loss equals an
independent computation (core.losses, the discriminator's own losses, the energy distance) on the same draws, taken
from a generator seeded alike in the same order."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_context

from dimo_lightning.core.losses import aux_loss, distribution_matching_grad, finite_rows, generator_loss
from dimo_lightning.core.masking import hybrid_initial_sequence, mask_tokens, sample_mask_ratio
from dimo_lightning.core.sampling import sample_tokens
from dimo_lightning.objectives.aux_update import AuxUpdate
from dimo_lightning.objectives.context import StudentDraw
from dimo_lightning.objectives.coverage import CoverageTerm, conditional_energy_distance, trunk_features
from dimo_lightning.objectives.dimo_generator import DiMOGenerator
from dimo_lightning.objectives.gan import DiscriminatorUpdate, GANGeneratorTerm, TeacherDiscriminator

LABELS = torch.tensor([0, 3, 3, 7, 1, 0])
TARGETS = dict(cfg_scale=2.0, adaptive_cfg=False, divergence_beta=0.5, teacher_temperature=1.0, aux_temperature=1.0,
               mask_schedule="arccos", mask_ratio_band=None, mask_ratio_clamp=None, exclude_mask_from_grad=False)


def by_hand_student_draw(teacher, student, generator, r_init=0.6, sigma=0.1):
    """The student's one step written out: hybrid input, forward with embedding noise, sampled tokens."""
    x_init = hybrid_initial_sequence(len(LABELS), teacher.seq_len, teacher.codebook_size, r_init, teacher.mask_id,
                                     generator)
    z = teacher.apply_network(student, x_init, LABELS, None, sigma, 1.0, generator)
    with torch.no_grad():
        x = sample_tokens(z.detach(), 1.0, 0, 0.0, (teacher.mask_id,), generator)
    return z, x


def eval_networks(tiny_teacher):
    """Student and aux without dropout (so a replay gives the same logits); the aux moved off the teacher's weights."""
    student = copy.deepcopy(tiny_teacher.network).eval().requires_grad_(True)
    aux = copy.deepcopy(tiny_teacher.network).eval().requires_grad_(True)
    with torch.no_grad():
        for p in aux.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return student, aux


def test_dimo_generator_term_equals_core_losses_on_the_same_draws(tiny_teacher) -> None:
    student, aux = eval_networks(tiny_teacher)
    tiny_teacher.eval()
    ctx = make_context(tiny_teacher, LABELS, student=student, aux=aux, seed=5)
    objective = DiMOGenerator(**TARGETS)
    loss, logs = objective.loss(ctx, 0)
    (grad_objective,) = torch.autograd.grad(loss, next(student.parameters()))

    generator = torch.Generator().manual_seed(5)
    z, x = by_hand_student_draw(tiny_teacher, student, generator)
    ratio = sample_mask_ratio(len(LABELS), "arccos", generator)
    x_t, mask = mask_tokens(x, ratio, tiny_teacher.mask_id, generator)
    with torch.no_grad():
        teacher_logits = tiny_teacher.guided_logits(tiny_teacher.network, x_t, LABELS, 2.0)
        aux_logits = tiny_teacher.apply_network(aux, x_t, LABELS)
        g = distribution_matching_grad(teacher_logits, aux_logits, 0.5)
    expected = generator_loss(z, g, mask, row_weight=finite_rows(z.detach(), teacher_logits, aux_logits))
    (grad_expected,) = torch.autograd.grad(expected, next(student.parameters()))

    assert torch.equal(loss, expected) and torch.equal(grad_objective, grad_expected)
    assert logs["kept_rows"] == 1.0 and "gan" not in logs and "coverage" not in logs
    assert len(ctx.samples) == 1 and torch.equal(ctx.samples[0][0], x)  # the draw kept for the other updates
    assert not ctx.samples[0][1].requires_grad
    assert torch.equal(ctx.generator.get_state(), generator.get_state())  # the same draws, no more


def test_aux_free_ablation_uses_the_students_own_logits(tiny_teacher) -> None:
    student, aux = eval_networks(tiny_teacher)
    ctx = make_context(tiny_teacher, LABELS, student=student, aux=aux, seed=1)
    calls = []
    aux.register_forward_hook(lambda *args: calls.append(1))
    loss, _ = DiMOGenerator(**TARGETS, aux_from_student=True).loss(ctx, 0)
    assert not calls and torch.isfinite(loss)


@pytest.mark.parametrize("sample", ["fresh", "reuse"])
def test_aux_update_is_the_aux_cross_entropy_of_a_remasked_sample(tiny_teacher, sample) -> None:
    student, aux = eval_networks(tiny_teacher)
    ctx = make_context(tiny_teacher, LABELS, student=student, aux=aux, seed=2)
    generator = torch.Generator().manual_seed(2)
    if sample == "reuse":  # the generator update's draw, already in the context: no student forward
        z, x = by_hand_student_draw(tiny_teacher, student, torch.Generator().manual_seed(9))
        ctx.samples = [(x, z.detach())]
        student.register_forward_hook(lambda *args: pytest.fail("reuse must not run the student"))
    else:
        with torch.no_grad():
            z, x = by_hand_student_draw(tiny_teacher, student, generator)
    objective = AuxUpdate(sample=sample, mask_schedule="arccos", mask_ratio_clamp=[0.1, 0.9], label_smoothing=0.1,
                          soft_weight=0.5, soft_temperature=2.0, cfg_drop_ratio=0.25)
    loss, logs = objective.loss(ctx, 0)

    drop = torch.rand(len(LABELS), generator=generator) < 0.25
    ratio = sample_mask_ratio(len(LABELS), "arccos", generator, clamp=(0.1, 0.9))
    x_t, mask = mask_tokens(x, ratio, tiny_teacher.mask_id, generator)
    logits = tiny_teacher.apply_network(aux, x_t, LABELS, drop)
    soft = (z.detach().float() / 2.0).softmax(-1)
    expected = aux_loss(logits, x, mask, 0.1, soft, 0.5, 2.0, row_weight=finite_rows(logits.detach(), z))
    assert torch.equal(loss, expected) and logs["kept_rows"] == 1.0
    assert torch.equal(ctx.generator.get_state(), generator.get_state())


def test_gan_terms_equal_the_discriminators_own_losses(tiny_teacher) -> None:
    trunk = tiny_teacher.network.train()  # the objectives run the trunk in eval mode and restore its mode
    discriminator = TeacherDiscriminator.for_trunk(trunk, 1, head_dim=8)
    z = torch.randn(len(LABELS), 49, 17, requires_grad=True)
    x = torch.randint(0, 16, (len(LABELS), 49))
    valid = torch.tensor([True, True, False, True, True, True])
    real = torch.randint(0, 16, (len(LABELS), 49))

    ctx = make_context(tiny_teacher, LABELS, real, seed=4)
    term, _ = GANGeneratorTerm(discriminator, "straight_through").loss(ctx, 0, StudentDraw(z, x, valid))
    assert trunk.training
    trunk.eval()
    expected = discriminator.generator_loss(trunk, z, LABELS, torch.Generator().manual_seed(4), row_weight=valid,
                                            tokens=x)
    torch.testing.assert_close(term, expected, rtol=0, atol=0)

    ctx = make_context(tiny_teacher, LABELS, real, seed=4)
    ctx.samples = [(x, z.detach())]
    loss, logs = DiscriminatorUpdate(discriminator, "soft").loss(ctx, 0)
    expected, stats = discriminator.discriminator_loss(trunk, real, LABELS, z, LABELS, torch.Generator().manual_seed(4))
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert logs.keys() == stats.keys() and all(torch.equal(logs[k], stats[k]) for k in stats)


def test_gan_only_generator_is_the_weighted_gan_term(tiny_teacher) -> None:
    student, _ = eval_networks(tiny_teacher)
    discriminator = TeacherDiscriminator.for_trunk(tiny_teacher.network, 1, head_dim=8)
    gan = GANGeneratorTerm(discriminator)
    ctx = make_context(tiny_teacher, LABELS, student=student, seed=6, gan_weight=3.0)
    loss, logs = DiMOGenerator(**TARGETS, gan=gan, gan_only=True).loss(ctx, 0)

    generator = torch.Generator().manual_seed(6)
    z, x = by_hand_student_draw(tiny_teacher, student, generator)
    with torch.no_grad():
        tiny_teacher.network.eval()
        expected = 3.0 * discriminator.generator_loss(tiny_teacher.network, z, LABELS, generator)
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=0)
    assert torch.equal(logs["gan"], loss.detach())


def test_coverage_term_is_the_energy_distance_of_trunk_features(tiny_teacher) -> None:
    trunk = tiny_teacher.network.eval()
    z = 2 * torch.randn(len(LABELS), 49, 17)
    x = z.argmax(-1).clamp_max(15)
    real = torch.randint(0, 16, (len(LABELS), 49))
    valid = torch.ones(len(LABELS), dtype=torch.bool)
    term = CoverageTerm(tiny_teacher, temperature=0.5, layers=(1,))
    loss, logs = term.loss(make_context(tiny_teacher, LABELS, real), 0, StudentDraw(z, x, valid))

    fake = trunk_features(trunk, (z[..., :16] / 0.5).softmax(-1) @ trunk.tok_emb.weight[:16], LABELS, (1,))
    real_features = trunk_features(trunk, trunk.tok_emb(real), LABELS, (1,))
    expected, value = conditional_energy_distance(fake, real_features, LABELS, LABELS)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logs["coverage"], value)
    assert term.layers == (1,) and CoverageTerm(tiny_teacher, num_layers=3).layers == (1,)  # a one-block trunk
