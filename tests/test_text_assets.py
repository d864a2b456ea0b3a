"""The text main job's assets: the corpus split, the BPE tokenizer, the shipped MDLM teacher and GPT-2 judge, the
MDLM objective and the two pretraining modules."""

from __future__ import annotations

import hashlib
import json
import math

import lightning.pytorch as pl
import pytest
import torch

from dimo_lightning.assets import asset_path
from dimo_lightning.core.subs import subs_log_probs
from dimo_lightning.data.text_corpus import (
    TEXT_JUDGE_ASSET,
    TEXT_TEACHER_ASSET,
    TEXT_TOKENIZER_ASSET,
    TextCorpusDataModule,
    load_documents,
    load_split,
    load_text_tokenizer,
    normalize_text,
    pack_rows,
    split_of,
)
from dimo_lightning.evaluation.metrics.text import load_judge
from dimo_lightning.nn.mdlm import MDLM, MDLMConfig, check_mdlm_tokenizer, load_mdlm
from dimo_lightning.pretraining.judge import CausalJudgeModule
from dimo_lightning.pretraining.masked_text import (
    MaskedTextDiffusionModule,
    loglinear_dsigma,
    loglinear_sigma,
    mask_by_time,
    nelbo_per_token,
    nelbo_sum,
    nelbo_weight,
    sample_teacher,
    sample_times,
)
from dimo_lightning.tokenizers.text_bpe import ENDOFTEXT, train_bpe_tokenizer

# sha256 of the sorted validation ids joined by newlines: the split is part of the shipped assets' definition.
VALIDATION_IDS_SHA256 = "64fdce5687af5cc2799db62f62156fd272ef9a6c3fee96abfd6d46c17859c853"


@pytest.fixture(scope="module")
def tokenizer():
    return load_text_tokenizer()


# ---- corpus and split ------------------------------------------------------------------------------------------------
def test_corpus_documents_are_the_normalised_chapters():
    docs = load_documents()
    assert len(docs) == 1189 and docs[0].id == "Genesis 1" and docs[-1].id == "Revelation 22"
    assert docs[0].text.startswith("In the beginning God created the heaven and the earth. And the earth was")
    assert all(d.text == normalize_text(d.text) and d.text for d in docs)
    assert "[]" not in next(d for d in docs if d.id == "3 John 1").text  # the placeholder verse is dropped
    assert normalize_text("  a\tb \n\n c ") == "a b c"


def test_split_is_fixed_and_disjoint():
    train, val = load_split("train"), load_split("val")
    train_ids, val_ids = {d.id for d in train}, {d.id for d in val}
    assert not train_ids & val_ids
    assert train_ids | val_ids == {d.id for d in load_documents()}
    assert (len(train), len(val)) == (1075, 114)
    digest = hashlib.sha256("\n".join(sorted(val_ids)).encode()).hexdigest()
    assert digest == VALIDATION_IDS_SHA256
    # the rule depends on the id alone
    assert split_of("Genesis 23") == "val" and split_of("Genesis 1") == "train"
    assert [d.id for d in load_split("val")] == [d.id for d in val]  # corpus order, every call
    with pytest.raises(ValueError, match="split"):
        load_split("test")


def test_pack_rows_frames_pieces_as_mdlm_wraps():
    rows = pack_rows([[1, 2, 3], [4, 5]], seq_len=5, bos_id=9, eos_id=0)
    # stream 1 2 3 0 4 5 0 -> pieces of 3: [1 2 3] [0 4 5], the tail [0] dropped
    assert rows.tolist() == [[9, 1, 2, 3, 0], [9, 0, 4, 5, 0]]
    with pytest.raises(ValueError, match="seq_len"):
        pack_rows([[1]], 2, 0, 0)


# ---- tokenizer -------------------------------------------------------------------------------------------------------
def test_shipped_tokenizer_layout_and_round_trip(tokenizer):
    assert len(tokenizer) == 4096
    assert tokenizer.eos_token == tokenizer.bos_token == ENDOFTEXT and tokenizer.eos_token_id == 4095
    assert tokenizer.mask_token is None  # the mask is appended after the tokenizer (GPT-2 convention)
    check_mdlm_tokenizer(len(tokenizer) + 1, tokenizer, "test")
    assert tokenizer("In the beginning", add_special_tokens=True)["input_ids"] == tokenizer.encode("In the beginning")
    for doc in load_split("val"):
        assert tokenizer.decode(tokenizer.encode(doc.text)) == doc.text
    odd = "Ünïcode — tabs\tand  double spaces , kept ."
    assert tokenizer.decode(tokenizer.encode(odd)) == odd  # byte-level BPE is lossless for any string


