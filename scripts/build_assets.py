"""Rebuild the shipped assets (``make assets``).

    python scripts/build_assets.py codebook      # k-means PatchVQ codebook of the MNIST train split
    python scripts/build_assets.py teacher RUN   # copy the teacher exported by `dimo fit` into assets/
    python scripts/build_assets.py dae           # denoising autoencoder of the stroke distance
    python scripts/build_assets.py captions      # captioned-MNIST thickness/slant tercile cuts (train split)
    python scripts/build_assets.py t2i_teacher RUN   # copy RUN/t2i_teacher/ (configs/mnist/t2i_teacher.yaml)
    python scripts/build_assets.py text_tokenizer    # 4096-id BPE of the text corpus' train split
    python scripts/build_assets.py text_teacher RUN  # copy RUN/text_teacher/ (configs/text/teacher.yaml)
    python scripts/build_assets.py text_judge RUN    # copy RUN/text_judge/ (configs/text/judge.yaml)
    python scripts/build_assets.py text_reference    # held-out text's metrics under the judge (text_reference.json)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from dimo_lightning.assets import asset_path


def build_codebook(seed: int = 0, codebook_size: int = 256) -> Path:
    """Fit the 4x4-patch k-means codebook on the train split and save it as an asset."""
    from dimo_lightning.data.mnist import load_mnist_split
    from dimo_lightning.tokenizers.patch_vq import PatchVQTokenizer

    torch.manual_seed(seed)
    images, _ = load_mnist_split("train")
    tokenizer = PatchVQTokenizer.fit(images, codebook_size=codebook_size, patch_size=4, seed=seed)
    out = asset_path("mnist_codebook.safetensors")
    tokenizer.save(out)
    return out


def install_teacher(run_dir: str) -> list[Path]:
    """Copy ``teacher.safetensors`` and ``teacher.json`` written by MaskedDiffusionModule into the assets."""
    src = Path(run_dir)
    copied = []
    for name in ("teacher.safetensors", "teacher.json"):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name} not found: run `dimo fit --config configs/mnist/teacher.yaml` first")
        dst = asset_path("mnist_" + name)
        shutil.copyfile(src / name, dst)
        copied.append(dst)
    return copied


def install_t2i_teacher(run_dir: str) -> Path:
    """Replace ``assets/mnist_t2i_teacher/`` by the folder ``RUN/t2i_teacher`` that TextMaskedDiffusionModule
    exported (diffusers layout: ``transformer/``, ``text_encoder/``, ``tokenizer/``, ``codebook.safetensors``)."""
    from dimo_lightning.teachers.prompt import T2I_TEACHER_ASSET

    src = Path(run_dir) / "t2i_teacher"
    expected = ("transformer", "text_encoder", "tokenizer", "codebook.safetensors")
    missing = [name for name in expected if not (src / name).exists()]
    if missing:
        raise FileNotFoundError(f"{src} lacks {', '.join(missing)}: run `dimo fit --config "
                                "configs/mnist/t2i_teacher.yaml` first and pass its log directory")
    dst = asset_path(T2I_TEACHER_ASSET)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def build_text_tokenizer(vocab_size: int = 4096) -> Path:
    """Train the BPE tokenizer on the text corpus' train split into ``assets/text_teacher/tokenizer/``."""
    from dimo_lightning.data.text_corpus import TEXT_TOKENIZER_ASSET, load_split
    from dimo_lightning.tokenizers.text_bpe import save_bpe_tokenizer, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([d.text for d in load_split("train")], vocab_size=vocab_size)
    return save_bpe_tokenizer(tokenizer, asset_path(TEXT_TOKENIZER_ASSET))


def install_text_folder(run_dir: str, name: str, config: str, expected: tuple[str, ...]) -> Path:
    """Replace ``assets/<name>/`` by ``RUN/<name>/``, the folder a text pretraining module exported."""
    src = Path(run_dir) / name
    missing = [item for item in expected if not (src / item).exists()]
    if missing:
        raise FileNotFoundError(f"{src} lacks {', '.join(missing)}: run `dimo fit --config {config}` first and pass "
                                "its log directory")
    dst = asset_path(name)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def build_text_reference() -> Path:
    """Score the held-out text under the shipped judge into ``assets/text_reference.json``."""
    import json

    from dimo_lightning.evaluation.text_reference import reference_row

    out = asset_path("text_reference.json")
    out.write_text(json.dumps(reference_row(), indent=2) + "\n")
    return out


TEXT_FOLDERS = {
    "text_teacher": ("configs/text/teacher.yaml", ("config.json", "model.safetensors", "tokenizer")),
    "text_judge": ("configs/text/judge.yaml", ("config.json", "model.safetensors", "tokenizer.json")),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("codebook", "teacher", "classifier", "dae", "captions", "t2i_teacher",
                                   "text_tokenizer", "text_reference", *TEXT_FOLDERS):
        raise SystemExit(__doc__)
    if argv[0] in TEXT_FOLDERS:
        if len(argv) != 2:
            raise SystemExit(f"usage: python scripts/build_assets.py {argv[0]} RUN_DIR")
        print(f"wrote {install_text_folder(argv[1], argv[0], *TEXT_FOLDERS[argv[0]])}")
        return
    if argv[0] == "text_tokenizer":
        print(f"wrote {build_text_tokenizer()}")
        return
    if argv[0] == "text_reference":
        print(f"wrote {build_text_reference()}")
        return
    if argv[0] == "codebook":
        print(f"wrote {build_codebook()}")
    elif argv[0] == "teacher":
        if len(argv) != 2:
            raise SystemExit("usage: python scripts/build_assets.py teacher RUN_DIR")
        for path in install_teacher(argv[1]):
            print(f"wrote {path}")
    elif argv[0] == "dae":
        from dimo_lightning.evaluation.metrics.strokes import build_autoencoder_asset

        print(f"wrote {build_autoencoder_asset()}")
    elif argv[0] == "t2i_teacher":
        if len(argv) != 2:
            raise SystemExit("usage: python scripts/build_assets.py t2i_teacher RUN_DIR")
        print(f"wrote {install_t2i_teacher(argv[1])}")
    elif argv[0] == "captions":
        from dimo_lightning.data.captions import build_thresholds_asset

        print(f"wrote {build_thresholds_asset()}")
    else:
        from dimo_lightning.evaluation.metrics.classifier import build_classifier_asset

        print(f"wrote {build_classifier_asset()}")


if __name__ == "__main__":
    main()
