import gzip
import pickle

import numpy as np
import pytest
import torch

from harness.config import DataConfig
from harness.data import (
    iterate_batches,
    load_cifar100,
    load_dataset,
    load_mnist,
    random_crop_flip,
    shard_indices,
    write_synthetic_cifar,
)
from harness.data.cifar import read_split
from harness.data.mnist import read_idx
from harness.errors import DataError


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_cifar(root, train_per_class=3, test_per_class=2, seed=0)
    return root


def test_synthetic_cifar_is_written_in_the_official_layout(synthetic_root):
    folder = synthetic_root / "cifar-100-python"
    assert sorted(p.name for p in folder.iterdir()) == ["meta", "test", "train"]
    with open(folder / "train", "rb") as f:
        record = pickle.load(f, encoding="bytes")
    assert record[b"data"].dtype == np.uint8 and record[b"data"].shape == (300, 3072)
    assert len(record[b"fine_labels"]) == 300
    with open(folder / "meta", "rb") as f:
        meta = pickle.load(f, encoding="bytes")
    assert len(meta[b"fine_label_names"]) == 100 and len(meta[b"coarse_label_names"]) == 20


def test_synthetic_cifar_reads_back_through_the_real_loader(synthetic_root):
    data = load_cifar100(synthetic_root)
    assert data.train_images.shape == (300, 3, 32, 32) and data.val_images.shape == (200, 3, 32, 32)
    assert data.num_classes == 100
    assert torch.bincount(data.train_labels, minlength=100).tolist() == [3] * 100
    superclass = data.groups["superclass"]
    assert superclass.num_groups == 20
    assert torch.equal(superclass.labels, data.val_labels // 5)  # 5 classes per superclass


def test_synthetic_cifar_is_deterministic(tmp_path, synthetic_root):
    write_synthetic_cifar(tmp_path, train_per_class=3, test_per_class=2, seed=0)
    for name in ("train", "test", "meta"):
        assert (tmp_path / "cifar-100-python" / name).read_bytes() == (
            synthetic_root / "cifar-100-python" / name
        ).read_bytes()


def test_synthetic_superclasses_share_visual_structure(synthetic_root):
    data = load_cifar100(synthetic_root)
    means = data.train_images.float().mean(dim=(2, 3))  # [N, 3] colour per image
    coarse = data.train_labels // 5
    centroids = torch.stack([means[coarse == s].mean(0) for s in range(20)])
    within = (means - centroids[coarse]).norm(dim=1).mean()
    between = torch.cdist(centroids, centroids).sum() / (20 * 19)
    assert between > 3 * within


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "train"
    evil.write_bytes(pickle.dumps({b"data": _RunsCode()}, protocol=2))
    with pytest.raises(DataError, match="refusing to load global .*system"):
        read_split(evil)
    assert not (tmp_path / "pwned").exists()


def test_corrupt_pickle_names_the_file(tmp_path):
    bad = tmp_path / "train"
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match=str(bad)):
        read_split(bad)


def test_wrong_contents_are_rejected(tmp_path):
    bad = tmp_path / "train"
    bad.write_bytes(
        pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"fine_labels": [0, 1], b"coarse_labels": [0, 0]})
    )
    with pytest.raises(DataError, match="corrupt CIFAR pickle"):
        read_split(bad)


def test_missing_cifar_root_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="cifar-100-python.*cifar-100-python.tar.gz"):
        load_cifar100(tmp_path)
    with pytest.raises(DataError, match="data.root: .*no such directory"):
        load_dataset(DataConfig(name="cifar100", root=str(tmp_path / "nope")))


def test_real_mnist_full_layout_trains_on_60000_and_validates_on_the_test_set(mnist_root):
    if not (mnist_root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("needs the MNIST training split in ../shared/data/mnist")
    data = load_mnist(mnist_root)
    assert data.train_images.shape == (60_000, 1, 28, 28) and data.val_images.shape == (10_000, 1, 28, 28)
    assert data.train_labels.bincount().tolist()[:2] == [5923, 6742]  # the published class counts
    assert data.val_labels.bincount().tolist()[:2] == [980, 1135]


def test_real_mnist_test_split_is_split_deterministically(mnist_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):  # the test split alone
        (raw / name).symlink_to(mnist_root / "MNIST" / "raw" / name)
    a = load_mnist(tmp_path, val_size=2000)
    b = load_mnist(tmp_path, val_size=2000)
    assert a.train_images.shape == (8000, 1, 28, 28) and a.val_images.shape == (2000, 1, 28, 28)
    assert torch.equal(a.val_labels, b.val_labels) and torch.equal(a.train_images, b.train_images)
    assert set(a.val_labels.tolist()) == set(range(10))
    # disjoint: no validation image also in training (MNIST has no exact duplicates in t10k)
    train_keys = {bytes(img.numpy()) for img in a.train_images}
    assert not any(bytes(img.numpy()) in train_keys for img in a.val_images)


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_full_mnist_layout_uses_train_and_t10k(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 12)):
        _write_idx(raw / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    data = load_mnist(tmp_path, "fashion_mnist")
    assert data.train_images.shape[0] == 30 and data.val_images.shape[0] == 12


def test_truncated_idx_file_is_rejected(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + (100).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 50)
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_missing_mnist_names_path_and_source(tmp_path):
    with pytest.raises(DataError, match=r"no MNIST data .*t10k-images.*yann.lecun.com"):
        load_mnist(tmp_path)


def test_batches_are_normalised_and_cover_the_set(synthetic_root):
    data = load_cifar100(synthetic_root)
    seen = 0
    indices = torch.arange(200)
    for images, labels in iterate_batches(data.val_images, data.val_labels, indices, 64, data.mean, data.std):
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
        seen += labels.shape[0]
    assert seen == 200


def test_random_crop_flip_keeps_shape_and_content_with_zero_padding():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    out = random_crop_flip(images, torch.Generator().manual_seed(0), padding=0)
    for original, augmented in zip(images, out):
        assert torch.equal(augmented, original) or torch.equal(augmented, original.flip(2))
    padded = random_crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    assert padded.shape == images.shape


def test_shards_are_equal_sized_and_cover_every_item():
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731  (same seed on every rank)
    shards = [shard_indices(10, rank, 3, g()) for rank in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert set(torch.cat(shards).tolist()) == set(range(10))
    assert shard_indices(10, 0, 1, None).tolist() == list(range(10))


def test_more_ranks_than_items_still_give_every_rank_a_full_share():
    """2 items on 5 ranks: the order wraps round twice (0 1 0 1 0), every rank gets one item."""
    shards = [shard_indices(2, rank, 5, None).tolist() for rank in range(5)]
    assert shards == [[0], [1], [0], [1], [0]]
    assert [len(shard_indices(3, rank, 8, torch.Generator().manual_seed(1))) for rank in range(8)] == [1] * 8
