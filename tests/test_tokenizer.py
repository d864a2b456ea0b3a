"""PatchVQTokenizer round trips and the shipped codebook."""

import pytest
import torch

from dimo_lightning.tokenizers.patch_vq import PatchVQTokenizer


def test_round_trip_of_codebook_images_is_exact():
    torch.manual_seed(0)
    tok = PatchVQTokenizer(torch.rand(32, 16))
    codes = torch.randint(0, 32, (5, 7, 7))
    images = tok.decode(codes)
    assert images.shape == (5, 1, 28, 28)
    assert torch.equal(tok.encode(images), codes)  # decoded patches are centroids, so they encode back


def test_encode_picks_nearest_centroid():
    codebook = torch.stack([torch.zeros(4), torch.ones(4), torch.full((4,), 0.4)])
    tok = PatchVQTokenizer(codebook, patch_size=2)
    image = torch.tensor([[[0.1, 0.1, 0.9, 0.9], [0.1, 0.1, 0.9, 0.9], [0.35, 0.45, 0.0, 0.0],
                           [0.4, 0.4, 0.0, 0.0]]])
    assert tok.encode(image).tolist() == [[[0, 1], [2, 0]]]


def test_shipped_codebook_reconstructs_mnist():
    from dimo_lightning.data.mnist import load_mnist_split

    tok = PatchVQTokenizer.from_file()
    assert tok.codebook_size == 256 and tok.patch_size == 4
    images, _ = load_mnist_split("val")
    recon = tok.decode(tok.encode(images[:200]))[:, 0]
    assert float((recon - images[:200]).pow(2).mean()) < 0.012


def test_bad_codes_and_files(tmp_path):
    tok = PatchVQTokenizer(torch.rand(8, 16))
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        tok.decode(torch.full((1, 7, 7), 8))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        PatchVQTokenizer.from_file(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="shape"):
        PatchVQTokenizer(torch.rand(8, 15))
