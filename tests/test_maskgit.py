"""MaskGITTeacher: released key layout (full size on meta), loading of tiny checkpoints saved in the released file
layouts, numerics against the original network, and the loader's errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_vqgan, write_vqgan_folder
from torch import nn

from dimo_lightning.nn.transformer import MaskTransformer, PackedSelfAttention, count_parameters
from dimo_lightning.teachers.maskgit import MaskGITTeacher
from dimo_lightning.tokenizers.vqgan import VQGANTokenizer

torch.set_num_threads(1)

# Tiny transformer: 4x4 tokens (64 px through a stride-16 VQGAN), 16 codes, 10 classes.
NET = dict(hidden_dim=32, depth=2, heads=4, mlp_dim=64, dropout=0.1, codebook_size=16, num_classes=10)
# Tiny five-level VQGAN: stride 16 like the real one, attention at the lowest level (4 px of 64).
VQ = dict(
    embed_dim=8, n_embed=16, z_channels=8, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 1, 1, 2],
    num_res_blocks=1, attn_resolutions=[4], dropout=0.0,
)
RES = 64


# ---- full size, meta device --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("grid", "params"), [(16, 174_160_874), (32, 176_306_666)], ids=["ImageNet_256", "ImageNet_512"]
)
def test_full_size_layout_on_meta(grid: int, params: int) -> None:
    with torch.device("meta"):
        net = MaskTransformer(grid_size=grid, heads=16)
    state = net.state_dict()
    assert len(state) == 305
    assert count_parameters(net) == params
    n = grid * grid + 1
    assert list(state["tok_emb.weight"].shape) == [2026, 768]
    assert list(state["pos_emb"].shape) == [1, n, 768]
    assert list(state["bias"].shape) == [n, 2026]
    assert list(state["transformer.layers.0.0.fn.mha.in_proj_weight"].shape) == [2304, 768]
    assert list(state["transformer.layers.23.1.fn.net.3.weight"].shape) == [768, 3072]
    assert "last_layer.4.weight" in state and "first_layer.6.bias" in state


def test_attention_equals_torch_multihead_attention() -> None:
    torch.manual_seed(0)
    ours = PackedSelfAttention(dim=32, heads=4, dropout=0.1).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    reference = nn.MultiheadAttention(32, 4, dropout=0.1, bias=True, batch_first=True).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)  # in_proj_weight, in_proj_bias, out_proj.{weight,bias}
    x = torch.randn(3, 17, 32)
    expected, _ = reference(x, x, x, need_weights=False)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


# ---- tiny checkpoints in the released layouts --------------------------------------------------------------------
def tiny_network(seed: int = 0) -> MaskTransformer:
    torch.manual_seed(seed)
    net = MaskTransformer(grid_size=RES // 16, **NET)
    with torch.no_grad():  # untrained init has zero biases; make every tensor matter
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def write_maskgit_pth(net: MaskTransformer, path: Path, prefix: str = "") -> Path:
    """Save like MaskGIT v1.0: {iter, global_epoch, model_state_dict, optimizer_state_dict}."""
    work = copy.deepcopy(net).train()
    opt = torch.optim.Adam(work.parameters(), lr=1e-4, betas=(0.9, 0.96))
    codes = torch.randint(0, NET["codebook_size"] + 1, (2, work.seq_len))
    work(codes, torch.tensor([1, 2])).logsumexp(-1).mean().backward()
    opt.step()
    state = {prefix + k: v for k, v in net.state_dict().items()}
    torch.save(
        {"iter": 123, "global_epoch": 4, "model_state_dict": state, "optimizer_state_dict": opt.state_dict()}, path
    )
    return path


def tiny_vqgan(seed: int = 1) -> VQGANTokenizer:
    return make_tiny_vqgan(VQ, seed)


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("pretrained_maskgit")
    net, vq = tiny_network(), tiny_vqgan()
    (root / "MaskGIT").mkdir()
    return {
        "net": net.eval(),
        "vq": vq,
        "pth": write_maskgit_pth(net, root / "MaskGIT" / "MaskGIT_ImageNet_64.pth"),
        "vqgan": write_vqgan_folder(vq, VQ, root / "VQGAN"),
        "root": root,
    }


def load_teacher(pth: Path, vqgan: Path, **overrides) -> MaskGITTeacher:
    return MaskGITTeacher(checkpoint=str(pth), vqgan=str(vqgan), **{"resolution": RES, **NET, **overrides})


def test_teacher_logits_equal_original_network(released: dict) -> None:
    teacher = load_teacher(released["pth"], released["vqgan"])
    net = released["net"]
    assert teacher.grid_shape == (4, 4) and teacher.seq_len == 16
    assert teacher.codebook_size == 16 and teacher.mask_id == 16 and teacher.logit_width == 17
    for k, v in net.state_dict().items():
        assert torch.equal(teacher.network.state_dict()[k], v), k
    codes = torch.randint(0, 17, (3, 16))
    labels = teacher.encode_condition(torch.tensor([0, 5, 9]))
    drop = torch.tensor([False, True, False])
    with torch.no_grad():
        torch.testing.assert_close(teacher(codes, labels), net(codes, labels), rtol=0, atol=0)
        torch.testing.assert_close(teacher(codes, labels, drop), net(codes, labels, drop), rtol=0, atol=0)
        guided = teacher.guided_logits(teacher.network, codes, labels, 2.0)
        u = net(codes, labels, torch.ones(3, dtype=torch.bool))
        torch.testing.assert_close(guided, u + 2.0 * (net(codes, labels) - u), atol=1e-5, rtol=1e-5)


def test_teacher_loads_frozen_in_eval(released: dict) -> None:
    teacher = load_teacher(released["pth"], released["vqgan"])
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training and not teacher.network.training and not teacher.tokenizer.training
    student = copy.deepcopy(teacher.network).train()
    assert not teacher.network.training and student.training  # copies are ordinary modules
    codes = torch.randint(0, 17, (2, 16))
    labels = torch.tensor([1, 2])
    with torch.no_grad():  # dropout 0.1 would make two calls differ if the teacher were in train mode
        torch.testing.assert_close(teacher(codes, labels), teacher(codes, labels), rtol=0, atol=0)
    assert not teacher.tokenizer.has_encoder


def test_teacher_decode(released: dict) -> None:
    teacher = load_teacher(released["pth"], released["vqgan"])
    codes = torch.randint(0, 16, (2, 16))
    images = teacher.decode(codes)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, released["vq"].decode(codes.reshape(2, 4, 4)))
    with pytest.raises(ValueError, match="codes must lie in"):
        teacher.decode(torch.full((1, 16), 16))  # the mask id is not a VQ code
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        teacher.tokenizer.decode(torch.full((1, 4, 4), 16))


def test_module_prefix_and_taming_layout(released: dict, tmp_path: Path) -> None:
    pth = write_maskgit_pth(released["net"], tmp_path / "ddp.pth", prefix="module.")
    vqgan = write_vqgan_folder(released["vq"], VQ, tmp_path / "VQGAN", layout="taming")
    teacher = load_teacher(pth, vqgan)
    codes = torch.randint(0, 17, (2, 16))
    labels = torch.tensor([3, 4])
    with torch.no_grad():
        torch.testing.assert_close(teacher(codes, labels), released["net"](codes, labels), rtol=0, atol=0)


def test_missing_files(released: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="llvictorll/Maskgit-pytorch") as err:
        load_teacher(tmp_path / "MaskGIT_ImageNet_256.pth", released["vqgan"])
    assert str(tmp_path / "MaskGIT_ImageNet_256.pth") in str(err.value)
    assert "pretrained_maskgit/MaskGIT/MaskGIT_ImageNet_256.pth" in str(err.value)
    with pytest.raises(FileNotFoundError, match="llvictorll/Maskgit-pytorch") as err:
        load_teacher(released["pth"], tmp_path / "VQGAN")
    assert "model.yaml" in str(err.value)


def _edited_pth(released: dict, path: Path, edit) -> Path:
    ckpt = torch.load(released["pth"], weights_only=True)
    edit(ckpt["model_state_dict"])
    torch.save(ckpt, path)
    return path


def test_unexpected_missing_and_mismatched_keys(released: dict, tmp_path: Path) -> None:
    pth = _edited_pth(released, tmp_path / "a.pth", lambda sd: sd.__setitem__("head.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"1 unexpected keys: head\.weight") as err:
        load_teacher(pth, released["vqgan"])
    assert "a.pth" in str(err.value)
    pth = _edited_pth(released, tmp_path / "b.pth", lambda sd: sd.pop("transformer.layers.1.0.norm.bias"))
    with pytest.raises(ValueError, match=r"1 missing keys: transformer\.layers\.1\.0\.norm\.bias"):
        load_teacher(pth, released["vqgan"])
    # The 512 checkpoint loaded as 256 (here: a 32 px teacher reading the 64 px file): pos_emb/bias shapes differ.
    with pytest.raises(ValueError, match=r"2 shape mismatches: bias: file \[17, 28\] vs model \[5, 28\]") as err:
        load_teacher(released["pth"], released["vqgan"], resolution=32)
    assert "pos_emb" in str(err.value) and "resolution" in str(err.value)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_teacher(released["pth"], released["vqgan"], hidden_dim=64, heads=4)


def test_codebook_mismatch_names_both_files(released: dict, tmp_path: Path) -> None:
    vqgan = write_vqgan_folder(tiny_vqgan(), VQ, tmp_path / "VQGAN32")
    text = (vqgan / "model.yaml").read_text().replace("n_embed: 16", "n_embed: 32")
    (vqgan / "model.yaml").write_text(text)
    with pytest.raises(ValueError, match="codebook mismatch") as err:
        load_teacher(released["pth"], vqgan)
    assert "VQGAN32" in str(err.value) and "MaskGIT_ImageNet_64.pth" in str(err.value)


def test_bad_resolution(released: dict) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        load_teacher(released["pth"], released["vqgan"], resolution=72)


# ---- end to end: `dimo fit --config configs/imagenet.yaml` on the tiny released-layout files ---------------------
def test_dimo_fit_with_imagenet_config_end_to_end(released: dict, tmp_path: Path, monkeypatch) -> None:
    """The user's path: the ImageNet config with the checkpoint paths set, shrunk to CPU size by flags only."""
    from dimo_lightning.commands.cli import main

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    teacher = "--model.init_args.teacher.init_args."
    args = [
        "fit", "--config", str(root / "configs/imagenet.yaml"),
        f"{teacher}checkpoint={released['pth']}", f"{teacher}vqgan={released['vqgan']}", f"{teacher}resolution={RES}",
        *[f"{teacher}{k}={v}" for k, v in NET.items()],
        "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=[{class_path: dimo_lightning.training.ema.StudentEMA, init_args: {decay: 0.9}}, "
        "{class_path: dimo_lightning.evaluation.callbacks.sample_grid.SampleGrid, "
        "init_args: {every_n_generator_steps: 2, samples_per_class: 1}}, "
        "{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_last: true}}]",
        "--model.init_args.optim.max_generator_steps=2", "--data.init_args.num_classes=10",
        "--data.init_args.batch_size=4", "--data.init_args.batches_per_epoch=2",
    ]
    main(args)
    grids = sorted(tmp_path.glob("runs/imagenet256_dimo/version_0/samples/step_*.png"))
    assert [g.name for g in grids] == ["step_000000.png", "step_000002.png"]
    from PIL import Image

    width, height = Image.open(grids[-1]).size
    assert height == 10 * (RES + 2) + 2  # one decoded 64 px RGB sample per class, a row each
    ckpt = torch.load(next(tmp_path.glob("runs/imagenet256_dimo/version_0/checkpoints/last.ckpt")),
                      weights_only=False)
    assert ckpt["dimo"]["generator_step"] == 2
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    # `dimo export` of this run: MaskGIT v1.0 keys, so MaskGITTeacher loads the student as a teacher (strictly);
    # the VQGAN is referenced by folder, and load_student decodes through it.
    from dimo_lightning.inference.export import export_student, load_student

    out = export_student(tmp_path / "runs/imagenet256_dimo/version_0/checkpoints/last.ckpt", tmp_path / "student")
    as_teacher = load_teacher(out / "model.safetensors", released["vqgan"])
    ema = {k.removeprefix("student_ema."): v for k, v in ckpt["state_dict"].items() if k.startswith("student_ema.")}
    assert ema  # StudentEMA's average travels in the model's state dict
    for key, value in ema.items():
        assert torch.equal(as_teacher.network.state_dict()[key], value), key
    pipeline = load_student(out)
    assert pipeline(torch.tensor([0, 9]), seed=0).shape == (2, 3, RES, RES)