def test_bpe_trainer_gives_the_exact_size_with_endoftext_last():
    texts = [d.text for d in load_split("train")[:3]]
    tok = train_bpe_tokenizer(texts, vocab_size=400)
    assert len(tok) == 400 and tok.convert_tokens_to_ids(ENDOFTEXT) == 399
    assert tok.decode(tok.encode(texts[0])) == texts[0]
    with pytest.raises(ValueError, match="fewer"):
        train_bpe_tokenizer(["tiny text"], vocab_size=4096)


# ---- shipped teacher and judge ---------------------------------------------------------------------------------------
def test_shipped_teacher_loads_in_the_released_layout(tokenizer):
    folder = asset_path(TEXT_TEACHER_ASSET)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mdlm" and config["vocab_size"] == len(tokenizer) + 1
    model = load_mdlm(folder, tokenizer)
    assert model.mask_id == len(tokenizer) and next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([tokenizer.encode("In the beginning God created")])
    ids[0, 2] = model.mask_id
    logits = model(ids)
    assert logits.shape == (1, ids.shape[1], len(tokenizer) + 1) and torch.isfinite(logits).all()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert math.isfinite(metrics["val_nelbo"]) and metrics["val_ppl_bound"] == pytest.approx(
        math.exp(metrics["val_nelbo"]))
    assert (asset_path(TEXT_TOKENIZER_ASSET) / "tokenizer.json").is_file()


def test_shipped_judge_loads_with_the_same_tokenizer(tokenizer):
    folder = asset_path(TEXT_JUDGE_ASSET)
    judge = load_judge(folder)
    assert next(judge.model.parameters()).dtype == torch.float32  # fp16 on disk, float32 on load
    assert judge.context_length == 256 and judge.model.config.vocab_size == len(tokenizer)
    shipped = (asset_path(TEXT_TOKENIZER_ASSET) / "tokenizer.json").read_bytes()
    assert (folder / "tokenizer.json").read_bytes() == shipped and judge.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([tokenizer.encode("And God said, Let there be light")])
    with torch.no_grad():
        logits = judge.model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()
    assert math.isfinite(json.loads((folder / "metrics.json").read_text())["val_ppl"])


# ---- the MDLM objective ----------------------------------------------------------------------------------------------
def test_loglinear_schedule_and_weight_are_mdlms():
    t = torch.tensor([1e-3, 0.25, 0.5, 0.999])
    assert torch.allclose(-torch.expm1(-loglinear_sigma(t)), (1 - 1e-3) * t)  # move chance
    assert torch.allclose(loglinear_dsigma(t), (1 - 1e-3) / (1 - (1 - 1e-3) * t))
    assert torch.allclose(nelbo_weight(t), 1 / t, rtol=1e-4)


def test_times_are_antithetic_and_masks_follow_them():
    g = torch.Generator().manual_seed(0)
    t = sample_times(8, g)
    assert ((t >= 1e-3) & (t < 1)).all()
    strata = ((t - 1e-3) / (1 - 1e-3) * 8).floor().long().sort().values
    assert strata.tolist() == list(range(8))  # one time per 1/B stratum
    x0 = torch.randint(0, 50, (2, 4000), generator=g)
    xt = mask_by_time(x0, torch.tensor([0.1, 0.9]), 99, g)
    rate = (xt == 99).float().mean(1)
    assert abs(rate[0] - 0.1) < 0.02 and abs(rate[1] - 0.9) < 0.02
    assert (xt[xt != 99] == x0[xt != 99]).all()


def test_fast_nelbo_sum_equals_the_subs_reference():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 9, (3, 12), generator=g)
    t = sample_times(3, g)
    xt = mask_by_time(x0, t, 9, g)
    logits = torch.randn(3, 12, 10, generator=g, requires_grad=True)
    reference = nelbo_per_token(logits, x0, xt, t, 9)
    assert (reference[xt != 9] == 0).all()
    manual = -subs_log_probs(logits, xt, 9).gather(-1, x0[..., None])[..., 0] / t[:, None]
    assert torch.allclose(reference, manual, rtol=1e-4)
    (grad_ref,) = torch.autograd.grad(reference.sum(), logits)
    fast = nelbo_sum(logits, x0, xt, t, 9)
    (grad_fast,) = torch.autograd.grad(fast, logits)
    assert torch.allclose(fast, reference.sum(), rtol=1e-5)
    assert torch.allclose(grad_fast, grad_ref, atol=1e-6)


def test_maskgit_decoder_samples_sequences():
    model = MDLM(MDLMConfig(vocab_size=20, model_length=16, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2))
    torch.nn.init.normal_(model.backbone.output_layer.linear.weight)  # a fresh output layer is all zeros
    out = sample_teacher(model, 3, steps=4, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 16) and ((out >= 0) & (out < model.mask_id)).all()


