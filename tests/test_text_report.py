"""The text side of evaluation and inference, on a tiny random MDLM behind a stand-in sequence teacher: the report's
numbers against a direct computation with evaluation.metrics.text, sharding (2 simulated ranks = 1 rank), the
monitor during fit, TensorBoard text, the jsonl prediction shards, export / load_student / dimo sample of a text
student, and the modality checks of every evaluation callback.

The stand-in implements the members of the sequence-teacher contract these parts use (modality, text_tokenizer,
encode_condition -> a prefix condition, fix_positions, split_text, decode_text, sample(cond, steps, ...), decode
refusing); the real SequenceTeacher replaces it at the merge.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from fixtures.text_layouts import SENTENCES, save_gpt2_style_tokenizer, save_tiny_mdlm
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from dimo_lightning.core.conditions import PrefixCondition
from dimo_lightning.core.seeding import SAMPLE_SEED_MODULUS, derive_seed
from dimo_lightning.core.sharding import batch_spans
from dimo_lightning.data.batch import ConditionBatch
from dimo_lightning.evaluation.callbacks.evaluation_report import EvaluationReport
from dimo_lightning.evaluation.callbacks.fid_monitor import FIDMonitor
from dimo_lightning.evaluation.callbacks.sample_grid import SampleGrid
from dimo_lightning.evaluation.callbacks.text_evaluation_report import TextEvaluationReport
from dimo_lightning.evaluation.callbacks.text_monitor import TextMonitor
from dimo_lightning.evaluation.metrics.text import ReferenceNgrams, TextMetricAccumulator, load_judge
from dimo_lightning.evaluation.text_report import (
    TextScoring,
    describe_samples,
    reference_text_rows,
    score_rank_texts,
    teacher_sample_settings,
    text_row,
)
from dimo_lightning.inference.export import export_student, load_student
from dimo_lightning.inference.pipeline import OneStepPipeline
from dimo_lightning.inference.text_pipeline import TextPipeline
from dimo_lightning.inference.text_writer import TextSampleWriter, iter_text_predictions, write_text_prediction_index
from dimo_lightning.nn.mdlm import load_mdlm
from dimo_lightning.teachers.base import MaskedTeacher
from dimo_lightning.teachers.sequence import noisy_input_embeddings
from dimo_lightning.tokenizers.text import encode_texts
from dimo_lightning.training.module import DiMOModule

SEQ_LEN = 16  # the tiny MDLM's model_length
PROMPTS = ["The quick brown", "Tokens are"]


# ---------------------------------------------------------------- the stand-in sequence teacher


class StandInTextTeacher(MaskedTeacher):
    """A tiny MDLM as a sequence teacher (the contract members the text report, writer and export use)."""

    modality = "text"

    def __init__(self, folder: str, tokenizer: str) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.text_tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        self.network = load_mdlm(folder, self.text_tokenizer)
        self.tokenizer = None

    @property
    def codebook_size(self) -> int:
        return self.network.vocab_size - 1

    @property
    def mask_id(self) -> int:
        return self.network.mask_id

    @property
    def logit_width(self) -> int:
        return self.codebook_size

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (1, SEQ_LEN)

    def encode_condition(self, batch):
        if isinstance(batch, torch.Tensor):
            tokens = torch.full((len(batch), SEQ_LEN), self.mask_id, dtype=torch.long)
            return PrefixCondition(tokens, torch.zeros_like(tokens, dtype=torch.bool))
        ids = encode_texts(self.text_tokenizer, list(batch))
        tokens = torch.full((len(ids), SEQ_LEN), self.mask_id, dtype=torch.long)
        fixed = torch.zeros_like(tokens, dtype=torch.bool)
        for row, prompt_ids in enumerate(ids):
            tokens[row, :len(prompt_ids)] = torch.tensor(prompt_ids)
            fixed[row, :len(prompt_ids)] = True
        return PrefixCondition(tokens, fixed)

    def condition_batch_size(self, cond) -> int:
        return cond.batch_size

    def repeat_condition(self, cond, repeats: int):
        return cond.repeat(repeats)

    def fix_positions(self, codes, cond):
        return torch.where(cond.fixed.to(codes.device), cond.tokens.to(codes.device), codes)

    def apply_network(self, network, codes, cond, drop_condition=None, emb_noise_sigma=0.0, emb_noise_scale=1.0,
                      generator=None):
        codes = self.fix_positions(codes, cond)
        embeds = noisy_input_embeddings(network, codes, cond, emb_noise_sigma, emb_noise_scale, generator)
        logits = network(input_ids=codes) if embeds is None else network(inputs_embeds=embeds)
        return logits[..., : self.codebook_size]

    def embedding_rms(self, network=None) -> float:
        return float((self.network if network is None else network).token_embeddings().pow(2).mean().sqrt())

    def decode(self, codes):
        raise ValueError("a sequence teacher decodes to text: decode_text / split_text")

    def decode_text(self, codes):
        return self.text_tokenizer.batch_decode(codes.tolist(), skip_special_tokens=False)

    def split_text(self, codes, cond):
        decode = self.text_tokenizer.decode
        return [(decode(row[keep].tolist()), decode(row[~keep].tolist()))
                for row, keep in zip(codes.cpu(), cond.fixed.cpu())]

    @torch.no_grad()
    def sample(self, cond, steps=8, generator=None, softmax_temperature=1.0):
        """Reveal about 1/(steps - s) of the masked positions at step s, tokens drawn from the softmax over K."""
        b = cond.batch_size
        x = self.fix_positions(torch.full((b, SEQ_LEN), self.mask_id, dtype=torch.long), cond)
        for s in range(steps):
            masked = x == self.mask_id
            logits = self.apply_network(self.network, x, cond)[..., : self.codebook_size].float()
            probs = torch.softmax(logits / softmax_temperature, -1)
            drawn = torch.multinomial(probs.reshape(-1, self.codebook_size), 1, generator=generator).view(b, -1)
            scores = torch.rand(x.shape, generator=generator).masked_fill(~masked, -1.0)
            reveal = masked.sum(1, keepdim=True) // (steps - s)
            rank = scores.argsort(1, descending=True).argsort(1)
            x = torch.where(masked & (rank < reveal), drawn, x)
        return x


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """The tiny MDLM + its tokenizer, a judge (a random 1-layer GPT-2 over the same tokenizer), and text files."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("text")
    mdlm, tokenizer_dir = save_tiny_mdlm(root)
    judge_dir = root / "judge"
    tokenizer = save_gpt2_style_tokenizer(judge_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=24, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).eval().save_pretrained(judge_dir)
    corpus = root / "train.txt"
    corpus.write_text("\n".join(SENTENCES[:4]) + "\n")
    held_out = root / "val.txt"
    held_out.write_text("\n".join(SENTENCES * 3) + "\n")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return SimpleNamespace(mdlm=str(mdlm), tokenizer=str(tokenizer_dir), judge=str(judge_dir), corpus=str(corpus),
                           held_out=str(held_out), prompts=str(prompts))


