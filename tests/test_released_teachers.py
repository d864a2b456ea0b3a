"""The released text-to-image teachers (Meissonic, aMUSEd) from tiny random-weight folders in the published layouts:
strict loading and its errors, CLIP conditions, batched negative-prompt CFG, batched VQ decoding, the aMUSEd forward
against diffusers', `dimo fit` with configs/meissonic.yaml and configs/amused.yaml, and the diffusers export."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from fixtures.released_layouts import (
    AMUSED_256_TRANSFORMER,
    AMUSED_512_TRANSFORMER,
    TINY_VQ,
    save_random_released,
)
from safetensors.torch import load_file, save_file

from dimo_lightning.nn.amused import AmusedTransformer
from dimo_lightning.teachers.amused import AmusedTeacher
from dimo_lightning.teachers.meissonic import MEISSONIC_NEGATIVE_PROMPT, MeissonicTeacher

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red fox curled up asleep in fresh snow", "a lighthouse on a rocky coast", "a bowl of ramen"]


@pytest.fixture(scope="session")
def meissonic_folder(tmp_path_factory):
    return save_random_released(tmp_path_factory.mktemp("released") / "Meissonic", "meissonic-tiny", seed=0)


@pytest.fixture(scope="session")
def amused_folder(tmp_path_factory):
    return save_random_released(tmp_path_factory.mktemp("released") / "amused", "amused-tiny", seed=1)


@pytest.fixture(scope="session")
def meissonic_teacher(meissonic_folder):
    return MeissonicTeacher(str(meissonic_folder), resolution=8, decode_batch_size=2)


@pytest.fixture(scope="session")
def amused_teacher(amused_folder):
    return AmusedTeacher(str(amused_folder))


def test_meissonic_teacher_conditions_and_batched_negative_prompt_cfg(meissonic_teacher):
    teacher = meissonic_teacher
    assert (teacher.codebook_size, teacher.mask_id, teacher.logit_width, teacher.grid_shape) == (32, 32, 32, (4, 4))
    assert teacher.resolution == 8 and teacher.negative_prompt == MEISSONIC_NEGATIVE_PROMPT
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.text_encoder.training
    assert teacher.text_tokenizer.pad_token == "!"  # read from tokenizer/, as the released CLIP-H one pads
    cond = teacher.encode_condition(PROMPTS[:2])
    ids = teacher.text_tokenizer(PROMPTS[:2], padding="max_length", max_length=16, truncation=True,
                                 return_tensors="pt")["input_ids"]
    out = teacher.text_encoder(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(cond.hidden_states, out.hidden_states[-2])  # penultimate layer, no final LayerNorm
    torch.testing.assert_close(cond.pooled, out.text_embeds)
    assert cond.micro_conds.tolist() == [[8.0, 8.0, 0.0, 0.0, 6.0]] * 2  # [resolution, resolution, 0, 0, 6]

    codes = torch.randint(0, 33, (2, 16), generator=torch.Generator().manual_seed(0))
    batches = []
    hook = teacher.network.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        guided = teacher.guided_logits(teacher.network, codes, cond, 4.0)
    finally:
        hook.remove()
    assert batches == [4]  # one pass of 2B
    negative = teacher.encode_prompts([MEISSONIC_NEGATIVE_PROMPT])
    net = teacher.network
    conditional = net(codes, cond.hidden_states, cond.pooled, cond.micro_conds, 0.0)
    unconditional = net(codes, negative.hidden_states.expand(2, -1, -1), negative.pooled.expand(2, -1),
                        cond.micro_conds, 0.0)
    torch.testing.assert_close(guided, unconditional + 4.0 * (conditional - unconditional), atol=1e-5, rtol=1e-5)
    # multi-step MaskGIT decoding of the teacher (reports, `predict_with: teacher`) ends with codes only
    sampled = teacher.sample(cond, steps=3, cfg_scale=2.0, schedule="cosine",
                             generator=torch.Generator().manual_seed(2))
    assert sampled.shape == (2, 16) and 0 <= int(sampled.min()) and int(sampled.max()) < 32


def test_vq_decoding_is_chunked_and_matches_diffusers(meissonic_teacher, meissonic_folder):
    from diffusers import VQModel

    teacher = meissonic_teacher
    assert not hasattr(teacher.tokenizer.vq, "encoder")  # decode only
    codes = torch.randint(0, 32, (5, 16), generator=torch.Generator().manual_seed(1))
    calls = []
    hook = teacher.tokenizer.vq.decoder.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        images = teacher.decode(codes)
    finally:
        hook.remove()
    assert calls == [2, 2, 1]  # decode_batch_size 2
    assert images.shape == (5, 3, 8, 8) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    reference = VQModel.from_pretrained(str(meissonic_folder / "vqvae")).eval()
    with torch.no_grad():
        expected = reference.decode(codes.view(5, 4, 4), force_not_quantize=True, shape=(5, 4, 4, 4)).sample
    torch.testing.assert_close(images, expected.clamp(0, 1))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 31\]"):
        teacher.decode(torch.full((1, 16), 32))


def test_fp16_only_folder_loads_into_float32(tmp_path, meissonic_teacher):
    folder = save_random_released(tmp_path / "fp16", "meissonic-tiny", seed=0, fp16=True)
    assert not (folder / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    teacher = MeissonicTeacher(str(folder), resolution=8)
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    for ours, fp32 in ((teacher.network, meissonic_teacher.network),
                       (teacher.text_encoder, meissonic_teacher.text_encoder)):
        expected = {k: v.half().float() for k, v in fp32.state_dict().items()}
        assert all(torch.equal(v, expected[k]) for k, v in ours.state_dict().items())


def test_amused_forward_matches_diffusers_and_checkpointing_is_exact(amused_teacher):
    from diffusers import UVit2DModel

    teacher = amused_teacher
    net = teacher.network
    assert (teacher.codebook_size, teacher.mask_id, teacher.grid_shape, teacher.resolution) == (32, 32, (4, 4), 8)
    assert teacher.micro_conds == [8.0, 8.0, 0.0, 0.0, 6.0] and teacher.negative_prompt is None
    assert set(teacher.frozen_parameter_names()) == {n for n, _ in net.named_parameters()
                                                     if n.startswith(("embed.", "mlm_layer."))}
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 33, (2, 4, 4), generator=g)
    states, pooled = torch.randn(2, 16, 16, generator=g), torch.randn(2, 16, generator=g)
    micro = torch.tensor([[8.0, 8.0, 0.0, 0.0, 6.0], [512.0, 256.0, 3.0, 1.0, 5.0]])
    with torch.no_grad():
        ours = net(codes, states, pooled, micro)
        reference = UVit2DModel.forward(net, codes, states, pooled, micro)  # (B, K, h, w)
    torch.testing.assert_close(ours, reference.permute(0, 2, 3, 1).reshape(2, 16, 32))
    torch.testing.assert_close(net(codes.view(2, 16), states, pooled, micro), ours)

    student = copy.deepcopy(net).train().requires_grad_(True)
    outputs, grads = [], []
    for checkpointing in (False, True):
        student.gradient_checkpointing = checkpointing
        student.zero_grad()
        out = student(codes, states, pooled, micro, 0.0, 0.3, 1.0, torch.Generator().manual_seed(5))
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outputs[0], outputs[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
    assert not torch.allclose(outputs[0], ours)  # the embedding noise (sigma 0.3) changed the logits


def test_published_amused_configs_build_on_the_meta_device():
    # teachers.md 3.2: amused-256 603.5M parameters / 474 keys, amused-512 608.3M / 478 keys (diffusers-verified)
    published = ((AMUSED_256_TRANSFORMER, 474, 603_537_664), (AMUSED_512_TRANSFORMER, 478, 608_257_792))
    for config, keys, params in published:
        with torch.device("meta"):
            net = AmusedTransformer.from_config(config)
        assert len(net.state_dict()) == keys and sum(p.numel() for p in net.parameters()) == params
        assert (net.codebook_size, net.mask_id) == (8192, 8255)


def _copy(folder: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def test_broken_folders_fail_with_the_path_and_the_expected_layout(tmp_path, meissonic_folder, amused_folder):
    from diffusers import VQModel

    missing = _copy(meissonic_folder, tmp_path, "missing")
    shutil.rmtree(missing / "vqvae")
    with pytest.raises(FileNotFoundError, match=rf"{missing} lacks vqvae/: expected the published layout "
                                                r"transformer/, vqvae/, text_encoder/, tokenizer/ \(download "
                                                r"MeissonFlow/Meissonic\)"):
        MeissonicTeacher(str(missing), resolution=8)
    no_tokenizer = _copy(amused_folder, tmp_path, "no_tokenizer")
    shutil.rmtree(no_tokenizer / "tokenizer")
    with pytest.raises(FileNotFoundError, match="lacks tokenizer/.*amused/amused-256 or amused/amused-512"):
        AmusedTeacher(str(no_tokenizer))

    renamed = _copy(meissonic_folder, tmp_path, "renamed")
    weights = renamed / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["mlm_layer.conv_2.weight"] = state.pop("mlm_layer.conv2.weight")
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.safetensors does not match .*missing keys: "
                                         r"mlm_layer.conv2.weight.*unexpected keys: mlm_layer.conv_2.weight"):
        MeissonicTeacher(str(renamed), resolution=8)
    dropped = _copy(amused_folder, tmp_path, "dropped")
    weights = dropped / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state["encoder_proj.weight"]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"1 missing keys: encoder_proj.weight"):
        AmusedTeacher(str(dropped))

    for folder, build in ((meissonic_folder, lambda p: MeissonicTeacher(p, resolution=8)),
                          (amused_folder, AmusedTeacher)):
        other = _copy(folder, tmp_path, f"codebook_{folder.name}")
        shutil.rmtree(other / "vqvae")
        VQModel(**{**TINY_VQ, "num_vq_embeddings": 16}).save_pretrained(str(other / "vqvae"))
        with pytest.raises(ValueError, match=rf"codebook mismatch in {other}: vqvae/ has 16 codes .* expects "
                                             r"codebook_size=32"):
            build(str(other))

    with pytest.raises(ValueError, match="resolution must be a positive multiple of 4"):
        MeissonicTeacher(str(meissonic_folder), resolution=10)


def _fit(config: str, folder: Path, tmp_path: Path, *extra: str):
    from dimo_lightning.commands.cli import DiMOCLI

    return DiMOCLI(args=[
        "fit", "--config", str(ROOT / "configs" / config),
        f"--model.init_args.teacher.init_args.path={folder}",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--model.init_args.optim.max_generator_steps=2", "--model.init_args.optim.accumulate_micro_batches=2",
        "--data.init_args.batch_size=4", "--data.init_args.batches_per_epoch=2", *extra,
    ])


@pytest.mark.parametrize("kind", ["meissonic", "amused"])
def test_dimo_fit_with_the_released_config_then_export_as_a_diffusers_transformer(
    kind, tmp_path, meissonic_folder, amused_folder
):
    from dimo_lightning.commands.cli import main
    from dimo_lightning.inference.export import export_student
    from dimo_lightning.nn.meissonic import MeissonicTransformer

    if kind == "meissonic":
        folder = meissonic_folder
        cli = _fit("meissonic.yaml", folder, tmp_path, "--model.init_args.teacher.init_args.resolution=8",
                   "--model.init_args.teacher.init_args.micro_conds=[8, 8, 0, 0, 6.0]")
    else:
        folder = amused_folder
        cli = _fit("amused.yaml", folder, tmp_path)
    module, trainer = cli.model, cli.trainer
    teacher = module.teacher
    assert module.generator_step == 2 and trainer.precision == "bf16-mixed"
    assert module.student.gradient_checkpointing and module.aux.gradient_checkpointing
    teacher_state = {k: v.clone() for k, v in teacher.network.state_dict().items()}
    changed = {k for k, v in module.student.state_dict().items() if not torch.equal(v, teacher_state[k])}
    assert changed and not {k for k in changed if k.startswith(("embed.", "mlm_layer."))}

    codes = module.generate(teacher.encode_condition(PROMPTS))
    images = teacher.decode(codes)
    assert images.shape == (3, 3, 8, 8) and 0 <= float(images.min()) and float(images.max()) <= 1

    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    out = export_student(ckpt, tmp_path / "student", format="diffusers")
    record = json.loads((out / "dimo_student.json").read_text())
    assert record["weights_source"] == "ema" and record["sampling"]["r_init"] == 0.6
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["_class_name"] == ("Transformer2DModel" if kind == "meissonic" else "UVit2DModel")
    teacher_class = MeissonicTeacher if kind == "meissonic" else AmusedTeacher
    kwargs = {"resolution": 8} if kind == "meissonic" else {}
    reloaded = teacher_class(str(folder), transformer=str(out / "transformer"), **kwargs)
    ema = module.student_ema.state_dict()  # StudentEMA's average: exported by default
    assert reloaded.network.state_dict().keys() == ema.keys()
    assert all(torch.equal(v, ema[k].float()) for k, v in reloaded.network.state_dict().items())
    with pytest.raises(ValueError, match="cannot export .*last.ckpt.*export with --format diffusers"):
        export_student(ckpt, tmp_path / "plain")  # the dimo format is for class-conditional students
    main(["export", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "cli"), "--format", "diffusers", "--ema",
          "false"])  # the `dimo export` command line
    raw = MeissonicTransformer.from_pretrained(tmp_path / "cli" / "transformer") if kind == "meissonic" else (
        AmusedTransformer.from_pretrained(str(tmp_path / "cli" / "transformer")))
    student = module.student.state_dict()
    assert all(torch.equal(v, student[k].float()) for k, v in raw.state_dict().items())


def test_gpu_meissonic_script_dry_run(tmp_path, meissonic_folder):
    spec = importlib.util.spec_from_file_location("gpu_meissonic", ROOT / "scripts" / "gpu_meissonic.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.run(script.parse_args(["--tiny", "--accelerator", "cpu", "--out", str(tmp_path / "out"),
                                           "--folder", str(meissonic_folder), "--iterations", "1", "--warmup", "0"]))
    assert result["iterations"] == 1 and result["iterations_per_second"] > 0 and result["image_shape"] == [2, 3, 8, 8]
    assert json.loads((tmp_path / "out" / "result.json").read_text()) == result
    assert (tmp_path / "out" / "samples.png").is_file()


def test_fsdp_shards_each_block_of_the_released_networks(tmp_path, meissonic_teacher, amused_teacher):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from dimo_lightning.training.distributed import is_sharded, shard_network, shard_units

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    for teacher, blocks in ((meissonic_teacher, 2), (amused_teacher, 1)):  # 1 dual + 1 single; 1 transformer layer
        network = copy.deepcopy(teacher.network).requires_grad_(True)
        codes = torch.randint(0, 33, (2, 16), generator=torch.Generator().manual_seed(0))
        cond = teacher.encode_condition(PROMPTS[:2])
        args = (codes, cond.hidden_states, cond.pooled, cond.micro_conds)
        expected = network(*args).detach()
        units = shard_units(network)
        assert len(units) == blocks
        shard_network(network, mesh)
        assert all(is_sharded(u) for u in units) and is_sharded(network)
        torch.testing.assert_close(network(*args), expected)


@pytest.mark.parametrize("config", ["meissonic.yaml", "amused.yaml"])
def test_released_configs_combine_with_the_strategy_fragments(config):
    from dimo_lightning.commands.cli import DiMOCLI

    class ParseOnly(DiMOCLI):
        def instantiate_classes(self) -> None:
            pass

    for fragment, strategy in (("ddp.yaml", "ddp_find_unused_parameters_true"), ("fsdp.yaml", "ModelParallelStrategy")):
        cli = ParseOnly(args=["--config", str(ROOT / "configs" / config), "--config",
                              str(ROOT / "configs" / "strategy" / fragment)], run=False)
        assert strategy in str(cli.config.trainer.strategy) and cli.config.trainer.precision == "bf16-mixed"
        assert cli.config.model.init_args.teacher.init_args.gradient_checkpointing is True
