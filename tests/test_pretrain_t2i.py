"""Text-to-image teacher pretraining: word tokenizer, joint training, export in the layout PromptTeacher loads."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch

from dimo_lightning.commands.cli import main
from dimo_lightning.data.captions import caption_vocabulary, split_captions
from dimo_lightning.pretraining.text_to_image import (
    CaptionedMNISTDataModule,
    TextMaskedDiffusionModule,
    build_word_tokenizer,
)
from dimo_lightning.teachers.prompt import PromptTeacher

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(attention_head_dim=8, num_attention_heads=2, num_layers=1, num_single_layers=1, text_hidden_size=16,
            text_layers=2, text_heads=2, max_length=16)


def test_word_tokenizer_covers_every_caption():
    tok = build_word_tokenizer(caption_vocabulary())
    unk = tok.convert_tokens_to_ids("[UNK]")
    for caption in split_captions("val")[:300]:
        ids = tok(caption)["input_ids"]
        assert unk not in ids and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) <= 16, caption
    assert tok.convert_ids_to_tokens(tok("A left-leaning, BOLD 7")["input_ids"]) == [
        "[BOS]", "a", "left", "leaning", "bold", "7", "[EOS]"]
    assert tok("")["input_ids"] == [tok.bos_token_id, tok.eos_token_id]


def test_joint_training_and_export_load_as_a_prompt_teacher(tmp_path):
    module = TextMaskedDiffusionModule(**TINY, export_dir="teacher")
    before = {k: v.clone() for k, v in module.text_encoder.state_dict().items()}
    dm = CaptionedMNISTDataModule(batch_size=8, captions_per_digit=2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(module, dm)
    assert any(not torch.equal(v, before[k]) for k, v in module.text_encoder.state_dict().items())  # trained jointly
    folder = tmp_path / "teacher"
    assert sorted(p.name for p in folder.iterdir()) == ["codebook.safetensors", "text_encoder", "tokenizer",
                                                         "transformer"]
    teacher = PromptTeacher(str(folder))
    prompts = ["a bold seven leaning right", "thin upright 3", ""]
    cond = teacher.encode_condition(prompts)
    module.eval()
    with torch.no_grad():
        states, pooled = module.encode(prompts)
        codes = torch.randint(0, 257, (3, 49))
        torch.testing.assert_close(cond.hidden_states, states)
        torch.testing.assert_close(cond.pooled, pooled)
        torch.testing.assert_close(teacher(codes, cond), module.network(codes, states, pooled))
    assert teacher.decode(teacher.sample(cond, steps=2)).shape == (3, 1, 28, 28)


def test_t2i_teacher_config_fast_dev_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs/mnist/t2i_teacher.yaml"), "--trainer.fast_dev_run=2",
          "--data.init_args.batch_size=8", "--trainer.enable_progress_bar=false"])
