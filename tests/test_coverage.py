"""The coverage term of the GAN stage: the per-class energy distance to real data in the frozen trunk's features."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import make_context
from test_soft_dimo import codes_file, make_module, make_trainer, real_data

from dimo_lightning.objectives.context import StudentDraw
from dimo_lightning.objectives.coverage import (
    conditional_energy_distance,
    group_ids,
    pixel_features,
    trunk_features,
)
from dimo_lightning.training.settings import GANSettings

torch.set_num_threads(1)


def reference_energy_distance(fake, real, fake_groups, real_groups):
    """Plain loops over distinct pairs, group by group: the estimator the vectorised code must equal."""
    values = []
    for g in sorted(set(fake_groups.tolist()) | set(real_groups.tolist())):
        f = [x for x, k in zip(fake, fake_groups.tolist(), strict=True) if k == g]
        r = [x for x, k in zip(real, real_groups.tolist(), strict=True) if k == g]
        if len(f) < 2 or len(r) < 2:
            continue
        cross = sum(float((a - b).norm()) for a in f for b in r) / (len(f) * len(r))
        ff = sum(float((a - b).norm()) for a, b in itertools.permutations(f, 2)) / (len(f) * (len(f) - 1))
        rr = sum(float((a - b).norm()) for a, b in itertools.permutations(r, 2)) / (len(r) * (len(r) - 1))
        values.append((2 * cross - ff, 2 * cross - ff - rr))
    return sum(v[0] for v in values) / len(values), sum(v[1] for v in values) / len(values)


def test_energy_distance_matches_pairwise_loops_and_vanishes_on_one_distribution() -> None:
    generator = torch.Generator().manual_seed(0)
    fake = torch.randn(13, 5, generator=generator, dtype=torch.float64)
    real = torch.randn(11, 5, generator=generator, dtype=torch.float64) + 0.7
    fake_groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 0, 1, 5])  # group 3 and 5: one fake row, left out
    real_groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    loss, value = conditional_energy_distance(fake, real, fake_groups, real_groups)
    want_loss, want_value = reference_energy_distance(fake, real, fake_groups, real_groups)
    assert float(loss) == pytest.approx(want_loss, rel=1e-9) and float(value) == pytest.approx(want_value, rel=1e-9)
    # one group (no ids): the plain energy distance
    loss, value = conditional_energy_distance(fake, real)
    ones_f, ones_r = torch.zeros(13, dtype=torch.long), torch.zeros(11, dtype=torch.long)
    assert float(value) == pytest.approx(reference_energy_distance(fake, real, ones_f, ones_r)[1], rel=1e-9)
    # two large samples of one distribution: ~0; shifted: clearly positive
    a, b = torch.randn(2, 600, 4, generator=generator, dtype=torch.float64)
    same = float(conditional_energy_distance(a, b)[1])
    shifted = float(conditional_energy_distance(a + 1.0, b)[1])
    assert abs(same) < 0.03 and shifted > 0.5


def test_energy_distance_gradient_spreads_a_collapsed_set() -> None:
    """All fake rows at one point, real rows spread: the gradient moves the fakes apart (the repulsion a per-sample
    discriminator lacks), and towards the real set; finite where fake rows coincide."""
    real = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
    fake = (torch.zeros(4, 2) + torch.tensor([[0.01, 0.0], [-0.01, 0.0], [0.0, 0.01], [0.0, -0.01]])).requires_grad_()
    loss, _ = conditional_energy_distance(fake, real)
    (grad,) = torch.autograd.grad(loss, fake)
    assert torch.isfinite(grad).all()
    stepped = fake.detach() - 0.1 * grad
    assert torch.pdist(stepped).mean() > torch.pdist(fake.detach()).mean()
    collapsed = torch.zeros(3, 2, requires_grad=True)  # identical rows: no NaN
    (grad,) = torch.autograd.grad(conditional_energy_distance(collapsed, real)[0], collapsed)
    assert torch.isfinite(grad).all()


def test_group_ids_and_bad_shapes() -> None:
    labels = torch.tensor([3, 1, 3])
    assert torch.equal(group_ids(labels, 3), labels)
    assert group_ids(["a digit", "a digit"], 2) is None
    with pytest.raises(ValueError, match="3 condition labels for 4 rows"):
        group_ids(labels, 4)
    with pytest.raises(ValueError, match="features must be"):
        conditional_energy_distance(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="both the fake and the real"):
        conditional_energy_distance(torch.zeros(3, 4), torch.zeros(3, 4), labels, None)
    with pytest.raises(ValueError, match="coverage_weight must be >= 0"):
        GANSettings(coverage_weight=-1.0)
    with pytest.raises(ValueError, match="coverage_input must be one of"):
        GANSettings(coverage_input="hard")


def test_trunk_features_have_unit_norm_per_layer(tiny_teacher) -> None:
    trunk = tiny_teacher.network.eval()
    codes = torch.randint(0, 16, (5, 49), generator=torch.Generator().manual_seed(1))
    features = trunk_features(trunk, trunk.tok_emb(codes), torch.arange(5), (0, 1))
    assert features.shape == (5, 2 * 49 * trunk.hidden_dim)
    norms = features.view(5, 2, -1).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("gan_weight", [0.0, 1.0])
def test_coverage_trains_the_student_through_the_soft_path_with_or_without_the_discriminator(
        tiny_teacher, tmp_path, gan_weight) -> None:
    settings = GANSettings(weight=gan_weight, head_dim=16, coverage_weight=5.0)
    module = make_module(tiny_teacher, gan=settings, optim={"max_generator_steps": 2})
    assert (module.discriminator is None) == (gan_weight == 0)
    assert module.coverage.layers == (1,)  # the tiny teacher has one block
    teacher_before = {k: v.clone() for k, v in tiny_teacher.state_dict().items()}
    trainer = make_trainer(tmp_path)
    trainer.fit(module, real_data(codes_file(tmp_path)))
    assert len(trainer.optimizers) == (3 if gan_weight else 2)
    assert torch.isfinite(torch.as_tensor(trainer.callback_metrics["train/coverage_energy"]))
    assert all(torch.equal(v, teacher_before[k]) for k, v in tiny_teacher.state_dict().items())

    # the coverage loss reaches the student's logits (soft path), not the trunk
    trunk = tiny_teacher.network
    z = torch.randn(6, 49, 17, requires_grad=True)
    codes = torch.randint(0, 16, (6, 49))
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    draw = StudentDraw(z, z.argmax(-1), torch.ones(6, dtype=torch.bool))
    loss, _ = module.coverage.loss(make_context(tiny_teacher, labels, codes), 0, draw)
    (grad,) = torch.autograd.grad(loss, z)
    assert grad.abs().sum() > 0
    assert all(p.grad is None for p in trunk.parameters())


def test_coverage_without_real_codes_names_the_flag(tiny_teacher, tmp_path) -> None:
    from dimo_lightning.data.labels import ClassLabelDataModule

    module = make_module(tiny_teacher, gan=GANSettings(weight=0.0, coverage_weight=1.0))
    with pytest.raises(ValueError, match=r"gan.coverage_weight > 0 trains on real data.*RealCodesDataModule"):
        make_trainer(tmp_path).fit(module, ClassLabelDataModule(10, 8, 4))


def test_exact_resume_with_the_coverage_term(tiny_teacher, tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    settings = GANSettings(weight=1.0, head_dim=16, coverage_weight=2.0)
    path = codes_file(tmp_path)
    full = make_module(copy.deepcopy(tiny_teacher), gan=settings, optim={"max_generator_steps": 4})
    make_trainer(tmp_path / "full").fit(full, real_data(path))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    make_trainer(tmp_path / "a", [ckpt]).fit(make_module(copy.deepcopy(tiny_teacher), gan=settings,
                                                         optim={"max_generator_steps": 2}), real_data(path))
    resumed = make_module(copy.deepcopy(tiny_teacher), gan=settings, optim={"max_generator_steps": 4})
    make_trainer(tmp_path / "b").fit(resumed, real_data(path), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for a, b in zip(full.student.parameters(), resumed.student.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_precomputed_real_within_gives_the_same_estimate() -> None:
    from dimo_lightning.objectives.coverage import bank_rows, within_group_distances

    generator = torch.Generator().manual_seed(2)
    fake = torch.randn(9, 6, generator=generator, dtype=torch.float64)
    real = torch.randn(30, 6, generator=generator, dtype=torch.float64)
    fake_groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3])
    real_groups = torch.arange(30) % 4
    within = within_group_distances(real, real_groups, 4)
    for g in range(4):
        rows = real[real_groups == g]
        want = torch.pdist(rows).mean()  # distinct unordered pairs: the same mean as ordered ones
        assert float(within[g]) == pytest.approx(float(want), rel=1e-6)
    direct = conditional_energy_distance(fake, real, fake_groups, real_groups)
    banked = conditional_energy_distance(fake, real, fake_groups, real_groups, real_within=within)
    assert float(banked[0]) == pytest.approx(float(direct[0]), rel=1e-12)
    assert float(banked[1]) == pytest.approx(float(direct[1]), rel=1e-6)
    rows = bank_rows(100, 30, seed=5)
    assert len(rows) == 30 and len(set(rows.tolist())) == 30 and torch.equal(rows, rows.sort().values)
    assert torch.equal(bank_rows(10, 30), torch.arange(10))
    with pytest.raises(ValueError, match="coverage_bank must be >= 1"):
        bank_rows(10, 0)


def test_coverage_bank_holds_real_features_and_trains(tiny_teacher, tmp_path) -> None:
    settings = GANSettings(weight=0.0, coverage_weight=5.0, coverage_bank=25)
    module = make_module(tiny_teacher, gan=settings, optim={"max_generator_steps": 2})
    data = real_data(codes_file(tmp_path, rows=40))
    before = copy.deepcopy(module.student.state_dict())
    make_trainer(tmp_path).fit(module, data)
    bank = module.coverage.real_bank
    assert bank.features.shape == (25, 49 * tiny_teacher.network.hidden_dim)
    # the bank's rows are real codes of the data module, with their labels, through the frozen trunk
    rows = [i for i in range(40) if any(torch.allclose(
        trunk_features(tiny_teacher.network.eval(), tiny_teacher.network.tok_emb(
            torch.as_tensor(data.data.codes[i]).reshape(1, -1).long()), torch.tensor([int(data.data.labels[i])]),
            (1,))[0], f, atol=1e-5) for f in bank.features)]
    assert len(rows) == 25
    assert sorted(int(data.data.labels[i]) for i in rows) == sorted(bank.labels.tolist())
    assert any(not torch.equal(v, module.student.state_dict()[k]) for k, v in before.items())


def test_coverage_scores_the_tempered_soft_embedding(tiny_teacher) -> None:
    """gan.coverage_temperature T: the loss is the energy distance of softmax(z / T) @ E's trunk features (computed
    here independently); null takes the module's sampling.temperature."""
    trunk = tiny_teacher.network.eval()
    gen = torch.Generator().manual_seed(3)
    z = 3 * torch.randn(6, 49, 17, generator=gen)
    codes = torch.randint(0, 16, (6, 49), generator=gen)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    valid = torch.ones(6, dtype=torch.bool)

    def expected(temperature: float) -> torch.Tensor:
        soft = (z[..., :16] / temperature).softmax(-1) @ trunk.tok_emb.weight[:16]
        fake = trunk_features(trunk, soft, labels, (1,))
        real = trunk_features(trunk, trunk.tok_emb(codes), labels, (1,))
        return conditional_energy_distance(fake, real, labels, labels)[0]

    losses = {}
    for setting, sample_temperature in ((0.5, 1.0), (None, 0.5), (None, 1.0), (2.0, 0.5)):
        module = make_module(tiny_teacher, gan=GANSettings(coverage_weight=1.0, coverage_temperature=setting),
                             sampling={"temperature": sample_temperature})
        with torch.no_grad():
            ctx = make_context(tiny_teacher, labels, codes)
            losses[setting, sample_temperature] = module.coverage.loss(ctx, 0, StudentDraw(z, z.argmax(-1), valid))[0]
    torch.testing.assert_close(losses[0.5, 1.0], expected(0.5))
    torch.testing.assert_close(losses[None, 0.5], expected(0.5))
    torch.testing.assert_close(losses[None, 1.0], expected(1.0))
    torch.testing.assert_close(losses[2.0, 0.5], expected(2.0))
    assert not torch.allclose(expected(0.5), expected(1.0))
    with pytest.raises(ValueError, match="gan.coverage_temperature must be > 0"):
        GANSettings(coverage_weight=1.0, coverage_temperature=0.0)


