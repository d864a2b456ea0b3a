"""PromptDataModule: prompt files (good and bad), generators, sharding across ranks, exact resume."""

from __future__ import annotations

import json
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dimo_lightning.data.batch import ConditionBatch
from dimo_lightning.data.prompt_files import PromptFile, load_prompts
from dimo_lightning.data.prompts import PromptDataModule, PromptStream

PROMPTS = [f"prompt number {i}" for i in range(10)]


def write_txt(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def write_jsonl(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    return str(path)


def generated_prompts():  # a generator source for load_prompts("tests.test_prompts:generated_prompts")
    return ["a", "b", "c"]


def test_txt_and_jsonl_files_read_lazily_and_identically(tmp_path):
    txt = PromptFile(write_txt(tmp_path / "p.txt", PROMPTS))
    jsonl = PromptFile(write_jsonl(tmp_path / "p.jsonl", PROMPTS))
    assert len(txt) == len(jsonl) == 10
    assert list(txt) == list(jsonl) == PROMPTS
    assert txt.take([7, 2, 7]) == [PROMPTS[7], PROMPTS[2], PROMPTS[7]]
    assert jsonl[3:5] == PROMPTS[3:5]
    unicode = PromptFile(write_txt(tmp_path / "u.txt", ["une étoile ✨", "x"]))
    assert unicode[0] == "une étoile ✨"
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"first\r\nsecond")  # Windows line ends, no final newline
    assert list(PromptFile(crlf)) == ["first", "second"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "", r"empty\.txt is empty"),
        ("blank.txt", "one\n\nthree\n", r"blank\.txt:2: blank line"),
        ("spaces.txt", "one\ntwo\n   \n", r"spaces\.txt:3: blank line"),
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": "b"\n', r"bad\.jsonl:2: not valid JSON"),
        ("nofield.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', r'nofield\.jsonl:2: expected an object with a "prompt"'),
        ("list.jsonl", '["a"]\n', r'list\.jsonl:1: expected an object with a "prompt"'),
        ("number.jsonl", '{"prompt": 3}\n', r'number\.jsonl:1: "prompt" must be a non-empty string'),
        ("bytes.txt", b"ok\n\xff\xfe\n", r"bytes\.txt:2: not UTF-8"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        PromptFile(path)


def test_missing_files_and_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train_prompts: prompt file not found: .*nope\.txt"):
        PromptDataModule(train_prompts=str(tmp_path / "nope.txt")).prompts("train")
    with pytest.raises(ValueError, match="neither a .txt/.jsonl prompt file nor"):
        load_prompts(str(tmp_path / "prompts.csv"))
    with pytest.raises(ValueError, match="cannot import prompt generator"):
        load_prompts("dimo_lightning.data.prompts:no_such_function")
    assert load_prompts("test_prompts:generated_prompts") == ["a", "b", "c"]
    with pytest.raises(ValueError, match="batch_size"):
        PromptDataModule(batch_size=0)


def test_stream_shards_ranks_into_disjoint_deterministic_passes(tmp_path):
    prompts = PromptFile(write_txt(tmp_path / "p.txt", [f"p{i}" for i in range(12)]))
    streams = [PromptStream(prompts, batch_size=3, batches_per_epoch=4, seed=5) for _ in range(2)]
    per_rank = []
    for rank, stream in enumerate(streams):
        with mock.patch("dimo_lightning.data.prompts._rank_and_world", return_value=(rank, 2)):
            per_rank.append([b for b in stream])
    # 2 ranks x 2 batches x 3 prompts = one pass of 12: the first two batches of the ranks are disjoint and cover it
    first_pass = [p for rank in per_rank for b in rank[:2] for p in b]
    assert sorted(first_pass) == sorted(prompts)
    second_pass = [p for rank in per_rank for b in rank[2:] for p in b]
    assert sorted(second_pass) == sorted(prompts) and second_pass != first_pass  # a new permutation per pass
    assert not set(per_rank[0][0]) & set(per_rank[1][0])
    # deterministic: a fresh stream repeats rank 1 exactly; another seed does not
    with mock.patch("dimo_lightning.data.prompts._rank_and_world", return_value=(1, 2)):
        assert list(PromptStream(prompts, 3, 4, seed=5)) == per_rank[1]
        assert list(PromptStream(prompts, 3, 4, seed=6)) != per_rank[1]
    # batches straddling passes: 12 prompts, batch 5 -> batch 2 of one rank spans passes 0 and 1
    stream = PromptStream(prompts, batch_size=5, batches_per_epoch=3, seed=0)
    flat = [p for b in stream for p in b]
    assert sorted(flat[:12]) == sorted(prompts) and len(flat) == 15
    ordered = PromptStream(prompts, batch_size=5, batches_per_epoch=1, seed=0, shuffle=False)
    assert next(iter(ordered)) == [f"p{i}" for i in range(5)]


def test_loader_state_resumes_the_stream(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    dm = PromptDataModule(train_prompts=path, eval_prompts=None, batch_size=4, batches_per_epoch=3, seed=1)
    loader = dm.train_dataloader()
    first = list(loader)
    second = list(loader)
    assert all(isinstance(b, ConditionBatch) and b.real is None for b in first)  # the training batch
    first, second = [b.conditions for b in first], [b.conditions for b in second]
    assert all(isinstance(b, list) and len(b) == 4 and isinstance(b[0], str) for b in first)
    assert first != second  # the stream continues across epochs
    fresh = PromptDataModule(train_prompts=path, eval_prompts=None, batch_size=4, batches_per_epoch=3,
                             seed=1).train_dataloader()
    fresh.load_state_dict(loader.state_dict())
    resumed = [b.conditions for b in fresh]
    again = PromptDataModule(train_prompts=path, eval_prompts=None, batch_size=4, batches_per_epoch=9, seed=1)
    assert [b.conditions for b in again.train_dataloader()][6:] == resumed


class RecordingModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(list(batch.conditions))
        return (self.weight - len(batch.conditions[0])) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_resume_from_a_lightning_checkpoint_is_exact(tmp_path):
    path = write_txt(tmp_path / "p.txt", PROMPTS)

    def run(max_steps, callbacks=(), ckpt_path=None, root="run"):
        module = RecordingModule()
        dm = PromptDataModule(train_prompts=path, eval_prompts=None, batch_size=3, batches_per_epoch=3, seed=2)
        trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks),
                             default_root_dir=tmp_path / root)
        trainer.fit(module, dm, ckpt_path=ckpt_path)
        return module.seen

    full = run(7, root="full")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    part = run(4, [ckpt], root="a")  # stops in the middle of the second epoch
    rest = run(7, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), root="b")
    assert part + rest == full


def test_evaluation_grid_and_predict_prompts(tmp_path):
    train = write_txt(tmp_path / "train.txt", PROMPTS)
    held_out = write_txt(tmp_path / "eval.txt", ["held out a", "held out b", "held out c"])
    dm = PromptDataModule(train_prompts=train, eval_prompts=held_out, batch_size=2, predict_samples=5)
    assert dm.evaluation_conditions(4) == ["held out a", "held out b", "held out c", "held out a"]
    assert dm.grid_conditions(2) == ["held out a", "held out b"] and len(dm.grid_conditions(10)) == 3
    assert list(dm.val_dataloader()) == [["held out a", "held out b"]]
    batches = list(dm.predict_dataloader())
    assert [b["conditions"] for b in batches] == [["held out a", "held out b"], ["held out c", "held out a"],
                                                  ["held out b"]]
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    listed = PromptDataModule(train_prompts=train, eval_prompts=held_out, predict_prompts=train, batch_size=4)
    assert [p for b in listed.predict_dataloader() for p in b["conditions"]] == PROMPTS


def test_predict_prompts_shard_across_ranks_in_order(tmp_path, monkeypatch):
    from dimo_lightning.data import labels as labels_module

    held_out = write_txt(tmp_path / "eval.txt", [f"prompt {i}" for i in range(7)])
    dm = PromptDataModule(train_prompts=held_out, eval_prompts=held_out, batch_size=3, predict_samples=10)
    per_rank = []
    for rank in range(2):
        monkeypatch.setattr(labels_module, "_rank_and_world", lambda rank=rank: (rank, 2))
        per_rank.append(list(dm.predict_dataloader()))
    assert len(per_rank[0]) == len(per_rank[1]) == 2  # 4 global batches; equal step counts on both ranks
    real = [b for batches in per_rank for b in batches if len(b["index"])]
    index = [i for b in real for i in b["index"].tolist()]
    assert index == list(range(10))  # each global sample once, rank 0 first
    assert [p for b in real for p in b["conditions"]] == [f"prompt {i % 7}" for i in range(10)]
