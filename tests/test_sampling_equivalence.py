"""The lean sampling code (in-place Gumbel noise, no copy of the logits for the mask exclusion, the MaskGIT loop's
one-buffer CFG combination and its confidence-free last step) gives the same tokens, bit for bit, as the reference
formulation it replaced, and leaves the random generator in the same state, for a fixed seed."""

import pytest
import torch

from dimo_lightning.core.sampling import cfg_combine, decode_schedule, gumbel_noise, maskgit_decode, sample_tokens


# ---- the reference formulation (the code before the lean rewrite), kept here as the oracle ---------------------------
def reference_gumbel_noise(shape, generator=None, device=None):
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))


def reference_sample_categorical(logits, generator=None):
    return (logits.float() + reference_gumbel_noise(logits.shape, generator, logits.device)).argmax(dim=-1)


def reference_filter_logits(logits, temperature=1.0, top_k=0, top_p=0.0, exclude_ids=()):
    logits = logits.float() / temperature
    if exclude_ids:
        logits = logits.clone()
        logits[..., list(exclude_ids)] = float("-inf")
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def reference_sample_tokens(logits, temperature=1.0, top_k=0, top_p=0.0, exclude_ids=(), generator=None):
    return reference_sample_categorical(reference_filter_logits(logits, temperature, top_k, top_p, exclude_ids),
                                        generator)


def reference_maskgit_decode(logits_fn, batch_size, num_tokens, codebook_size, mask_id, steps=8, schedule="arccos",
                             cfg_scale=1.0, cfg_ramp=True, softmax_temperature=1.0, choice_temperature=4.5,
                             device=None, generator=None, return_history=False):
    counts = decode_schedule(steps, num_tokens, schedule)
    codes = torch.full((batch_size, num_tokens), mask_id, dtype=torch.long, device=device)
    history = []
    for i, count in enumerate(counts):
        still_masked = codes == mask_id
        scale = 1.0 + (cfg_scale - 1.0) * (i / (steps - 1) if steps > 1 else 1.0) if cfg_ramp else cfg_scale
        if scale == 1.0:
            logits = logits_fn(codes, None)
        else:
            drop = torch.cat([torch.zeros(batch_size, dtype=torch.bool), torch.ones(batch_size, dtype=torch.bool)])
            both = logits_fn(codes.repeat(2, 1), drop.to(codes.device))
            cond, uncond = both[:batch_size], both[batch_size:]
            logits = uncond + scale * (cond - uncond)
        logits = logits[..., :codebook_size].float() / softmax_temperature
        drawn = reference_sample_categorical(logits, generator)
        log_prob = logits.log_softmax(-1).gather(-1, drawn[..., None])[..., 0]
        tau = choice_temperature * (1.0 - i / (steps - 1)) if steps > 1 else 0.0
        if tau > 0:
            log_prob = log_prob + tau * reference_gumbel_noise(log_prob.shape, generator, log_prob.device)
        confidence = log_prob.masked_fill(~still_masked, float("-inf"))
        chosen = confidence.topk(count, dim=-1).indices
        reveal = torch.zeros_like(still_masked).scatter(1, chosen, True) & still_masked
        codes = torch.where(reveal, drawn, codes)
        if return_history:
            history.append(codes.clone())
    return (codes, history) if return_history else codes


class SeededModel:
    """Random logits (B', N, V) from its own generator: two instances with one seed answer alike, call by call."""

    def __init__(self, vocab, seed=0, dtype=torch.float32):
        self.vocab, self.dtype = vocab, dtype
        self.gen = torch.Generator().manual_seed(seed)
        self.outputs = []

    def __call__(self, codes, drop):
        # Logits depend on the codes and the drop flags too, so a wrong CFG half or stale codes would show.
        base = 2.0 * torch.randn(*codes.shape, self.vocab, generator=self.gen)
        base = base + 0.01 * codes[..., None].float()
        if drop is not None:
            base = base + drop[:, None, None].float()
        out = base.to(self.dtype)
        self.outputs.append((out, out.clone()))
        return out


