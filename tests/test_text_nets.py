"""The text-MDM networks (MDLM, LLaDA): released layouts, strict loading, SUBS, attention, checkpointing."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch
from fixtures.text_layouts import (
    RELEASED_LLADA_CONFIG,
    RELEASED_MDLM_CONFIG,
    llada_released_shapes,
    mdlm_released_shapes,
    save_tiny_llada,
    save_tiny_mdlm,
)
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dimo_lightning.core.subs import subs_log_probs
from dimo_lightning.nn.llada import LLADA_8B_PARAMETERS, LLaDA, LLaDAConfig, load_llada
from dimo_lightning.nn.mdlm import MDLM, MDLM_OWT_PARAMETERS, MDLMConfig, load_mdlm
from dimo_lightning.nn.rotary import apply_rotary, rotary_cos_sin
from dimo_lightning.nn.transformer import count_parameters

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def mdlm_files(tmp_path_factory):
    """(model folder, tokenizer folder) of a tiny random mdlm-owt layout."""
    return save_tiny_mdlm(tmp_path_factory.mktemp("mdlm"))


@pytest.fixture(scope="module")
def llada_folder(tmp_path_factory):
    return save_tiny_llada(tmp_path_factory.mktemp("llada") / "LLaDA-8B-Base")


def llada_tokenizer(folder):
    # As on the Hub: AutoTokenizer would follow config.json's auto_map to remote code; the tokenizer itself is a
    # plain PreTrainedTokenizerFast (its tokenizer_config says so).
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def ids_for(vocab: int, b: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, length), generator=torch.Generator().manual_seed(seed))


# ---- released configs on the meta device ---------------------------------------------------------------------------
def test_released_mdlm_config_builds_the_released_keys_and_parameter_count():
    config = MDLMConfig.from_dict(RELEASED_MDLM_CONFIG)
    assert config == MDLMConfig() and config.mask_id == 50257
    with torch.device("meta"):
        model = MDLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == mdlm_released_shapes(RELEASED_MDLM_CONFIG, with_inv_freq=False)
    assert count_parameters(model) == MDLM_OWT_PARAMETERS == 169_627_218
    assert len(shapes) == 130 and not list(model.buffers())
    assert 4 * MDLM_OWT_PARAMETERS / 1e6 == pytest.approx(679, abs=1)  # the 679 MB float32 model.safetensors


def test_released_llada_config_builds_the_released_keys_and_parameter_count():
    config = LLaDAConfig.from_dict(RELEASED_LLADA_CONFIG)
    assert config == LLaDAConfig()
    with torch.device("meta"):
        model = LLaDA(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == llada_released_shapes(RELEASED_LLADA_CONFIG)
    assert count_parameters(model) == LLADA_8B_PARAMETERS == 8_015_581_184
    assert 2 * LLADA_8B_PARAMETERS == 16_031_162_368  # total_size of the released index (bf16)
    assert len(shapes) == 291 and not list(model.buffers())
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 32  # one FSDP unit per block


# ---- loading the published layouts ----------------------------------------------------------------------------------
def test_mdlm_loads_from_the_released_layout(mdlm_files, tmp_path):
    folder, tokenizer_folder = mdlm_files
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    model = load_mdlm(folder, tokenizer)
    assert not model.training and model.vocab_size == len(tokenizer) + 1 and model.mask_id == len(tokenizer)
    assert tokenizer.convert_ids_to_tokens(len(tokenizer) - 1) == "<|endoftext|>"  # GPT-2: eos last, then the mask
    file = load_file(str(folder / "model.safetensors"))
    assert "backbone.rotary_emb.inv_freq" in file  # the reference's persistent buffer: accepted, not a parameter
    state = model.state_dict()
    assert set(state) == set(file) - {"backbone.rotary_emb.inv_freq"}
    assert all(torch.equal(state[k], file[k]) for k in state)
    ids = torch.tensor(tokenizer(["the quick brown fox", "masked diffusion"], padding=False).input_ids[0][:6])
    ids = torch.stack([ids, ids.flip(0)])
    logits = model(ids)
    assert logits.shape == (2, 6, model.vocab_size) and logits.dtype == torch.float32
    # a file without the buffer loads to the same network
    other, _ = save_tiny_mdlm(tmp_path, with_inv_freq=False)
    torch.testing.assert_close(load_mdlm(other)(ids), logits)


def test_llada_loads_from_the_sharded_released_layout(llada_folder, tmp_path):
    tokenizer = llada_tokenizer(llada_folder)
    index = json.loads((llada_folder / INDEX).read_text())
    assert len(set(index["weight_map"].values())) == 2
    model = load_llada(llada_folder, tokenizer)
    config = model.config
    assert not model.training and next(model.parameters()).dtype == torch.bfloat16
    assert model.mask_id == tokenizer.convert_tokens_to_ids("<|mdm_mask|>") and config.embedding_size >= len(tokenizer)
    assert index["metadata"]["total_size"] == 2 * count_parameters(model)
    ids = ids_for(len(tokenizer))
    logits = model(ids)
    assert logits.shape == (2, 10, config.embedding_size) and logits.dtype == torch.bfloat16
    full = load_llada(llada_folder, dtype=torch.float32)
    assert next(full.parameters()).dtype == torch.float32
    reference = full(ids)
    assert torch.isfinite(logits).all()
    assert (logits.float() - reference).abs().max() < 0.1 * reference.abs().max()  # bf16 network ~ float32 one
    # grouped-query attention (fewer kv heads) loads and runs too
    gqa = load_llada(save_tiny_llada(tmp_path / "gqa", n_kv_heads=2), dtype=torch.float32)
    assert gqa.model.transformer.blocks[0].k_proj.weight.shape == (8, 16)
    assert gqa(ids).shape == (2, 10, gqa.config.embedding_size)


# ---- failures name the file and the expected layout -----------------------------------------------------------------
def copy_of(folder, tmp_path, name="copy"):
    return shutil.copytree(folder, tmp_path / name)


def test_mdlm_folder_errors(mdlm_files, tmp_path):
    folder, tokenizer_folder = mdlm_files
    layout = re.escape("kuleshov-group/mdlm-owt")
    broken = copy_of(folder, tmp_path)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(broken / 'model.safetensors'))}.*{layout}"):
        load_mdlm(broken)
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(broken / 'config.json'))}.*{layout}"):
        load_mdlm(broken)
    # a key under another name: both are listed, with the file and the layout
    renamed = copy_of(folder, tmp_path, "renamed")
    state = load_file(str(renamed / "model.safetensors"))
    state["backbone.blocks.0.attn.qkv.weight"] = state.pop("backbone.blocks.0.attn_qkv.weight")
    save_file(state, str(renamed / "model.safetensors"))
    with pytest.raises(ValueError, match=(r"model\.safetensors does not match MDLM: 1 missing keys: "
                                          r"backbone\.blocks\.0\.attn_qkv\.weight; 1 unexpected keys: "
                                          rf"backbone\.blocks\.0\.attn\.qkv\.weight.*{layout}")):
        load_mdlm(renamed)
    # a rotary buffer of another base is not silently dropped
    state = load_file(str(folder / "model.safetensors"))
    state["backbone.rotary_emb.inv_freq"] = state["backbone.rotary_emb.inv_freq"] ** 2
    save_file(state, str(renamed / "model.safetensors"))
    with pytest.raises(ValueError, match="inv_freq"):
        load_mdlm(renamed)
    # the vocabulary must be the tokenizer's size + 1 (the appended mask)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    short, _ = save_tiny_mdlm(tmp_path / "short", vocab_size=len(tokenizer))
    load_mdlm(short)  # consistent with its own weights
    with pytest.raises(ValueError, match=(rf"{re.escape(str(short / 'config.json'))}: vocab_size {len(tokenizer)} "
                                          rf"disagrees.*must be {len(tokenizer) + 1}.*{layout}")):
        load_mdlm(short, tokenizer)
    # a config from another model
    config = json.loads((folder / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "llada"}))
    with pytest.raises(ValueError, match="model_type 'llada'"):
        load_mdlm(broken)
    (broken / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_dim"}))
    with pytest.raises(ValueError, match=f"config.json lacks hidden_dim.*{layout}"):
        load_mdlm(broken)


def test_llada_folder_errors(llada_folder, tmp_path):
    layout = re.escape("GSAI-ML/LLaDA-8B-Base")
    index = json.loads((llada_folder / INDEX).read_text())
    first, second = sorted(set(index["weight_map"].values()))
    # a missing shard
    broken = copy_of(llada_folder, tmp_path)
    (broken / second).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {re.escape(str(broken / second))}.*{INDEX}.*{layout}"):
        load_llada(broken)
    # a key the shard holds but the index does not list
    broken = copy_of(llada_folder, tmp_path, "extra")
    state = load_file(str(broken / first))
    save_file({**state, "model.transformer.wpe.weight": torch.zeros(4, 16)}, str(broken / first))
    with pytest.raises(ValueError, match=(rf"{re.escape(str(broken / first))} disagrees with .*{INDEX}: holds 1 keys "
                                          rf"not assigned to it in the index: model\.transformer\.wpe\.weight"
                                          rf".*{layout}")):
        load_llada(broken)
    # an index that lacks a key the model needs
    broken = copy_of(llada_folder, tmp_path, "unlisted")
    shrunk = {**index, "weight_map": {k: v for k, v in index["weight_map"].items() if "ln_f" not in k}}
    (broken / INDEX).write_text(json.dumps(shrunk))
    with pytest.raises(ValueError, match=rf"{INDEX} does not match the model: 1 missing keys: "
                                         rf"model\.transformer\.ln_f\.weight.*{layout}"):
        load_llada(broken)
    # a config whose sizes disagree with the shards
    broken = copy_of(llada_folder, tmp_path, "shapes")
    config = json.loads((llada_folder / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "mlp_hidden_size": 32}))
    with pytest.raises(ValueError, match=r"model-0000\d-of-00002\.safetensors does not match the model's shapes.*"
                                         r"ff_proj\.weight: file \[24, 16\] vs model \[32, 16\]"):
        load_llada(broken)
    # architecture switches the implementation lacks
    (broken / "config.json").write_text(json.dumps({**config, "block_type": "sequential"}))
    with pytest.raises(ValueError, match=f"config.json: block_type is 'sequential'; only 'llama'.*{layout}"):
        load_llada(broken)
    (broken / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "weight_tying"}))
    with pytest.raises(ValueError, match=r"weight_tying is True \(the default when absent\)"):
        load_llada(broken)
    # the tokenizer must agree on the mask id and fit in the embedding
    tokenizer = llada_tokenizer(llada_folder)
    (broken / "config.json").write_text(json.dumps({**config, "mask_token_id": config["mask_token_id"] - 1}))
    with pytest.raises(ValueError, match=(rf"{re.escape(str(broken / 'config.json'))}: mask_token_id is "
                                          rf"{config['mask_token_id'] - 1} but the tokenizer maps <\|mdm_mask\|> to "
                                          rf"{config['mask_token_id']}.*{layout}")):
        load_llada(broken, tokenizer)
    small = len(tokenizer) - 2
    (broken / "config.json").write_text(json.dumps({**config, "vocab_size": small, "embedding_size": small}))
    with pytest.raises(ValueError, match=f"the tokenizer has {len(tokenizer)} tokens but embedding_size is {small}"):
        load_llada(broken, tokenizer)


# ---- numerics -------------------------------------------------------------------------------------------------------
def test_subs_never_predicts_the_mask_and_keeps_unmasked_tokens():
    vocab, mask = 7, 6
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, vocab, generator=g, requires_grad=True)
    ids = torch.tensor([[mask, 2, mask, 0, 5], [1, mask, mask, mask, 3]])
    out = subs_log_probs(logits, ids, mask)
    assert out.dtype == torch.float32 and not torch.isnan(out).any()
    probs = out.exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 5))
    assert (probs[..., mask] == 0).all()
    masked = ids == mask
    torch.testing.assert_close(out[masked][:, :mask], logits[masked][:, :mask].log_softmax(-1))
    torch.testing.assert_close(probs[~masked], torch.nn.functional.one_hot(ids[~masked], vocab).float())
    out[masked].clamp_min(-30).sum().backward()
    assert (logits.grad[~masked] == 0).all() and (logits.grad[masked] != 0).any()
    assert subs_log_probs(logits.detach().bfloat16(), ids, mask).dtype == torch.float32
    with pytest.raises(ValueError, match="mask_id"):
        subs_log_probs(logits, ids, vocab)


def test_rotary_is_the_half_split_complex_rotation():
    x = torch.randn(2, 3, 5, 8)  # (B, H, L, d)
    cos, sin = rotary_cos_sin(5, 8, 10_000.0)
    z = torch.complex(x[..., :4], x[..., 4:])
    angles = torch.arange(5.0)[:, None] * 10_000.0 ** (-torch.arange(0, 8, 2) / 8)
    expected = z * torch.polar(torch.ones_like(angles), angles)
    torch.testing.assert_close(apply_rotary(x, cos, sin), torch.cat([expected.real, expected.imag], -1))


def test_llada_is_a_bidirectional_llama(tmp_path):
    """An independent implementation: transformers' Llama with the weights renamed and an all-zero additive 4D mask
    (no causal masking) gives LLaDA's logits; with its default causal mask it does not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = load_llada(save_tiny_llada(tmp_path, n_kv_heads=2), dtype=torch.float32)
    c = model.config
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.embedding_size, hidden_size=c.d_model, intermediate_size=c.mlp_hidden_size,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, max_position_embeddings=c.max_sequence_length,
        tie_word_embeddings=False, attn_implementation="eager")).eval()
    block_names = {"attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
                   "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj", "ff_norm": "post_attention_layernorm",
                   "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}
    top_names = {"wte": "model.embed_tokens", "ln_f": "model.norm", "ff_out": "lm_head"}
    renamed = {}
    for key, value in model.state_dict().items():
        parts = key.removeprefix("model.transformer.").split(".")
        if parts[0] == "blocks":
            renamed[f"model.layers.{parts[1]}.{block_names[parts[2]]}.weight"] = value
        else:
            renamed[f"{top_names[parts[0]]}.weight"] = value
    llama.load_state_dict(renamed, strict=True)
    ids = ids_for(200, length=9)
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(llama(input_ids=ids, attention_mask=torch.zeros(2, 1, 9, 9)).logits, ours,
                                   atol=1e-5, rtol=1e-5)
        assert (llama(input_ids=ids).logits - ours).abs().max() > 1e-2


@pytest.mark.parametrize("net", ["mdlm", "llada"])
def test_attention_is_bidirectional(net, mdlm_files, llada_folder):
    model = load_mdlm(mdlm_files[0]) if net == "mdlm" else load_llada(llada_folder, dtype=torch.float32)
    ids = ids_for(200)
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 200
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4  # the first position sees the last one
    torch.testing.assert_close(model(inputs_embeds=model.token_embeddings()[ids]), a)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.token_embeddings()[ids])
    with pytest.raises(ValueError, match="exceeds"):
        model(ids_for(200, length=40))