@pytest.fixture
def text_teacher(text_files):
    return StandInTextTeacher(text_files.mdlm, text_files.tokenizer)


def text_trainer(tmp_path, callbacks, **kwargs):
    return pl.Trainer(accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="run"), enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
                      default_root_dir=tmp_path, **kwargs)


def index_loader(count: int, batch_size: int = 4) -> DataLoader:
    return DataLoader(torch.arange(count), batch_size=batch_size,
                      collate_fn=lambda rows: ConditionBatch(torch.stack(rows)))


def tensorboard_tags(directory: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in directory.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0})
        accumulator.Reload()
        tags |= set(accumulator.Tags()["tensors"])
    return tags


def direct_metrics(scoring: TextScoring, batches) -> dict:
    """evaluation.metrics.text on (codes, cond) batches, the documented way: generated ids, prompt + completion."""
    accumulator = TextMetricAccumulator(scoring.judge, scoring.copy_reference, scoring.distinct_orders,
                                        scoring.subset_size, scoring.bleu_order)
    for teacher, codes, cond in batches:
        tokens = [row[~keep] for row, keep in zip(codes.numpy(), cond.fixed.numpy())]
        accumulator.update(tokens, [p + c for p, c in teacher.split_text(codes, cond)])
    return accumulator.compute()


