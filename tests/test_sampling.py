"""Token sampling filters and the MaskGIT decoder's invariants."""

import pytest
import torch

from dimo_lightning.core.sampling import decode_schedule, filter_logits, maskgit_decode, sample_tokens


def test_decode_schedule_known_values():
    assert decode_schedule(8, 256, "arccos") == [1, 18, 26, 32, 38, 43, 48, 50]
    assert decode_schedule(12, 256, "arccos") == [1, 9, 13, 17, 19, 22, 24, 26, 28, 30, 32, 35]
    for mode in ("root", "linear", "square", "cosine", "arccos"):
        for steps in (1, 2, 4, 8, 16, 49):
            counts = decode_schedule(steps, 49, mode)
            assert len(counts) == steps and sum(counts) == 49 and min(counts) >= 1
    with pytest.raises(ValueError, match="steps"):
        decode_schedule(50, 49)


def test_filter_logits_top_k_top_p_and_exclusion():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 alone < 0.7, so the token crossing p is kept
    assert torch.isfinite(filter_logits(logits, top_p=0.4))[0].tolist() == [True, False, False, False]
    assert torch.isinf(filter_logits(logits, exclude_ids=[0])[0, 0])
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(logits, temperature=0)


def test_sample_tokens_frequencies_and_exclusion():
    probs = torch.tensor([0.1, 0.6, 0.3])
    logits = probs.log().expand(20000, 1, 3)
    draws = sample_tokens(logits, generator=torch.Generator().manual_seed(0))[:, 0]
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    never_one = sample_tokens(logits, exclude_ids=[1], generator=torch.Generator().manual_seed(0))
    assert not (never_one == 1).any()


class RecordingModel:
    """Random logits; records every call's codes so the decoder's steps can be checked."""

    def __init__(self, vocab):
        self.vocab = vocab
        self.calls = []
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self, codes, drop):
        self.calls.append((codes.clone(), None if drop is None else drop.clone()))
        return torch.randn(*codes.shape, self.vocab, generator=self.gen)


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16])
def test_decoder_unmasks_scheduled_counts(steps):
    model = RecordingModel(vocab=11)  # 10 codes + mask slot
    codes, history = maskgit_decode(model, 5, 49, 10, 10, steps=steps, cfg_scale=1.0, return_history=True,
                                    generator=torch.Generator().manual_seed(0))
    schedule = decode_schedule(steps, 49)
    previous = torch.full((5, 49), 10)
    for count, current in zip(schedule, history):
        newly = (previous == 10) & (current != 10)
        assert newly.sum(1).tolist() == [count] * 5
        # once written, a token never changes
        assert torch.equal(current[previous != 10], previous[previous != 10])
        previous = current
    assert not (codes == 10).any()
    assert int(codes.max()) < 10


def test_decoder_cfg_scale_one_equals_conditional_pass():
    a = RecordingModel(11)
    out_a = maskgit_decode(a, 3, 16, 10, 10, steps=4, cfg_scale=1.0, generator=torch.Generator().manual_seed(1))
    assert all(drop is None and codes.shape[0] == 3 for codes, drop in a.calls)

    def cond_only(codes, drop):
        assert drop is None
        return b_model(codes, None)

    b_model = RecordingModel(11)
    out_b = maskgit_decode(cond_only, 3, 16, 10, 10, steps=4, cfg_scale=1.0,
                           generator=torch.Generator().manual_seed(1))
    assert torch.equal(out_a, out_b)


def test_decoder_cfg_batches_conditional_and_unconditional():
    model = RecordingModel(11)
    maskgit_decode(model, 3, 16, 10, 10, steps=4, cfg_scale=3.0, cfg_ramp=False)
    for codes, drop in model.calls:
        assert codes.shape[0] == 6
        assert drop.tolist() == [False] * 3 + [True] * 3
        assert torch.equal(codes[:3], codes[3:])


def test_decoder_guidance_combination():
    """With a model whose logits depend only on the drop flag, the output follows l_u + w (l_c - l_u)."""
    cond_logits = torch.tensor([0.0, 3.0, 0.0])
    uncond_logits = torch.tensor([0.0, 0.0, 3.0])

    def model(codes, drop):
        out = torch.where(drop[:, None, None], uncond_logits, cond_logits) if drop is not None else cond_logits
        return out.expand(codes.shape[0], codes.shape[1], 3).clone()

    # w = 5: guided logits [0, 15, -12] -> always code 1 (mask slot id 2 excluded from codes 0..1)
    codes = maskgit_decode(model, 4, 9, 2, 2, steps=3, cfg_scale=5.0, cfg_ramp=False, choice_temperature=0.0)
    assert (codes == 1).all()