# ---- pretraining modules ---------------------------------------------------------------------------------------------
def _fast_dev_run(module, seq_len, tmp_path):
    data = TextCorpusDataModule(batch_size=2, seq_len=seq_len, max_documents=1, val_batch_size=2)
    trainer = pl.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    return trainer


def test_masked_text_module_fast_dev_run_and_export(tmp_path, tokenizer):
    torch.manual_seed(0)
    module = MaskedTextDiffusionModule(model_length=32, hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2)
    _fast_dev_run(module, 32, tmp_path)
    assert math.isfinite(module.last_validation["val_nelbo"])
    assert not (tmp_path / "text_teacher").exists()  # fast_dev_run exports nothing
    folder = module.export(tmp_path / "export")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the shipped files, byte for byte
        assert (folder / "tokenizer" / name).read_bytes() == (asset_path(TEXT_TOKENIZER_ASSET) / name).read_bytes()
    loaded = load_mdlm(folder, load_text_tokenizer(folder / "tokenizer"))
    assert loaded.config == module.config
    ids = torch.randint(0, len(tokenizer), (1, 32))
    expected = module.network.eval()(ids)
    assert torch.allclose(loaded(ids), expected, atol=2e-2)  # fp16 weights
    with pytest.raises(ValueError, match="seq_len"):
        module.nelbo_total(torch.zeros(1, 33, dtype=torch.long), torch.Generator())


def test_judge_module_fast_dev_run_and_export(tmp_path, tokenizer):
    torch.manual_seed(0)
    module = CausalJudgeModule(n_positions=32, n_embd=16, n_layer=1, n_head=2)
    _fast_dev_run(module, 32, tmp_path)
    assert math.isfinite(module.last_validation["val_ppl"])
    judge = load_judge(module.export(tmp_path / "export"))
    assert next(judge.model.parameters()).dtype == torch.float32 and judge.context_length == 32
    assert judge.tokenizer.decode(judge.tokenizer.encode("Amen.")) == "Amen."


# ---- the distillation config -----------------------------------------------------------------------------------------
def test_text_dimo_config_fast_dev_run_distills_the_shipped_teacher(tmp_path, monkeypatch):
    """`dimo fit --config configs/text/dimo.yaml` with fast_dev_run: the shipped teacher, judge and copy reference
    load through their ``asset:`` / ``kjv-train`` names and two iterations move the student off the teacher."""
    from pathlib import Path

    from dimo_lightning.commands.cli import main
    from dimo_lightning.evaluation.callbacks.text_monitor import TextMonitor

    seen = {}
    original = pl.Trainer.fit

    def recording_fit(self, model, *args, **kwargs):
        seen["trainer"], seen["module"] = self, model
        return original(self, model, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "fit", recording_fit)
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs/text/dimo.yaml"
    main(["fit", "--config", str(config), "--trainer.fast_dev_run=4", "--trainer.enable_progress_bar=false",
          "--data.init_args.batch_size=2"])
    module = seen["module"]
    assert module.generator_step == 2  # Lightning's max_steps counts both optimizers' steps: 4 = two iterations
    teacher = module.teacher.network
    assert teacher.config.hidden_dim == 128 and teacher.config.vocab_size == 4097 and module.teacher.seq_len == 128
    moved = [name for name, p in module.student.named_parameters()
             if not torch.equal(p, dict(teacher.named_parameters())[name])]
    assert moved  # the second generator update (the first has aux == teacher: a zero gradient) moved the student
    monitor = next(c for c in seen["trainer"].callbacks if isinstance(c, TextMonitor))
    assert monitor.scoring.judge.context_length == 256 and monitor.scoring.copy_reference.n == 8


def test_shipped_names_resolve_and_unknown_ones_are_named(tokenizer):
    from dimo_lightning.assets import resolve_asset
    from dimo_lightning.evaluation.text_reference import training_ngrams, validation_rows
    from dimo_lightning.evaluation.text_report import reference_text_rows, shared_copy_reference

    assert resolve_asset("asset:text_judge") == asset_path(TEXT_JUDGE_ASSET)
    assert str(resolve_asset("relative/folder")) == "relative/folder"
    with pytest.raises(FileNotFoundError, match=r"MDLMTeacher.checkpoint: no shipped asset 'text_jugde'.*text_judge"):
        resolve_asset("asset:text_jugde", "MDLMTeacher.checkpoint")
    # kjv-train is the training split's 8-grams; kjv-val the packed validation rows of the shipped reference row
    named = shared_copy_reference("kjv-train", tokenizer, 8)
    assert set(named.hashes.tolist()) == set(training_ngrams(tokenizer, 8).hashes.tolist())
    assert torch.equal(reference_text_rows("kjv-val", tokenizer, 128, 100), validation_rows(tokenizer, 128)[:100])