def test_mdlm_sigma_matters_only_with_time_conditioning(mdlm_files, tmp_path):
    model = load_mdlm(mdlm_files[0])
    assert not model.config.time_conditioning
    ids = ids_for(200)
    torch.testing.assert_close(model(ids, torch.tensor([0.5, 2.0])), model(ids))
    conditioned, _ = save_tiny_mdlm(tmp_path, time_conditioning=True)
    model = load_mdlm(conditioned)
    assert not torch.allclose(model(ids, torch.tensor([0.5, 2.0])), model(ids))
    torch.testing.assert_close(model(ids, 0.0), model(ids))


@pytest.mark.parametrize("net", ["mdlm", "llada"])
def test_gradient_checkpointing_gives_the_same_gradients(net, mdlm_files, tmp_path):
    if net == "mdlm":  # dropout 0.1: the recompute must replay the same masks
        load = load_mdlm
        folder = mdlm_files[0]
    else:
        load = load_llada
        folder = save_tiny_llada(tmp_path / "llada", n_kv_heads=2, residual_dropout=0.1)
    plain = load(folder, dtype=torch.float32).train()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing = True
    ids = ids_for(200)
    outs = []
    for model in (plain, ckpt):
        torch.manual_seed(3)
        out = model(ids)
        out.float().square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert load(folder, gradient_checkpointing=True).gradient_checkpointing


def test_networks_run_in_bfloat16_on_cpu(mdlm_files, llada_folder):
    ids = ids_for(200)
    model = load_mdlm(mdlm_files[0])
    reference = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model(ids)
    half = load_mdlm(mdlm_files[0], dtype=torch.bfloat16)(ids)  # bf16 weights without autocast
    for out in (autocast, half):
        assert out.dtype == torch.bfloat16
        assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mdlm_runs_under_bf16_autocast_on_cuda(mdlm_files):
    model = load_mdlm(mdlm_files[0], device="cuda")
    ids = ids_for(200).cuda()
    logits = model(ids)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    reference = load_mdlm(mdlm_files[0])(ids.cpu())
    assert (logits.float().cpu() - reference).abs().max() < 0.1 * reference.abs().max()