def assert_same_metrics(row: dict, direct: dict) -> None:
    for name, value in direct.items():
        if value is None:
            assert row[name] is None, name
        else:
            assert row[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


# ---------------------------------------------------------------- the report


def test_report_numbers_equal_a_direct_computation(text_teacher, text_files, tmp_path):
    report = TextEvaluationReport(num_samples=8, teacher_steps=[1, 3], batch_size=3, judge=text_files.judge,
                                  copy_reference=text_files.corpus, copy_n=3, reference_text=text_files.held_out,
                                  subset_size=6, num_text_samples=3, prompts=text_files.prompts)
    module = DiMOModule(text_teacher, run={"seed": 0}, student={"emb_noise_sigma": 0.2})
    text_trainer(tmp_path, [report]).validate(module, index_loader(4))
    run_dir = tmp_path / "run" / "version_0"
    payload = json.loads((run_dir / "eval.json").read_text())
    rows = {(r["model"], r["steps"]): r for r in payload["rows"]}
    assert list(rows) == [("teacher", 1), ("teacher", 3), ("student", 1), ("reference", None)]
    # the module's teacher sampling settings, restricted to what the teacher's sample takes
    assert payload["teacher_sampling"] == {"softmax_temperature": 1.0} and payload["conditions"] == "prompts"

    conditions = [PROMPTS[i % 2] for i in range(8)]
    pipeline = OneStepPipeline.from_teacher(text_teacher, module.student, module.sampling_defaults())
    for (model, steps), row in rows.items():
        assert row["samples"] == 8
        assert row["gen_ppl"] > 1 and 0 <= row["copy_rate"] <= 1 and row["self_bleu"] is not None
        if model == "reference":
            tokens = reference_text_rows(text_files.held_out, text_teacher.text_tokenizer, SEQ_LEN, 8)
            accumulator = TextMetricAccumulator(report.scoring.judge, report.scoring.copy_reference, subset_size=6)
            accumulator.update(tokens, text_teacher.decode_text(tokens))
            assert_same_metrics(row, accumulator.compute())
            assert row["tokens_per_s"] is None
            continue
        assert row["tokens_per_s"] > 0
        batches = []
        for i, (start, stop) in enumerate(batch_spans(8, 3)):
            generator = torch.Generator().manual_seed(derive_seed(0, rank=i, modulus=SAMPLE_SEED_MODULUS))
            cond = text_teacher.encode_condition(conditions[start:stop])
            if model == "teacher":
                codes = text_teacher.sample(cond, steps=steps, generator=generator)
            else:
                codes = text_teacher.fix_positions(pipeline.sample_codes(cond=cond, generator=generator), cond)
            assert (codes[cond.fixed] == cond.tokens[cond.fixed]).all()  # the prompt kept
            batches.append((text_teacher, codes, cond))
        assert_same_metrics(row, direct_metrics(report.scoring, batches))
    # the first texts of each row, on disk and in TensorBoard; the Markdown table
    for label in ("teacher_1", "teacher_3", "student_1", "reference"):
        text = (run_dir / f"samples_{label}.txt").read_text()
        assert text.count("=== sample") == 3, label
    assert "[prompt] The quick brown" in (run_dir / "samples_student_1.txt").read_text()
    assert {"text/teacher_1/text_summary", "text/student_1/text_summary"} <= tensorboard_tags(run_dir)
    assert "| student | 1 |" in (run_dir / "eval.md").read_text()


def test_two_simulated_ranks_equal_one(text_teacher, text_files):
    """Each rank scores its own batches; the sums of ranks 0 and 1 (replayed through the two reductions) give the
    one-rank numbers, Self-BLEU included (rank 0 holds the subset)."""
    scoring = TextScoring(text_files.judge, copy_reference=text_files.corpus, copy_n=3, subset_size=4)
    scoring.load(text_teacher.text_tokenizer, torch.device("cpu"))
    settings = {"softmax_temperature": 0.8}

    def sample(batch, generator):
        cond = text_teacher.encode_condition(batch)
        return text_teacher.sample(cond, steps=3, generator=generator, **settings), cond

    def describe(codes, cond):
        return describe_samples(text_teacher, codes, cond)

    conditions = torch.arange(9)

    def part(rank, world):
        return score_rank_texts(sample, describe, conditions, scoring.accumulator(), 4, 7, rank, world, "cpu", 2)

    one = text_row("teacher", 3, part(0, 1), lambda t, op: t, 0, 1)
    parts = [part(0, 2), part(1, 2)]
    assert [p.tokens for p in parts] == [4 * SEQ_LEN, 5 * SEQ_LEN]  # rank 0: batch 0; rank 1: batches 1, 2
    assert [i for i, _, _ in parts[0].examples + parts[1].examples] == [0, 1, 4, 5]
    sent = {0: [], 1: []}
    for rank in (0, 1):
        text_row("teacher", 3, parts[rank], lambda t, op, r=rank: sent[r].append(t) or t, rank, 2)
    summed = [a + b for a, b in zip(sent[0], sent[1])]  # what the strategy's sum-reduction returns
    rows = []
    for rank in (0, 1):
        replay = iter(summed)
        rows.append(text_row("teacher", 3, parts[rank], lambda t, op: next(replay), rank, 2))
    assert rows[0].metrics == rows[1].metrics
    assert rows[0].metrics == pytest.approx(one.metrics, rel=1e-12)
    assert rows[0].metrics["self_bleu"] is not None and rows[0].metrics["gen_ppl"] is not None
    assert rows[0].tokens_per_s > 0 and rows[0].tokens_per_s == rows[1].tokens_per_s


def test_monitor_and_report_during_fit(text_teacher, text_files, tmp_path):
    monitor = TextMonitor(every_n_generator_steps=1, num_samples=6, batch_size=3, judge=text_files.judge,
                          subset_size=4, num_text_samples=2)
    report = TextEvaluationReport(num_samples=4, teacher_steps=[2], batch_size=4)
    module = DiMOModule(text_teacher, optim={"max_generator_steps": 2}, run={"seed": 0}, targets={"cfg_scale": 1.0})
    trainer = text_trainer(tmp_path, [monitor, report], max_epochs=-1, log_every_n_steps=1)
    trainer.fit(module, index_loader(64))
    assert monitor.evaluations == 2
    metrics = trainer.callback_metrics
    for name in ("val/gen_ppl", "val/entropy", "val/distinct_2", "val/self_bleu", "val/tokens_per_s"):
        assert name in metrics and torch.isfinite(metrics[name]), name
    assert "val/copy_rate" not in metrics  # no copy reference
    assert float(metrics["val/entropy"]) == pytest.approx(monitor.last_row.metrics["entropy"])
    run_dir = tmp_path / "run" / "version_0"
    assert "text/student/text_summary" in tensorboard_tags(run_dir)
    assert [(r.model, r.steps) for r in report.rows] == [("teacher", 2), ("student", 1)]
    assert report.rows[0].metrics["gen_ppl"] is None  # no judge: not measured
    assert (run_dir / "samples_student_1.txt").is_file()


def test_teacher_sampling_overrides_are_checked(text_teacher):
    module = DiMOModule(text_teacher, run={"seed": 0})
    assert teacher_sample_settings(module, {"softmax_temperature": 0.7}) == {"softmax_temperature": 0.7}
    with pytest.raises(ValueError, match="takes no choice_temperature"):
        teacher_sample_settings(module, {"choice_temperature": 3.0}, "TextEvaluationReport.teacher_sampling")


def test_image_and_text_callbacks_refuse_the_other_modality(text_teacher, tiny_teacher):
    image, text = SimpleNamespace(teacher=tiny_teacher), SimpleNamespace(teacher=text_teacher)
    for callback in (TextEvaluationReport(), TextMonitor()):
        with pytest.raises(ValueError, match="evaluates text teachers.*MNISTTeacher has modality 'image'"):
            callback.setup(None, image, "fit")
    for callback in (EvaluationReport(), FIDMonitor(), SampleGrid()):
        with pytest.raises(ValueError, match="evaluates image teachers.*StandInTextTeacher has modality 'text'"):
            callback.setup(None, text, "fit")
    with pytest.raises(ValueError, match="SampleWriter"):
        TextSampleWriter().setup(None, image, "predict")


# ---------------------------------------------------------------- dimo predict


class PredictModule(pl.LightningModule):
    """What DiMOModule.predict_step returns for a sequence teacher: token rows, the raw conditions, the indices."""

    def __init__(self, teacher) -> None:
        super().__init__()
        self.teacher = teacher

    def predict_step(self, batch, batch_idx):
        cond = self.teacher.encode_condition(batch["conditions"])
        generator = torch.Generator().manual_seed(batch_idx)
        codes = self.teacher.sample(cond, steps=2, generator=generator)
        return {"codes": codes, "labels": batch["conditions"], "index": batch["index"]}


def test_jsonl_shards_hold_every_index_once(text_teacher, tmp_path):
    prompts = [PROMPTS[i % 2] for i in range(11)]
    batches = [{"conditions": prompts[s:e], "index": torch.arange(s, e)} for s, e in batch_spans(11, 3)]
    batches.append({"conditions": prompts[:3], "index": torch.arange(0)})  # a padding batch writes nothing
    writer = TextSampleWriter(shard_size=5)
    predictions = text_trainer(tmp_path, [writer]).predict(PredictModule(text_teacher),
                                                           DataLoader(batches, batch_size=None))
    index = json.loads((writer.path / "index.json").read_text())
    assert writer.path == tmp_path / "run" / "version_0" / "predictions"
    assert index["count"] == 11 and index["format"] == "jsonl" and index["conditions"] == "prompts"
    assert [(s["first"], s["count"]) for s in index["shards"]] == [(0, 6), (6, 5)]  # flushed at >= 5 samples
    records = list(iter_text_predictions(writer.path))
    assert [r["index"] for r in records] == list(range(11)) and [r["prompt"] for r in records] == prompts
    assert all(isinstance(r["text"], str) and r["text"] for r in records)
    assert all("codes" not in p for p in predictions)  # the token rows are not kept
    # two ranks' shards in one folder: every index once, else a clear error
    folder = tmp_path / "two"
    folder.mkdir()
    for first, count in ((0, 4), (4, 3)):  # rank 0, rank 1
        lines = [json.dumps({"index": i, "prompt": "", "text": f"t{i}"}) for i in range(first, first + count)]
        (folder / f"texts_{first:08d}.jsonl").write_text("\n".join(lines) + "\n")
    assert write_text_prediction_index(folder)["count"] == 7
    (folder / "texts_00000003.jsonl").write_text(json.dumps({"index": 3, "prompt": "", "text": "again"}) + "\n")
    with pytest.raises(ValueError, match="missing or written twice"):
        write_text_prediction_index(folder)


# ---------------------------------------------------------------- export, load_student, dimo sample


def test_text_student_export_load_and_sample(text_teacher, text_files, tmp_path, capsys):
    from dimo_lightning.commands.sample import sample_command

    module = DiMOModule(text_teacher, run={"seed": 0}, student={"emb_noise_sigma": 0.3})
    with torch.no_grad():  # a student that differs from the teacher
        for p in module.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer = text_trainer(tmp_path, [])
    trainer.validate(module, index_loader(4))
    ckpt = tmp_path / "student.ckpt"
    trainer.save_checkpoint(ckpt)
    out = export_student(ckpt, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["conditioning"]["type"] == "text" and config["network"]["layout"] == "mdlm"
    assert config["sampling"]["emb_noise_sigma"] == 0.3
    # the network folder is an MDLM release: it loads strictly, with the student's weights
    released = load_mdlm(out / "network")
    for (name, a), b in zip(released.state_dict().items(), module.student.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="--format dimo"):
        export_student(ckpt, tmp_path / "diffusers", format="diffusers")

    pipeline = load_student(out)
    assert isinstance(pipeline, TextPipeline) and pipeline.conditioning_type == "text"
    live = OneStepPipeline.from_teacher(text_teacher, module.student, module.sampling_defaults())
    cond = text_teacher.encode_condition(PROMPTS)
    expected = text_teacher.fix_positions(live.sample_codes(cond=cond, generator=torch.Generator().manual_seed(5)),
                                          cond)
    texts = pipeline(PROMPTS, seed=5)  # the same codes as the live student: prompt + completion
    assert texts == [p + c for p, c in text_teacher.split_text(expected, cond)]
    assert all(t.startswith(p) for t, p in zip(texts, PROMPTS))
    assert len(pipeline(3, seed=1)) == 3 and pipeline(3, seed=1) == pipeline(3, seed=1)
    with pytest.raises(ValueError, match="at most 15"):
        pipeline(" ".join(["fox"] * 40))

    sample_command(str(out), prompt="The quick brown", num=2, output=str(tmp_path / "samples"), batch_size=1)
    lines = (tmp_path / "samples" / "samples.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["index"], r["prompt"]) for r in records] == [(0, "The quick brown"), (1, "The quick brown")]
    assert "=== sample 1 ===\nThe quick brown" in capsys.readouterr().out
    sample_command(str(out), num=3, output=str(tmp_path / "unconditional"))
    records = [json.loads(line) for line in (tmp_path / "unconditional" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["", "", ""]
    with pytest.raises(ValueError, match="--labels: .* is a text student"):
        sample_command(str(out), labels="0,1")


def test_reference_rows_cut_the_text_as_documented(text_teacher, text_files):
    tokenizer = text_teacher.text_tokenizer
    rows = reference_text_rows(text_files.held_out, tokenizer, SEQ_LEN, 100)
    stream = []
    for line in (SENTENCES * 3):
        stream += tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert rows.tolist() == np.asarray(stream[: len(rows) * SEQ_LEN]).reshape(-1, SEQ_LEN).tolist()
    assert len(rows) == len(stream) // SEQ_LEN
    assert reference_text_rows(text_files.held_out, tokenizer, SEQ_LEN, 3).shape == (3, SEQ_LEN)
    reference = ReferenceNgrams.from_sequences([tokenizer(s, add_special_tokens=False)["input_ids"]
                                                for s in SENTENCES[:4]], 3)
    path = Path(text_files.corpus).with_suffix(".npz")
    reference.save(path)
    scoring = TextScoring(copy_reference=str(path))
    scoring.load(tokenizer, torch.device("cpu"))
    assert np.array_equal(scoring.copy_reference.hashes, reference.hashes) and scoring.copy_reference.n == 3
    assert load_judge(text_files.judge).context_length == 24
    assert isinstance(text_teacher.network, nn.Module)


def test_llada_student_network_round_trips_in_the_released_layout(tmp_path):
    from fixtures.text_layouts import save_tiny_llada

    from dimo_lightning.inference.text_export import (
        export_text_network,
        load_text_network,
        load_text_tokenizer,
        text_network_record,
    )
    from dimo_lightning.nn.llada import load_llada

    folder = save_tiny_llada(tmp_path / "llada")
    tokenizer = load_text_tokenizer(folder)  # LLaDA's folder names remote code: the fast-tokenizer fallback
    network = load_llada(folder, tokenizer, dtype=torch.float32)
    record = text_network_record(network)
    assert record["layout"] == "llada"
    entry = export_text_network(record, network.state_dict(), tmp_path / "out")
    assert entry == {"layout": "llada", "folder": "network", "dtype": "float32"}
    loaded = load_text_network(entry, tmp_path / "out", tokenizer)
    for (name, a), b in zip(loaded.state_dict().items(), network.state_dict().values()):
        assert torch.equal(a, b), name
    assert load_llada(tmp_path / "out" / "network", tokenizer, dtype=torch.float32) is not None
