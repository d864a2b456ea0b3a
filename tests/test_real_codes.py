"""Real token codes for the discriminator: the MNIST train split only, npz files, sharding, resume, `dimo encode`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_tiny_vqgan, write_vqgan_folder

from dimo_lightning.data.labels import ResumableLoader
from dimo_lightning.data.mnist import load_mnist_digits, split_indices
from dimo_lightning.data.real_codes import (
    RealCodesDataModule,
    RealCodeStream,
    load_code_file,
    shard_indices,
)
from dimo_lightning.tokenizers.patch_vq import PatchVQTokenizer

torch.set_num_threads(1)

VQGAN = dict(
    embed_dim=8, n_embed=16, z_channels=8, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
    num_res_blocks=1, attn_resolutions=[16], dropout=0.0,
)


def test_mnist_real_codes_never_come_from_the_validation_split() -> None:
    data = RealCodesDataModule(batch_size=64, batches_per_epoch=70, seed=3)
    data.setup("fit")
    real = data.data
    images, labels = load_mnist_digits()
    train_idx, val_idx = split_indices(labels)
    assert len(real) == len(train_idx) == 4000
    assert not set(real.file_indices.tolist()) & set(val_idx.tolist())
    stream = data.train_dataloader().dataset
    drawn = torch.cat([stream.rows(p) for p in range(70)])  # 4,480 draws: more than one pass over the 4,000
    file_rows = real.file_indices[drawn]
    assert not set(file_rows.tolist()) & set(val_idx.tolist())
    assert set(file_rows.tolist()) == set(train_idx.tolist())  # every training digit is used
    # Each drawn code sequence is the tokenization of that very training digit, with its label.
    batch = next(iter(data.train_dataloader()))
    batch_labels, batch_codes = batch.conditions, batch.real
    rows = stream.rows(0)
    expected = PatchVQTokenizer.from_file().encode(images[real.file_indices[rows]]).reshape(64, 49)
    assert torch.equal(batch_codes, expected) and torch.equal(batch_labels, labels[real.file_indices[rows]])
    assert batch_codes.dtype == torch.long and batch_codes.shape == (64, 49)


def test_shards_are_disjoint_equal_and_seeded() -> None:
    m, b = 103, 10  # 103 // 2 = 51 per rank and pass; one sample per pass is left out
    per_rank = [torch.cat([shard_indices(7, r, 2, p, b, m) for p in range(6)])[:51] for r in (0, 1)]
    assert len(set(per_rank[0].tolist())) == len(set(per_rank[1].tolist())) == 51
    assert not set(per_rank[0].tolist()) & set(per_rank[1].tolist())
    assert torch.equal(shard_indices(7, 0, 2, 4, b, m), shard_indices(7, 0, 2, 4, b, m))
    assert not torch.equal(shard_indices(7, 0, 2, 4, b, m), shard_indices(8, 0, 2, 4, b, m))
    # A batch straddling two passes: the end of pass 0 then the start of pass 1 of the same rank.
    straddle = shard_indices(7, 1, 2, 5, b, m)  # items 50..59 of rank 1's stream
    assert straddle[0] == per_rank[1][50]
    with pytest.raises(ValueError, match="cannot be sharded"):
        shard_indices(0, 0, 8, 0, 2, 5)


def _write_codes(path, codes, labels, compressed: bool = False):
    (np.savez_compressed if compressed else np.savez)(path, codes=codes, labels=labels)
    return path


def test_resume_continues_the_stream(tmp_path) -> None:
    generator = np.random.default_rng(0)
    path = _write_codes(tmp_path / "codes.npz", generator.integers(0, 16, (50, 4, 4)).astype(np.int16),
                        generator.integers(0, 3, 50))

    def module():
        data = RealCodesDataModule(str(path), codebook_size=16, grid_size=4, num_classes=3, batch_size=8,
                                   batches_per_epoch=4, seed=1)
        data.setup("fit")
        return data

    loader = module().train_dataloader()
    uninterrupted = list(loader) + list(loader)  # two epochs: positions 0..7
    assert isinstance(loader, ResumableLoader) and loader.state_dict() == {"position": 8}
    interrupted = module().train_dataloader()
    first = list(interrupted)[:3]
    resumed = module().train_dataloader()
    resumed.load_state_dict({"position": 3})  # a checkpoint taken after the third batch
    later = list(resumed) + list(resumed)[:1]  # positions 3..7
    assert len(first + later) == len(uninterrupted) == 8
    for got, want in zip(first + later, uninterrupted, strict=True):
        assert torch.equal(got.conditions, want.conditions) and torch.equal(got.real, want.real)
    assert not torch.equal(uninterrupted[0].real, uninterrupted[1].real)


def test_code_files_are_memory_mapped_and_checked(tmp_path) -> None:
    generator = np.random.default_rng(1)
    codes = generator.integers(0, 16, (20, 4, 4)).astype(np.int16)
    labels = generator.integers(0, 10, 20)
    plain = load_code_file(_write_codes(tmp_path / "plain.npz", codes, labels))
    packed = load_code_file(_write_codes(tmp_path / "packed.npz", codes, labels, compressed=True))
    assert isinstance(plain.codes, np.memmap) and isinstance(plain.labels, np.memmap)
    assert np.array_equal(plain.codes, codes) and np.array_equal(packed.codes, codes)
    stream = RealCodeStream(plain, 6, 1, seed=0)
    rows = stream.rows(0)
    got_labels, got_codes = stream.batch(rows)
    assert torch.equal(got_codes, torch.from_numpy(codes[rows.numpy()].reshape(6, 16).astype(np.int64)))
    assert torch.equal(got_labels, torch.from_numpy(labels[rows.numpy()]))

    def setup(path, **kwargs):
        args = dict(codebook_size=16, grid_size=4, num_classes=10) | kwargs
        RealCodesDataModule(str(path), **args).setup("fit")

    setup(tmp_path / "plain.npz")
    wrong_vocab = _write_codes(tmp_path / "vocab.npz", codes + 16, labels)
    with pytest.raises(ValueError, match=r"vocab\.npz: codes span \[16, 31\] but must lie in \[0, 16\)"):
        setup(wrong_vocab)
    with pytest.raises(ValueError, match=r"plain\.npz: code grids are 4x4 but the teacher's token grid is 7x5"):
        setup(tmp_path / "plain.npz", grid_size=[7, 5])
    with pytest.raises(ValueError, match=r"plain\.npz: labels span"):
        setup(tmp_path / "plain.npz", num_classes=3)
    np.savez(tmp_path / "nolabels.npz", codes=codes)
    with pytest.raises(ValueError, match=r"nolabels\.npz lacks \['labels'\]"):
        setup(tmp_path / "nolabels.npz")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match=r"text\.npz is not an \.npz archive"):
        setup(tmp_path / "text.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        setup(tmp_path / "missing.npz")


def test_dimo_encode_writes_the_codes_of_a_folder_and_of_an_npz(tmp_path) -> None:
    from PIL import Image

    from dimo_lightning.commands.cli import main
    from dimo_lightning.tokenizers.vqgan import VQGANTokenizer

    model = make_tiny_vqgan(VQGAN, seed=0)
    write_vqgan_folder(model, VQGAN, tmp_path / "vqgan")
    generator = np.random.default_rng(2)
    pixels = generator.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    for i, (cls, array) in enumerate(zip(["b_cat", "a_dog", "b_cat", "a_dog", "b_cat"], pixels, strict=True)):
        (tmp_path / "images" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(tmp_path / "images" / cls / f"{i}.png")
    (tmp_path / "images" / "a_dog" / "notes.txt").write_text("ignored")

    main(["encode", "--images", str(tmp_path / "images"), "--vqgan", str(tmp_path / "vqgan"),
          "--output", str(tmp_path / "out" / "codes.npz"), "--batch_size", "2", "--resolution", "32",
          "--num_workers", "1"])
    written = load_code_file(tmp_path / "out" / "codes.npz")
    assert isinstance(written.codes, np.memmap) and written.codes.shape == (5, 16, 16)
    # Sorted class folders: a_dog = 0 (images 1, 3), b_cat = 1 (images 0, 2, 4).
    order = [1, 3, 0, 2, 4]
    assert written.labels.tolist() == [0, 0, 1, 1, 1]
    reference = VQGANTokenizer.from_folder(tmp_path / "vqgan", keep_encoder=True)
    images = torch.from_numpy(pixels[order]).permute(0, 3, 1, 2).float() / 255
    assert np.array_equal(written.codes, reference.encode(images).numpy())

    np.savez(tmp_path / "images.npz", images=pixels, labels=np.arange(5) % 2)
    main(["encode", "--images", str(tmp_path / "images.npz"), "--vqgan", str(tmp_path / "vqgan"),
          "--output", str(tmp_path / "from_npz.npz"), "--batch_size", "3"])
    from_npz = load_code_file(tmp_path / "from_npz.npz")
    assert np.array_equal(from_npz.codes, reference.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255).numpy())
    assert from_npz.labels.tolist() == [0, 1, 0, 1, 0]
    data = RealCodesDataModule(str(tmp_path / "from_npz.npz"), codebook_size=16, grid_size=16, num_classes=2,
                               batch_size=2)
    data.setup("fit")
    codes = next(iter(data.train_dataloader())).real
    assert codes.shape == (2, 256)

    with pytest.raises(SystemExit, match="no class subfolders"):
        main(["encode", "--images", str(tmp_path / "vqgan" / ".."/ "out"), "--vqgan", str(tmp_path / "vqgan"),
              "--output", str(tmp_path / "x.npz")])


def test_dimo_fit_runs_on_real_code_batches_and_checkpoints_the_position(tmp_path, monkeypatch) -> None:
    """The ConditionBatch(labels, real=codes) batches go through DiMOModule (which reads the labels) and the CLI."""
    from pathlib import Path

    from dimo_lightning.commands.cli import main

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    main([
        "fit", "--config", str(root / "configs/mnist/dimo.yaml"), "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
        "init_args: {save_last: true}}]",
        "--model.init_args.optim.max_generator_steps=3", "--data=dimo_lightning.data.real_codes.RealCodesDataModule",
        "--data.init_args.batch_size=4", "--data.init_args.batches_per_epoch=2",
    ])
    checkpoint = torch.load(tmp_path / "runs/mnist_dimo/version_0/checkpoints/last.ckpt", weights_only=False)
    assert checkpoint["dimo"]["generator_step"] == 3
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"position": 3}]