def test_gumbel_noise_and_sample_tokens_match_the_reference_bit_for_bit():
    assert torch.equal(gumbel_noise((7, 49, 257), torch.Generator().manual_seed(3)),
                       reference_gumbel_noise((7, 49, 257), torch.Generator().manual_seed(3)))
    logits = 3 * torch.randn(16, 49, 257, generator=torch.Generator().manual_seed(0))
    logits[0, 0, :] = float("-inf")  # an all-excluded row: both pick id 0
    logits[1, 1, 5] = float("inf")
    settings = [dict(), dict(temperature=0.9, exclude_ids=(256,)), dict(exclude_ids=(0, 17, 256)),
                dict(temperature=1.3, top_k=5), dict(top_p=0.8, exclude_ids=(256,)),
                dict(temperature=0.7, top_k=40, top_p=0.95)]
    for kwargs in settings:
        original = logits.clone()
        g_new, g_ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        new = sample_tokens(logits, generator=g_new, **kwargs)
        ref = reference_sample_tokens(logits, generator=g_ref, **kwargs)
        assert torch.equal(new, ref), kwargs
        assert torch.equal(g_new.get_state(), g_ref.get_state()), kwargs  # the same draws were consumed
        assert torch.equal(logits, original), "sampling must not modify the caller's logits"
    # bf16 logits (a teacher under bf16-mixed) take the same float32 path
    half = logits.bfloat16()
    assert torch.equal(sample_tokens(half, 0.9, generator=torch.Generator().manual_seed(1)),
                       reference_sample_tokens(half, 0.9, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("steps", [1, 2, 8, 16])
@pytest.mark.parametrize("cfg_scale,cfg_ramp", [(1.0, True), (2.0, True), (3.0, False)])
def test_maskgit_decode_matches_the_reference_bit_for_bit(steps, cfg_scale, cfg_ramp):
    for softmax_temperature, choice_temperature in [(1.0, 4.5), (0.8, 16.0), (1.0, 0.0)]:
        kwargs = dict(steps=steps, cfg_scale=cfg_scale, cfg_ramp=cfg_ramp, softmax_temperature=softmax_temperature,
                      choice_temperature=choice_temperature, return_history=True)
        model_new, model_ref = SeededModel(11, seed=steps), SeededModel(11, seed=steps)
        g_new, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        codes, history = maskgit_decode(model_new, 6, 16, 10, 10, generator=g_new, **kwargs)
        codes_ref, history_ref = reference_maskgit_decode(model_ref, 6, 16, 10, 10, generator=g_ref, **kwargs)
        assert torch.equal(codes, codes_ref), kwargs
        assert len(history) == len(history_ref) == steps
        assert all(torch.equal(a, b) for a, b in zip(history, history_ref)), kwargs
        assert torch.equal(g_new.get_state(), g_ref.get_state()), kwargs
        # the model's outputs are not the decoder's to overwrite (a logits_fn may return a cached tensor)
        assert all(torch.equal(out, copy) for out, copy in model_new.outputs)


def test_maskgit_decode_with_bf16_logits_and_without_a_mask_slot_matches_the_reference():
    for vocab, codebook in ((11, 10), (10, 10)):  # MaskGIT scores the mask slot; Meissonic-style teachers do not
        model_new, model_ref = SeededModel(vocab, dtype=torch.bfloat16), SeededModel(vocab, dtype=torch.bfloat16)
        kwargs = dict(steps=6, cfg_scale=2.0, choice_temperature=4.5)
        new = maskgit_decode(model_new, 4, 25, codebook, 10, generator=torch.Generator().manual_seed(2), **kwargs)
        ref = reference_maskgit_decode(model_ref, 4, 25, codebook, 10, generator=torch.Generator().manual_seed(2),
                                       **kwargs)
        assert torch.equal(new, ref)


def test_teacher_sample_matches_the_reference_loop_on_a_real_teacher(tiny_teacher):
    cond = torch.arange(8) % tiny_teacher.num_classes
    doubled = tiny_teacher.repeat_condition(cond, 2)

    def logits_fn(codes, drop):
        return tiny_teacher.apply_network(tiny_teacher.network, codes, cond if drop is None else doubled, drop)

    for steps in (1, 4, 8):
        new = tiny_teacher.sample(cond, steps=steps, cfg_scale=2.0, choice_temperature=16.0,
                                  generator=torch.Generator().manual_seed(steps))
        with torch.no_grad():
            ref = reference_maskgit_decode(logits_fn, 8, tiny_teacher.seq_len, tiny_teacher.codebook_size,
                                           tiny_teacher.mask_id, steps=steps, cfg_scale=2.0, choice_temperature=16.0,
                                           generator=torch.Generator().manual_seed(steps))
        assert torch.equal(new, ref), steps
        assert not (new == tiny_teacher.mask_id).any()


def test_cfg_combine_equals_the_written_out_guidance_values_and_gradients():
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        cond = torch.randn(4, 9, 13, generator=gen).to(dtype)
        uncond = torch.randn(4, 9, 13, generator=gen).to(dtype)
        per_sample = torch.tensor([1.0, 2.0, 3.0, 4.5], dtype=dtype)[:, None, None]
        scales = [2.0, 0.37, torch.tensor(1.5, dtype=dtype), per_sample]
        for scale in scales:
            kept = cond.clone(), uncond.clone()
            assert torch.equal(cfg_combine(cond, uncond, scale), uncond + scale * (cond - uncond))
            assert torch.equal(cond, kept[0]) and torch.equal(uncond, kept[1])  # inputs untouched
    # autograd goes through the in-place buffer as through the expression
    cond = torch.randn(3, 5, 7, generator=gen, requires_grad=True)
    uncond = torch.randn(3, 5, 7, generator=gen, requires_grad=True)
    weights = torch.randn(3, 5, 7, generator=gen)
    scale = torch.tensor([1.0, 2.0, 3.0])[:, None, None]
    grads = torch.autograd.grad((cfg_combine(cond, uncond, scale) * weights).sum(), (cond, uncond))
    expected = torch.autograd.grad(((uncond + scale * (cond - uncond)) * weights).sum(), (cond, uncond))
    assert all(torch.equal(a, b) for a, b in zip(grads, expected))


def test_teacher_guided_logits_equal_two_separate_passes(tiny_teacher):
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, tiny_teacher.mask_id + 1, (5, tiny_teacher.seq_len), generator=generator)
    cond = torch.arange(5) % tiny_teacher.num_classes
    with torch.no_grad():
        guided = tiny_teacher.guided_logits(tiny_teacher.network, codes, cond, 2.0)
        conditional = tiny_teacher(codes, cond)
        unconditional = tiny_teacher(codes, cond, torch.ones(5, dtype=torch.bool))
    torch.testing.assert_close(guided, unconditional + 2.0 * (conditional - unconditional), rtol=1e-5, atol=1e-5)


class RowwiseModel:
    """Logits computed row by row from a fixed table (no matrix product across the batch), so one pass of 2B and
    two passes of B give the same values bit for bit; records each call's batch size and drop flags."""

    def __init__(self, vocab_in, vocab_out, num_tokens):
        gen = torch.Generator().manual_seed(0)
        self.table = torch.randn(vocab_in, vocab_out, generator=gen)
        self.position = torch.randn(num_tokens, vocab_out, generator=gen)
        self.unconditional = torch.randn(vocab_out, generator=gen)
        self.calls = []

    def __call__(self, codes, drop):
        self.calls.append((codes.shape[0], None if drop is None else drop.tolist()))
        logits = self.table[codes] + self.position
        if drop is not None:
            logits = torch.where(drop[:, None, None], logits + self.unconditional, logits)
        return logits


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_split_cfg_decodes_the_same_tokens_as_batched_cfg(steps):
    batched_model, split_model = RowwiseModel(11, 11, 16), RowwiseModel(11, 11, 16)
    kwargs = dict(steps=steps, cfg_scale=3.0, choice_temperature=4.5)
    batched = maskgit_decode(batched_model, 5, 16, 10, 10, generator=torch.Generator().manual_seed(0), **kwargs)
    split = maskgit_decode(split_model, 5, 16, 10, 10, generator=torch.Generator().manual_seed(0), cfg_batched=False,
                           **kwargs)
    assert torch.equal(batched, split)
    guided_steps = steps - 1 if steps > 1 else 1  # the ramp starts at scale 1: the first of several steps is plain
    assert [size for size, _ in batched_model.calls].count(10) == guided_steps
    split_calls = split_model.calls[-2 * guided_steps:]
    assert [size for size, _ in split_calls] == [5] * (2 * guided_steps)
    assert split_calls[0::2] == [(5, None)] * guided_steps  # conditional pass first
    assert split_calls[1::2] == [(5, [True] * 5)] * guided_steps  # then the unconditional one


def test_teacher_sample_with_split_cfg_agrees_with_batched_cfg(tiny_teacher):
    cond = torch.arange(6) % tiny_teacher.num_classes
    with torch.no_grad():
        codes = torch.full((6, tiny_teacher.seq_len), tiny_teacher.mask_id)
        both = tiny_teacher.guided_logits(tiny_teacher.network, codes, cond, 2.0)
        conditional = tiny_teacher(codes, cond)
        unconditional = tiny_teacher(codes, cond, torch.ones(6, dtype=torch.bool))
    torch.testing.assert_close(cfg_combine(conditional, unconditional, 2.0), both, rtol=1e-5, atol=1e-5)
    split = tiny_teacher.sample(cond, steps=4, cfg_scale=2.0, generator=torch.Generator().manual_seed(0),
                                cfg_batched=False)
    assert split.shape == (6, tiny_teacher.seq_len) and not (split == tiny_teacher.mask_id).any()


def test_teacher_sampling_carries_the_cfg_form_and_reads_records_without_it():
    from dimo_lightning.core.teacher_sampling import TeacherSampling

    old_record = {"steps": 8, "choice_temperature": 16.0}  # a checkpoint written before the switch existed
    assert TeacherSampling.coerce(old_record).sample_kwargs(2.0)["cfg_batched"] is True
    assert TeacherSampling.coerce({"cfg_batched": False}).sample_kwargs(2.0, steps=4) == {
        "steps": 4, "cfg_scale": 2.0, "cfg_ramp": True, "schedule": "arccos", "softmax_temperature": 1.0,
        "choice_temperature": 4.5, "cfg_batched": False}
