"""Text teachers (MDLM, LLaDA): loading through a config, the prompt prefix, the decoders, noise, CFG, records."""

from __future__ import annotations

import copy

import pytest
import torch
from fixtures.text_layouts import SENTENCES, save_tiny_llada, save_tiny_mdlm

from dimo_lightning.core.conditions import (
    PrefixCondition,
    condition_batch_size,
    move_condition,
    repeat_condition,
    split_condition,
)
from dimo_lightning.core.sampling import maskgit_decode
from dimo_lightning.core.subs import subs_log_probs
from dimo_lightning.core.text_decoding import ancestral_decode, transfer_counts
from dimo_lightning.teachers.base import MaskedTeacher
from dimo_lightning.teachers.llada import LLaDATeacher
from dimo_lightning.teachers.mdlm import MDLMTeacher

PROMPTS = ["Hello world!", "The quick brown fox", ""]  # different lengths; "" is an unconditional row
DECODERS = [("mdlm", "ancestral"), ("mdlm", "maskgit"), ("llada", "block"), ("llada", "maskgit")]


def build(class_path: str, init_args: dict) -> MaskedTeacher:
    """The teacher a YAML ``model.init_args.teacher`` entry gives, instantiated by jsonargparse as LightningCLI
    does."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--teacher", type=MaskedTeacher)
    config = parser.parse_object({"teacher": {"class_path": class_path, "init_args": init_args}})
    return parser.instantiate_classes(config).teacher


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    mdlm, gpt2 = save_tiny_mdlm(root)
    return {"mdlm": (mdlm, gpt2), "llada": save_tiny_llada(root / "LLaDA-8B-Base")}


@pytest.fixture(scope="module")
def teachers(folders):
    mdlm, gpt2 = folders["mdlm"]
    return {
        "mdlm": build("dimo_lightning.teachers.mdlm.MDLMTeacher", {"checkpoint": str(mdlm), "tokenizer": str(gpt2)}),
        "llada": build("dimo_lightning.teachers.llada.LLaDATeacher",
                       {"checkpoint": str(folders["llada"]), "seq_len": 16, "block_length": 4}),
    }


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- loading and the contract's numbers -----------------------------------------------------------------------------
def test_both_teachers_load_through_a_config_with_the_published_vocabularies(teachers, folders):
    mdlm, llada = teachers["mdlm"], teachers["llada"]
    assert isinstance(mdlm, MDLMTeacher) and isinstance(llada, LLaDATeacher)
    # MDLM: the tokenizer's ids, then the appended mask (len(tokenizer) = 301 here, GPT-2's 50257 in the release).
    k = len(mdlm.text_tokenizer)
    assert (mdlm.codebook_size, mdlm.mask_id, mdlm.logit_width) == (k, k, k) == (mdlm.network.mask_id,) * 3
    assert mdlm.grid_shape == (1, 16) and mdlm.seq_len == 16  # default: model_length
    # LLaDA: the mask id from config.json, inside the tokenizer; ids from it on are not generated.
    assert llada.mask_id == llada.codebook_size == llada.logit_width == llada.network.config.mask_token_id
    assert llada.text_tokenizer.convert_tokens_to_ids("<|mdm_mask|>") == llada.mask_id
    assert llada.grid_shape == (1, 16) and llada.network.model.transformer.wte.weight.dtype == torch.bfloat16
    assert MaskedTeacher.modality == "image" and mdlm.modality == llada.modality == "text"
    for teacher in teachers.values():
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        for name in teacher.frozen_parameter_names():
            teacher.network.get_parameter(name)  # names that exist in the (copied) network
        assert teacher.embedding_rms() > 0
        with pytest.raises(NotImplementedError, match="decode_text"):
            teacher.decode(torch.zeros(1, 16, dtype=torch.long))


def test_records_rebuild_the_teachers(teachers):
    for teacher in teachers.values():
        record = teacher.init_record()
        rebuilt = MaskedTeacher.from_record(record)
        assert type(rebuilt) is type(teacher) and rebuilt.init_record() == record
        codes = torch.randint(0, teacher.codebook_size, (2, teacher.seq_len), generator=gen())
        cond = teacher.encode_condition(PROMPTS[:2])
        assert torch.equal(rebuilt(codes, cond), teacher(codes, cond))


def test_options_and_bad_arguments(folders):
    mdlm, gpt2 = folders["mdlm"]
    teacher = MDLMTeacher(str(mdlm), str(gpt2), seq_len=8, dtype="bfloat16", gradient_checkpointing=True)
    assert teacher.seq_len == 8 and teacher.network.token_embeddings().dtype == torch.bfloat16
    assert copy.deepcopy(teacher.network).gradient_checkpointing  # the student and aux copies inherit it
    with pytest.raises(ValueError, match=r"teacher\.init_args\.seq_len must lie in \[2, 16\]"):
        MDLMTeacher(str(mdlm), str(gpt2), seq_len=17)
    with pytest.raises(ValueError, match="dtype must be one of"):
        MDLMTeacher(str(mdlm), str(gpt2), dtype="float16")
    with pytest.raises(ValueError, match="decoding must be one of ancestral, maskgit"):
        MDLMTeacher(str(mdlm), str(gpt2), decoding="block")
    with pytest.raises(ValueError, match="remasking must be one of"):
        LLaDATeacher(str(folders["llada"]), remasking="lowest")
    with pytest.raises(FileNotFoundError, match="mdlm-owt"):
        MDLMTeacher(str(mdlm / "missing"), str(gpt2))
    with pytest.raises(FileNotFoundError, match=r"holds no tokenizer.*teacher\.init_args\.tokenizer"):
        MDLMTeacher(str(mdlm))  # the released model folder has no tokenizer: GPT-2's is a separate download


# ---- the condition --------------------------------------------------------------------------------------------------
def test_prefix_condition_operations():
    tokens = torch.arange(12).reshape(4, 3)
    fixed = torch.tensor([[True, False, False], [True, True, False], [False] * 3, [True, True, True]])
    cond = PrefixCondition(tokens, fixed)
    assert cond.batch_size == condition_batch_size(cond) == 4 and cond.seq_len == 3
    parts = split_condition(cond, 2)
    assert [p.tokens[:, 0].tolist() for p in parts] == [[0, 3], [6, 9]]
    assert torch.equal(PrefixCondition.cat(parts).fixed, fixed)
    assert repeat_condition(cond, 2).tokens[:, 0].tolist() == [0, 3, 6, 9, 0, 3, 6, 9]
    assert cond.select([3, 1]).tokens[:, 0].tolist() == [9, 3]
    assert cond.select(torch.tensor([True, False, False, True])).fixed.tolist() == [fixed[0].tolist(),
                                                                                   fixed[3].tolist()]
    assert torch.equal(cond.select(slice(1, 3)).tokens, tokens[1:3])
    none = PrefixCondition.unconditional(1, 3, mask_id=99)
    swapped = cond.where(torch.tensor([False, True, False, True]), none)
    assert swapped.tokens[:, 0].tolist() == [0, 99, 6, 99] and swapped.fixed[[1, 3]].sum() == 0
    assert torch.equal(swapped.fixed[0], fixed[0])
    moved = move_condition(cond, "meta")
    assert moved.device.type == "meta" and moved.fixed.dtype == torch.bool
    with pytest.raises(ValueError, match="not divisible"):
        cond.split(3)
    with pytest.raises(ValueError, match="different lengths"):
        PrefixCondition.cat([cond, PrefixCondition.unconditional(1, 4, 99)])
    with pytest.raises(ValueError, match="bool"):
        PrefixCondition(tokens, fixed.long())
    with pytest.raises(ValueError, match="shape of tokens"):
        PrefixCondition(tokens, fixed[:, :2])


@pytest.mark.parametrize("name", ["mdlm", "llada"])
def test_encode_condition_prompts_seeds_and_a_prompt_too_long(teachers, name):
    teacher = teachers[name]
    cond = teacher.encode_condition(PROMPTS)
    lengths = [len(teacher.text_tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert cond.fixed.sum(dim=1).tolist() == lengths and lengths[2] == 0
    for row, n in zip(cond.fixed, lengths):
        assert row[:n].all() and not row[n:].any()  # a prefix
    assert (cond.tokens[~cond.fixed] == teacher.mask_id).all()
    assert teacher.decode_text(torch.where(cond.fixed, cond.tokens, teacher.mask_id))[:2] == PROMPTS[:2]
    seeds = teacher.encode_condition(torch.arange(5))
    assert seeds.batch_size == 5 and not seeds.fixed.any() and (seeds.tokens == teacher.mask_id).all()
    assert teacher.encode_condition((torch.arange(2), torch.zeros(2))).batch_size == 2
    long_prompt = " ".join(SENTENCES)
    with pytest.raises(ValueError, match=r"prompt 1 of prompts\.txt \('The quick.*seq_len - 1 = 15.*"
                                         r"teacher\.init_args\.seq_len"):
        teacher.encode_condition(["Hi", long_prompt], source="prompts.txt")
    with pytest.raises(TypeError, match="list of strings"):
        teacher.encode_condition("one prompt")


# ---- the network call: prefix, noise, guidance ----------------------------------------------------------------------
def test_fix_positions_writes_the_prompt_and_image_teachers_keep_codes(teachers, tiny_teacher):
    teacher = teachers["llada"]
    cond = teacher.encode_condition(PROMPTS)
    codes = torch.randint(0, teacher.codebook_size, (3, 16), generator=gen())
    fixed = teacher.fix_positions(codes, cond)
    assert torch.equal(fixed[cond.fixed], cond.tokens[cond.fixed])
    assert torch.equal(fixed[~cond.fixed], codes[~cond.fixed])
    labels = torch.tensor([1, 2])
    image_codes = torch.zeros(2, tiny_teacher.seq_len, dtype=torch.long)
    assert tiny_teacher.fix_positions(image_codes, labels) is image_codes


def input_embeddings(teacher, codes, cond, sigma, seed=0):
    """The embeddings the network receives (its inputs_embeds, or the table lookup when there is no noise)."""
    seen = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs.get("inputs_embeds")
        seen["ids"] = kwargs.get("input_ids")

    handle = teacher.network.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        teacher.apply_network(teacher.network, codes, cond, None, sigma, 1.0, gen(seed))
    finally:
        handle.remove()
    if seen["embeds"] is None:
        return teacher.network.token_embeddings()[seen["ids"]]
    return seen["embeds"]


@pytest.mark.parametrize("name", ["mdlm", "llada"])
def test_embedding_noise_touches_only_generated_positions(teachers, name):
    teacher = teachers[name]
    cond = teacher.encode_condition(PROMPTS)
    codes = teacher.fix_positions(torch.randint(0, teacher.codebook_size, (3, 16), generator=gen()), cond)
    clean = input_embeddings(teacher, codes, cond, 0.0)
    noisy = input_embeddings(teacher, codes, cond, 0.5)
    assert torch.equal(noisy[cond.fixed], clean[cond.fixed])
    assert (noisy[~cond.fixed] != clean[~cond.fixed]).any(dim=-1).all()
    # The same draws whatever the prompt: the noise of a generated position does not depend on the prefix.
    bare = input_embeddings(teacher, codes, teacher.encode_condition(torch.arange(3)), 0.5)
    assert torch.equal(bare[~cond.fixed], noisy[~cond.fixed])
    # sigma 0 through inputs_embeds is the plain call; per-sample sigma (B,) works.
    assert torch.equal(teacher.apply_network(teacher.network, codes, cond, None, 0.0), teacher(codes, cond))
    per_sample = teacher.apply_network(teacher.network, codes, cond, None, torch.tensor([0.0, 0.3, 0.6]), 1.0, gen())
    assert per_sample.shape == (3, 16, teacher.codebook_size)


def test_student_copies_get_gradients_through_the_noisy_input(teachers):
    teacher = teachers["mdlm"]
    student = copy.deepcopy(teacher.network).requires_grad_(True)
    cond = teacher.encode_condition(PROMPTS)
    codes = torch.randint(0, teacher.codebook_size, (3, 16), generator=gen())
    teacher.apply_network(student, codes, cond, None, 0.1, teacher.embedding_rms(), gen()).float().square().mean() \
        .backward()
    assert student.token_embeddings().grad is not None and student.token_embeddings().grad.abs().sum() > 0


def test_mdlm_logits_are_subs_at_masked_positions(teachers):
    teacher = teachers["mdlm"]
    cond = teacher.encode_condition(torch.arange(2))
    codes = torch.randint(0, teacher.codebook_size, (2, 16), generator=gen())
    codes[:, ::2] = teacher.mask_id
    logits = teacher(codes, cond)
    assert logits.shape == (2, 16, teacher.codebook_size) and torch.isfinite(logits).all()
    subs = subs_log_probs(teacher.network(input_ids=codes), codes, teacher.mask_id)
    masked = codes == teacher.mask_id
    assert torch.allclose(logits.float().log_softmax(-1)[masked], subs[masked][:, : teacher.codebook_size], atol=1e-5)
    assert (subs[masked][:, teacher.mask_id] == float("-inf")).all()


@pytest.mark.parametrize("name", ["mdlm", "llada"])
def test_the_unconditional_branch_masks_the_prompt(teachers, name):
    teacher = teachers[name]
    cond = teacher.encode_condition(PROMPTS)
    codes = torch.randint(0, teacher.codebook_size, (3, 16), generator=gen())
    drop = torch.tensor([True, False, True])
    dropped = teacher(codes, cond, drop)
    hidden = torch.where(cond.fixed & drop[:, None], teacher.mask_id, teacher.fix_positions(codes, cond))
    assert torch.equal(dropped, teacher(hidden, teacher.encode_condition(torch.arange(3))))
    assert torch.equal(dropped[1], teacher(codes, cond)[1])
    # CFG at scale 1 is one conditional pass; another scale guides the prompted rows only.
    calls = []
    handle = teacher.network.register_forward_hook(lambda *args: calls.append(1))
    try:
        assert torch.equal(teacher.guided_logits(teacher.network, codes, cond, 1.0), teacher(codes, cond))
        assert len(calls) == 2
        guided = teacher.guided_logits(teacher.network, codes, cond, 3.0)
    finally:
        handle.remove()
    plain = teacher(codes, cond).float()
    assert torch.allclose(guided[2].float(), plain[2], atol=0.1)  # no prompt: guidance is the identity
    assert not torch.allclose(guided[0].float(), plain[0], atol=0.1)


# ---- decoders -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "decoding"), DECODERS)
def test_decoders_keep_the_prompt_and_fill_every_other_position(teachers, name, decoding):
    teacher = teachers[name]
    cond = teacher.encode_condition(PROMPTS)
    for steps, cfg in ((4, 1.0), (12, 2.0)):  # 12 steps: more than the shorter rows have positions
        codes = teacher.sample(cond, steps=steps, cfg_scale=cfg, decoding=decoding, generator=gen(steps))
        assert codes.shape == (3, 16)
        assert torch.equal(codes[cond.fixed], cond.tokens[cond.fixed])
        generated = codes[~cond.fixed]
        assert generated.min() >= 0 and generated.max() < teacher.codebook_size  # no mask left
    again = teacher.sample(cond, steps=12, cfg_scale=2.0, decoding=decoding, generator=gen(12))
    assert torch.equal(again, codes)  # seeded
    texts = teacher.decode_text(codes)
    pairs = teacher.split_text(codes, cond)
    assert all(isinstance(t, str) for t in texts) and len(texts) == 3
    assert [p for p, _ in pairs] == PROMPTS and all(isinstance(c, str) for _, c in pairs)


def test_decoder_options(teachers):
    mdlm, llada = teachers["mdlm"], teachers["llada"]
    cond = mdlm.encode_condition(PROMPTS)
    for precision in ("float32", "float64"):
        codes = mdlm.sample(cond, steps=1, generator=gen(), sampling_precision=precision)
        assert (codes != mdlm.mask_id).all()  # one step, then noise removal
    cond = llada.encode_condition(PROMPTS)
    for options in ({"remasking": "random", "temperature": 1.0}, {"block_length": 16}, {"block_length": 3}):
        codes = llada.sample(cond, steps=6, generator=gen(), **options)  # 16 / 3: 6 blocks
        assert torch.equal(codes[cond.fixed], cond.tokens[cond.fixed]) and (codes < llada.mask_id).all()
    with pytest.raises(ValueError, match=r"steps \(3\) must be at least the number of blocks \(4"):
        llada.sample(cond, steps=3)  # 16 generated positions in blocks of 4
    with pytest.raises(TypeError, match="no options"):
        mdlm.sample(cond, steps=2, block_length=4)
    with pytest.raises(ValueError, match="decoding must be one of block, maskgit"):
        llada.sample(cond, decoding="ancestral")


def test_ancestral_decoding_caches_the_time_independent_network(teachers):
    teacher = teachers["mdlm"]
    calls = []
    handle = teacher.network.register_forward_hook(lambda *args: calls.append(1))
    try:
        teacher.sample(teacher.encode_condition(torch.arange(2)), steps=64, generator=gen())
    finally:
        handle.remove()
    # 32 positions revealed over 64 steps: a pass after each step that changed the codes, the first one and at
    # most one for the final noise removal.
    assert 1 <= len(calls) <= 34


def test_llada_block_decoding_follows_the_reference_algorithm(teachers):
    """Greedy low-confidence remasking with blocks, written step by step from LLaDA's generate.py for one prompt
    (prompt length P, then blocks of block_length, steps / num_blocks steps each, the share of each step from
    get_num_transfer_tokens), on the teacher's logits."""
    teacher = teachers["llada"]
    cond = teacher.encode_condition(["Hello world!"])
    p = int(cond.fixed.sum())
    gen_length = 16 - p
    block_length = next(n for n in (4, 3, 2, 1) if gen_length % n == 0 and gen_length > n)
    num_blocks = gen_length // block_length
    steps = 2 * num_blocks
    x = torch.where(cond.fixed, cond.tokens, teacher.mask_id)
    for j in range(num_blocks):
        start, end = p + j * block_length, p + (j + 1) * block_length
        per_step = transfer_counts((x[:, start:end] == teacher.mask_id).sum(dim=1), steps // num_blocks)
        for i in range(steps // num_blocks):
            masked = x == teacher.mask_id
            logits = teacher(x, cond).double()
            x0 = logits.argmax(-1)
            x0_p = logits.softmax(-1).gather(-1, x0[..., None])[..., 0]
            x0_p[:, end:] = float("-inf")
            confidence = torch.where(masked, x0_p, torch.full_like(x0_p, float("-inf")))
            chosen = confidence[0].topk(int(per_step[0, i])).indices
            x[0, chosen] = x0[0, chosen]
    ours = teacher.sample(cond, steps=steps, decoding="block", block_length=block_length)
    assert torch.equal(ours, x)
    assert transfer_counts(torch.tensor([10, 3]), 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]


def test_maskgit_from_all_mask_initial_codes_is_the_image_path(teachers):
    teacher = teachers["mdlm"]
    cond = teacher.encode_condition(torch.arange(2))

    def logits_fn(codes, drop):
        return teacher(codes, cond)

    args = (logits_fn, 2, 16, teacher.codebook_size, teacher.mask_id)
    plain = maskgit_decode(*args, steps=6, generator=gen())
    initial = torch.full((2, 16), teacher.mask_id)
    assert torch.equal(maskgit_decode(*args, steps=6, generator=gen(), initial=initial), plain)


def test_llada_chat_template_prompts_keep_ids_past_the_mask(folders):
    with pytest.raises(ValueError, match="has no chat template"):
        LLaDATeacher(str(folders["llada"]), seq_len=32, chat_template=True)
    teacher = LLaDATeacher(str(folders["llada"]), seq_len=32)
    teacher.text_tokenizer.chat_template = (  # the shape of LLaDA-8B-Instruct's template
        "<|startoftext|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
        "<|end_header_id|>\n\n{% endif %}")
    teacher.chat_template = True
    cond = teacher.encode_condition(["Hi", "Hello world!"])
    prompt_ids = cond.tokens[cond.fixed]
    assert (prompt_ids > teacher.mask_id).any()  # header / end-of-turn tokens sit past the mask id
    for decoding in ("block", "maskgit"):
        codes = teacher.sample(cond, steps=4, decoding=decoding, generator=gen())
        assert torch.equal(codes[cond.fixed], prompt_ids) and (codes[~cond.fixed] < teacher.mask_id).all()
    assert teacher.split_text(codes, cond)[0][0] == "user\n\nHiassistant\n\n"  # special tokens skipped


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_ancestral_step_reveals_at_the_schedules_rate_with_the_models_distribution(precision):
    """Two steps over 1 -> 1e-5: the first keeps a position masked with probability s / t = 1/2 (up to the eps) and
    otherwise draws from p_theta; the second reveals all but a share s / t = 2e-5, which the noise removal fills with
    the argmax."""
    probs = torch.tensor([1.0, 2.0, 5.0]) / 8
    seen = []

    def logits_fn(codes, sigma):
        seen.append(codes.clone())
        return probs.log().expand(*codes.shape, 3)

    initial = torch.full((1, 20_000), 3)
    initial[0, :10] = 7  # a prompt id past the vocabulary is kept
    out = ancestral_decode(logits_fn, initial, 3, steps=2, precision=precision, cache=False, generator=gen())
    after_first = seen[1][0, 10:]
    revealed = after_first[after_first != 3]
    assert abs(len(revealed) / len(after_first) - 0.5) < 0.02
    frequencies = torch.bincount(revealed, minlength=3).float() / len(revealed)
    assert torch.allclose(frequencies, probs, atol=0.02)
    assert (out[0, :10] == 7).all() and (out[0, 10:] < 3).all()
    second = out[0, 10:][after_first == 3]  # drawn by the last step (all but ~2e-5 of them), from p_theta too
    assert torch.allclose(torch.bincount(second, minlength=3).float() / len(second), probs, atol=0.02)
