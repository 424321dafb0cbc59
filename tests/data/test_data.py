"""The dataset factory: digits, image folders (layout checks, corrupt files), torchvision transfer datasets read
from files in their own on-disk formats, shapes, and the deterministic sampler."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.flowers102
from PIL import Image

from cratevit.data import (
    EpochSampler,
    SeededDataset,
    build_datasets,
    collate_skip,
    data_info,
)
from cratevit.data.folder import SafeImageFolder, check_image_folder
from cratevit.data.transfer import make_transfer


# ------------------------------------------------------------------------------------------- file writers
def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 4, size: int = 20) -> Path:
    """``root/{train,val}/CLASS/i.png`` with random RGB images."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in half: the header reads, the pixels do not."""
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _cifar_batch(n: int, label_key: str, n_classes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: [i % n_classes for i in range(n)]}


def write_cifar10(root: Path, per_batch: int = 4, test: int = 8) -> Path:
    """CIFAR-10's python format: pickled dicts in ``cifar-10-batches-py/``."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i in range(1, 6):
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_batch(per_batch, "labels", 10, i)))
    (d / "test_batch").write_bytes(pickle.dumps(_cifar_batch(test, "labels", 10, 9)))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (d / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return root


def write_cifar100(root: Path) -> Path:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    (d / "train").write_bytes(pickle.dumps(_cifar_batch(12, "fine_labels", 100, 1)))
    (d / "test").write_bytes(pickle.dumps(_cifar_batch(6, "fine_labels", 100, 2)))
    (d / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    return root


def write_flowers102(root: Path) -> Path:
    from scipy.io import savemat

    d = root / "flowers-102"
    (d / "jpg").mkdir(parents=True)
    for i in range(1, 7):
        Image.fromarray(np.full((30, 40, 3), 20 * i, np.uint8)).save(d / "jpg" / f"image_{i:05d}.jpg")
    savemat(d / "imagelabels.mat", {"labels": np.array([1, 2, 3, 1, 2, 3])})
    savemat(d / "setid.mat", {"trnid": np.array([1, 2, 3]), "valid": np.array([4]), "tstid": np.array([5, 6])})
    return root


def write_pets(root: Path) -> Path:
    d = root / "oxford-iiit-pet"
    (d / "images").mkdir(parents=True)
    (d / "annotations").mkdir()
    names = ["Abyssinian_1", "Abyssinian_2", "beagle_1", "beagle_2", "Bengal_1", "Bengal_2"]
    labels = [1, 1, 2, 2, 3, 3]
    for name in names:
        Image.fromarray(np.full((36, 30, 3), 90, np.uint8)).save(d / "images" / f"{name}.jpg")
    lines = [f"{n} {lab} 1 1" for n, lab in zip(names, labels, strict=True)]
    (d / "annotations" / "trainval.txt").write_text("\n".join(lines[::2]) + "\n")
    (d / "annotations" / "test.txt").write_text("\n".join(lines[1::2]) + "\n")
    return root


@pytest.fixture
def no_checksums(monkeypatch):
    """Our small files cannot match the published MD5 sums; accept any existing file (the readers stay real)."""

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", exists)
    monkeypatch.setattr(torchvision.datasets.flowers102, "check_integrity", exists)


# ------------------------------------------------------------------------------------------- digits
def test_digits_split_is_fixed_stratified_and_disjoint():
    info = data_info("digits")
    assert (info.kind, info.num_classes) == ("digits", 10)
    train, val = build_datasets(info, 32)
    assert (len(train), len(val)) == (1437, 360)
    assert torch.bincount(val.targets).min() >= 35  # stratified: every digit held out
    flat_train = {tuple(x.flatten().tolist()) for x in train.images[:200]}
    assert not any(tuple(x.flatten().tolist()) in flat_train for x in val.images)
    image, label = val[0]
    assert image.shape == (3, 32, 32) and isinstance(label, int)
    assert torch.allclose(image, val[0][0])  # validation has no randomness


def test_seeded_dataset_repeats_augmentation_for_the_same_key():
    train, _ = build_datasets(data_info("digits"), 32)
    ds = SeededDataset(train)
    a, b = ds[(5, 123)][0], ds[(5, 123)][0]
    assert torch.equal(a, b)
    assert not all(torch.equal(ds[(5, s)][0], a) for s in range(124, 130))
    state = torch.get_rng_state()
    ds[(5, 1)]
    assert torch.equal(state, torch.get_rng_state())  # the global generator is untouched


# ------------------------------------------------------------------------------------------- sampler
def test_epoch_sampler_ranks_together_make_the_single_process_batches():
    n, batch, world = 37, 8, 2
    single = [i for i, _ in EpochSampler(n, seed=3)]
    assert sorted(single) == list(range(n))
    ranks = [[i for i, _ in EpochSampler(n, seed=3, rank=r, world_size=world)] for r in range(world)]
    for k in range(n // batch):
        together = sorted(
            ranks[0][k * batch // 2 : (k + 1) * batch // 2] + ranks[1][k * batch // 2 : (k + 1) * batch // 2]
        )
        assert together == sorted(single[k * batch : (k + 1) * batch])


def test_epoch_sampler_is_fixed_by_seed_and_epoch_and_skips_for_resume():
    s = EpochSampler(50, seed=1)
    s.set_epoch(2)
    epoch2 = list(s)
    s.set_epoch(3)
    assert [i for i, _ in s] != [i for i, _ in epoch2]
    s.set_epoch(2, skip=20)
    assert list(s) == epoch2[20:] and len(s) == 30
    assert list(EpochSampler(50, seed=2)) != list(EpochSampler(50, seed=1))


# ------------------------------------------------------------------------------------------- folders
def test_image_folder_layout_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data_info(str(tmp_path / "nowhere"))
    (tmp_path / "a" / "train" / "x").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no val/ folder"):
        check_image_folder(tmp_path / "a")
    write_image_folder(tmp_path / "b")
    (tmp_path / "b" / "train" / "empty").mkdir()
    (tmp_path / "b" / "val" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty in .* hold no images"):
        check_image_folder(tmp_path / "b")
    write_image_folder(tmp_path / "c")
    (tmp_path / "c" / "val" / "cat").rename(tmp_path / "c" / "val" / "lion")
    with pytest.raises(ValueError, match="different classes"):
        check_image_folder(tmp_path / "c")
    assert check_image_folder(write_image_folder(tmp_path / "d")) == ["cat", "dog"]


def test_corrupt_image_is_skipped_with_a_warning_and_counted(tmp_path, capfd):
    root = write_image_folder(tmp_path / "data")
    bad = write_truncated_jpeg(root / "train" / "cat" / "broken.jpg")
    info = data_info(str(root))
    train, val = build_datasets(info, 16)
    assert isinstance(train, SafeImageFolder) and len(train) == 9
    items = [train[i] for i in range(len(train))]
    assert sum(it is None for it in items) == 1
    assert str(bad) in capfd.readouterr().err
    batch = collate_skip(items)
    assert batch.skipped == 1 and batch.images.shape == (8, 3, 16, 16) and batch.targets.tolist().count(0) == 4
    assert val[0][0].shape == (3, 16, 16)


# ------------------------------------------------------------------------------------------- transfer
def test_cifar10_and_cifar100_read_from_their_pickled_batches(tmp_path, no_checksums):
    write_cifar10(tmp_path)
    train, val = build_datasets(data_info("cifar10"), 32, data_dir=str(tmp_path), download=False)
    assert (len(train), len(val)) == (20, 8)
    assert train[0][0].shape == (3, 32, 32) and val[3][1] == 3
    write_cifar100(tmp_path)
    info = data_info("cifar100")
    assert info.num_classes == 100
    train, val = build_datasets(info, 16, data_dir=str(tmp_path), randaug=True, download=False)
    assert (len(train), len(val)) == (12, 6) and train[11][0].shape == (3, 16, 16) and train[11][1] == 11


def test_flowers102_and_pets_read_from_their_layouts(tmp_path, no_checksums):
    write_flowers102(tmp_path)
    train, val = build_datasets(data_info("flower"), 24, data_dir=str(tmp_path), download=False)
    assert (len(train), len(val)) == (3, 2)
    assert train[2][0].shape == (3, 24, 24) and train[2][1] == 2  # torchvision makes labels 0-based
    write_pets(tmp_path)
    train, val = build_datasets(data_info("pets"), 24, data_dir=str(tmp_path), download=False)
    assert (len(train), len(val)) == (3, 3) and [train[i][1] for i in range(3)] == [0, 1, 2]
    assert val[0][0].shape == (3, 24, 24)


def test_absent_dataset_offline_says_where_to_put_the_files(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"CIFAR10 files not found in .*--no-download.*put cifar-10-batches-py/ "
    ):
        make_transfer("cifar10", tmp_path, True, None, download=False)
    with pytest.raises(FileNotFoundError, match=r"oxford-iiit-pet/ \(images"):
        make_transfer("pets", tmp_path, False, None, download=False)
    with pytest.raises(ValueError, match="needs --data-dir"):
        make_transfer("flower", None, True, None)


def test_failed_download_gives_the_same_clear_message(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError, match=r"download failed .*name resolution.*put cifar-10-batches-py/"):
        make_transfer("cifar10", tmp_path, True, None, download=True)


# ------------------------------------------------------------------------------------------- other kinds
def test_dummy_and_shapes_data():
    info = data_info("ignored", dummy=True, num_classes=7)
    train, val = build_datasets(info, 16)
    x, y = train[3]
    assert x.shape == (3, 16, 16) and 0 <= y < 7 and len(val) == 1000
    info = data_info("shapes")
    assert info.kind == "shapes" and info.num_classes == len(info.classes) >= 2
    train, val = build_datasets(info, 32)
    x, y = val[1]
    assert x.shape == (3, 32, 32) and 0 <= y < info.num_classes and x.dtype == torch.float32