def test_pixel_features_pool_and_scale() -> None:
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    full = pixel_features(images)
    assert full.shape == (3, 784)
    torch.testing.assert_close(full, images.flatten(1) / 28.0)
    pooled = pixel_features(images, 2)
    assert pooled.shape == (3, 196)
    by_hand = images.reshape(3, 1, 14, 2, 14, 2).mean(dim=(3, 5)).flatten(1) / 14.0
    torch.testing.assert_close(pooled, by_hand)
    # the norm is the pooled pixels' root mean square, whatever the resolution
    torch.testing.assert_close(full.norm(dim=1), images.flatten(1).pow(2).mean(1).sqrt())
    with pytest.raises(ValueError, match=r"images must be \(B, C, H, W\)"):
        pixel_features(images[:, 0])


@pytest.mark.parametrize("coverage_input", ["soft", "straight_through"])
def test_pixel_coverage_scores_decoded_images_and_trains_the_student_through_them(tiny_teacher, coverage_input
                                                                                  ) -> None:
    """gan.coverage_space pixels: the loss is the energy distance between the tokenizer's differentiable decode of
    softmax(z / T) (or, straight-through, the decode of the sampled tokens forward) and the decoded real codes;
    its gradient reaches the logits and nothing of the teacher or the tokenizer."""
    gen = torch.Generator().manual_seed(5)
    z = (3 * torch.randn(6, 49, 17, generator=gen)).requires_grad_(True)
    tokens = torch.randint(0, 16, (6, 49), generator=gen)
    codes = torch.randint(0, 16, (6, 49), generator=gen)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    module = make_module(tiny_teacher, gan=GANSettings(coverage_weight=1.0, coverage_space="pixels",
                                                       coverage_input=coverage_input, coverage_pixel_pool=2),
                         sampling={"temperature": 0.5})
    assert module.coverage.layers == ()
    draw = StudentDraw(z, tokens, torch.ones(6, dtype=torch.bool))
    loss, logs = module.coverage.loss(make_context(tiny_teacher, labels, codes), 0, draw)
    value = logs["coverage"]

    probs = (z.detach()[..., :16] / 0.5).softmax(-1)
    codebook = tiny_teacher.tokenizer.codebook  # (K, p * p) patches in [0, 1]
    p = int(codebook.shape[1] ** 0.5)

    def images(patch_rows: torch.Tensor) -> torch.Tensor:  # (B, 49, p*p) -> (B, 1, 7p, 7p), by hand
        return patch_rows.reshape(-1, 7, 7, p, p).permute(0, 1, 3, 2, 4).reshape(-1, 1, 7 * p, 7 * p)

    fake_images = images(codebook[tokens] if coverage_input == "straight_through" else probs @ codebook)
    real_features = F.avg_pool2d(images(codebook[codes]), 2).flatten(1) / (7 * p // 2)
    fake_features = F.avg_pool2d(fake_images, 2).flatten(1) / (7 * p // 2)
    want = conditional_energy_distance(fake_features, real_features, labels, labels)
    torch.testing.assert_close(loss.detach(), want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(value, want[1], rtol=1e-5, atol=1e-6)

    (grad,) = torch.autograd.grad(loss, z)
    assert grad[..., :16].abs().sum() > 0 and grad[..., 16:].abs().sum() == 0  # never through the mask slot
    assert all(q.grad is None for q in tiny_teacher.parameters())
    if coverage_input == "straight_through":  # the soft path's gradient, with the hard tokens' images forward
        soft = make_module(tiny_teacher, gan=GANSettings(coverage_weight=1.0, coverage_space="pixels",
                                                         coverage_pixel_pool=2), sampling={"temperature": 0.5})
        z_soft = z.detach().clone().requires_grad_(True)
        fake = F.avg_pool2d(fake_images, 2).flatten(1) / (7 * p // 2)
        soft_images = images((z_soft[..., :16] / 0.5).softmax(-1) @ codebook)
        fake_st = fake + F.avg_pool2d(soft_images, 2).flatten(1) / (7 * p // 2)
        fake_st = fake_st - fake_st.detach() + fake
        (want_grad,) = torch.autograd.grad(
            conditional_energy_distance(fake_st, real_features, labels, labels)[0], z_soft)
        torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-7)
        assert soft.settings.gan.coverage_input == "soft"


def test_pixel_coverage_bank_and_fit(tiny_teacher, tmp_path) -> None:
    settings = GANSettings(weight=0.0, coverage_weight=5.0, coverage_space="pixels", coverage_bank=25)
    module = make_module(tiny_teacher, gan=settings, optim={"max_generator_steps": 2})
    data = real_data(codes_file(tmp_path, rows=40))
    before = copy.deepcopy(module.student.state_dict())
    make_trainer(tmp_path).fit(module, data)
    bank = module.coverage.real_bank
    side = tiny_teacher.decode(torch.zeros(1, 49, dtype=torch.long)).shape[-1]
    assert bank.features.shape == (25, side * side)
    decoded = pixel_features(tiny_teacher.decode(torch.as_tensor(data.data.codes[:40]).reshape(40, -1).long()))
    matches = [i for i in range(40) if any(torch.allclose(decoded[i], f, atol=1e-6) for f in bank.features)]
    assert len(matches) >= 25  # (two real rows may decode alike)
    assert torch.isfinite(torch.as_tensor(module.trainer.callback_metrics["train/coverage_energy"]))
    assert any(not torch.equal(v, module.student.state_dict()[k]) for k, v in before.items())


def test_pixel_coverage_needs_a_differentiable_decode(tiny_teacher, monkeypatch) -> None:
    monkeypatch.setattr(type(tiny_teacher), "decode_soft", None)
    with pytest.raises(ValueError, match="gan.coverage_space pixels needs a teacher with a differentiable decode"):
        make_module(tiny_teacher, gan=GANSettings(coverage_weight=1.0, coverage_space="pixels"))
    for bad, match in ((dict(coverage_space="pixel"), "gan.coverage_space must be one of trunk, pixels"),
                       (dict(coverage_pixel_pool=0), "gan.coverage_pixel_pool must be >= 1")):
        with pytest.raises(ValueError, match=match):
            GANSettings(coverage_weight=1.0, **bad)
