"""MNIST data, splits and the label stream."""

import torch

from dimo_lightning.data.labels import ClassLabelDataModule, label_batch
from dimo_lightning.data.mnist import MNISTDataModule, load_mnist_digits, load_mnist_split, split_indices


def test_mnist_digits_and_stratified_split():
    images, labels = load_mnist_digits()
    assert images.shape == (5000, 28, 28) and float(images.max()) <= 1.0
    assert torch.bincount(labels).tolist() == [500] * 10
    train, val = split_indices(labels, 0.2, seed=0)
    assert len(set(train.tolist()) & set(val.tolist())) == 0 and len(train) + len(val) == 5000
    assert torch.bincount(labels[val]).tolist() == [100] * 10
    again, _ = split_indices(labels, 0.2, seed=0)
    assert torch.equal(train, again)
    x, y = load_mnist_split("train")
    assert x.shape == (4000, 28, 28) and len(y) == 4000


def test_mnist_datamodule_yields_tokens():
    dm = MNISTDataModule(batch_size=16)
    dm.setup("fit")
    codes, labels = next(iter(dm.train_dataloader()))
    assert codes.shape == (16, 49) and codes.dtype == torch.long and int(codes.max()) < 256
    assert labels.shape == (16,)


def test_label_stream_is_deterministic_and_resumable():
    dm = ClassLabelDataModule(num_classes=10, batch_size=32, batches_per_epoch=3, seed=1)
    loader = dm.train_dataloader()
    first = [b.conditions.clone() for b in loader]  # training batches: ConditionBatch(labels)
    second = [b.conditions.clone() for b in loader]  # the stream continues, it does not repeat
    assert len(first) == 3 and not torch.equal(first[0], second[0])
    assert torch.equal(first[1], label_batch(1, 0, 1, 32, 10))
    state = loader.state_dict()
    fresh = ClassLabelDataModule(num_classes=10, batch_size=32, batches_per_epoch=3, seed=1).train_dataloader()
    fresh.load_state_dict(state)
    assert torch.equal(next(iter(fresh)).conditions, label_batch(1, 0, 6, 32, 10))
    counts = torch.bincount(torch.cat(first + second), minlength=10)
    assert counts.min() > 0


def test_predict_labels_are_balanced():
    dm = ClassLabelDataModule(num_classes=10, batch_size=25, predict_samples=100)
    batches = list(dm.predict_dataloader())
    labels = torch.cat([b["conditions"] for b in batches])
    assert torch.bincount(labels).tolist() == [10] * 10
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(100))  # global indices, in order
