"""Real-dataset loaders on miniature copies of the real on-disk layouts (no network, no real data).

Every tree here is fabricated in tmp_path: a few tiny images per class plus split files in the
real formats (CoOp's split_zhou_*.json, torchvision's CIFAR pickles, DomainNet's lists).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedpgp_ray.config import DataConfig, load_config
from fedpgp_ray.data import coop, folders
from fedpgp_ray.data.base import DataError
from fedpgp_ray.data.domains import DOMAINNET10, OFFICE_CALTECH10
from fedpgp_ray.data.partition import partition_dataset
from fedpgp_ray.data.registry import available_datasets, build_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Image-check records go to a per-test folder, never to ~/.cache."""
    monkeypatch.setenv(folders.CACHE_ENV, str(tmp_path / "cache"))


def write_image(path: Path, seed: int = 0, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")
    return path


def cfg(dataset: str, root: Path | str | None, **kw) -> DataConfig:
    return DataConfig(dataset=dataset, root=None if root is None else str(root), **kw)


# -- CoOp layouts -------------------------------------------------------------------------------------

# dataset -> (folder, image folder, split file, [(class folder or None, CoOp label, split classname, file stem)])
COOP_TREES = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", [
        ("Faces", 0, "face", "image"), ("Leopards", 1, "leopard", "image"), ("Motorbikes", 2, "motorbike", "image"),
        ("accordion", 3, "accordion", "image"), ("airplanes", 4, "airplane", "image"),
        ("anchor", 5, "anchor", "image")]),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json", [
        (None, 0, "abyssinian", "Abyssinian"), (None, 1, "american_bulldog", "american_bulldog"),
        (None, 2, "american_pit_bull_terrier", "american_pit_bull_terrier"),
        (None, 3, "basset_hound", "basset_hound")]),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", [
        (None, 0, "pink primrose", "image_0000"), (None, 1, "hard-leaved pocket orchid", "image_0001"),
        (None, 2, "canterbury bells", "image_0002"), (None, 3, "sweet pea", "image_0003")]),
    "food101": ("food-101", "images", "split_zhou_Food101.json", [
        ("apple_pie", 0, "apple_pie", "10"), ("baby_back_ribs", 1, "baby_back_ribs", "20"),
        ("baklava", 2, "baklava", "30"), ("beef_carpaccio", 3, "beef_carpaccio", "40")]),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json", [
        ("banded", 0, "banded", "banded"), ("blotchy", 1, "blotchy", "blotchy"), ("braided", 2, "braided", "braided"),
        ("bubbly", 3, "bubbly", "bubbly")]),
}
EXPECTED_NAMES = {
    "caltech101": ["accordion", "airplane", "anchor", "face", "leopard", "motorbike"],
    "oxford_pets": ["abyssinian", "american bulldog", "american pit bull terrier", "basset hound"],
    "oxford_flowers": ["canterbury bells", "hard-leaved pocket orchid", "pink primrose", "sweet pea"],
    "food101": ["apple pie", "baby back ribs", "baklava", "beef carpaccio"],
    "dtd": ["banded", "blotchy", "braided", "bubbly"],
}


def make_coop(root: Path, name: str, per_class: int = 3) -> dict:
    """A CoOp tree: per class 1 train, 1 val and the rest test images; returns the split written."""
    folder, image_dir, split_file, classes = COOP_TREES[name]
    base = root / folder / image_dir
    split = {"train": [], "val": [], "test": []}
    for c, (cls_folder, label, cname, stem) in enumerate(classes):
        for i in range(per_class):
            rel = f"{stem}_{i + 1:04d}.jpg" if cls_folder is None else f"{cls_folder}/{stem}_{i + 1:04d}.jpg"
            write_image(base / rel, seed=100 * c + i)
            key = "train" if i == 0 else "val" if i == 1 else "test"
            split[key].append([rel, label, cname])
    if name == "caltech101":  # CoOp leaves these folders out of its split
        for extra in coop.CALTECH_IGNORED:
            write_image(base / extra / "image_0001.jpg", seed=7)
    (root / folder / split_file).write_text(json.dumps(split))
    return split


@pytest.mark.parametrize("name", sorted(COOP_TREES))
def test_coop_loader_classes_and_splits(tmp_path, name):
    split = make_coop(tmp_path, name)
    ds = build_dataset(cfg(name, tmp_path), seed=0)
    assert ds.classnames == EXPECTED_NAMES[name]
    n = len(ds.classnames)
    assert len(ds.train) == n and len(ds.test) == n  # few-shot images come from `train` only, as in CoOp
    train_files = {str(tmp_path / COOP_TREES[name][0] / COOP_TREES[name][1] / rel) for rel, _, _ in split["train"]}
    assert set(ds.train.images) == train_files
    pooled = build_dataset(cfg(name, tmp_path, few_shot_pool="train+val"), seed=0)
    assert len(pooled.train) == 2 * n  # the old pool, behind data.few_shot_pool: train+val
    _, image_dir, _, _ = COOP_TREES[name]
    renames = coop.SPECS[name].renames
    truth = {str(tmp_path / COOP_TREES[name][0] / image_dir / rel): folders.clean_classname(c, renames)
             for rows in split.values() for rel, _, c in rows}
    for part in (ds.train, ds.test):
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in part.images)
        assert [ds.classnames[y] for y in part.labels] == [truth[p] for p in part.images]
        assert part.labels.dtype == np.int64 and part.domains is None
    assert ds.test.load(0).mode == "RGB"
    assert not any("BACKGROUND" in p or "Faces_easy" in p for p in ds.train.images + ds.test.images)


def test_coop_base_novel_pathological_partition(tmp_path):
    make_coop(tmp_path, "caltech101")
    data = cfg("caltech101", tmp_path, shots=1)
    ds = build_dataset(data, seed=0)
    part = partition_dataset(ds, data, num_clients=3, seed=0)
    assert [ds.classnames[c] for c in part.train_classes] == ["accordion", "airplane", "anchor"]
    assert [ds.classnames[c] for c in part.novel.classes] == ["face", "leopard", "motorbike"]
    owned = [c for client in part.clients for c in client.classes]
    assert sorted(owned) == part.train_classes  # disjoint, covering all base classes
    for client in part.clients:
        assert len(client.train_indices) == len(client.classes)  # 1 shot per own class
        assert set(ds.train.labels[client.train_indices]) == set(client.classes)
        assert set(ds.test.labels[client.local.indices]) == set(client.classes)
    assert set(ds.test.labels[part.novel.indices]) == set(part.novel.classes)


def test_class_order_coop_keeps_split_label_ids(tmp_path):
    make_coop(tmp_path, "caltech101")
    make_coop(tmp_path, "oxford_flowers")
    cal = build_dataset(cfg("caltech101", tmp_path, class_order="coop"), seed=0)
    assert cal.classnames == ["face", "leopard", "motorbike", "accordion", "airplane", "anchor"]
    flo = build_dataset(cfg("oxford_flowers", tmp_path, class_order="coop"), seed=0)
    assert flo.classnames == ["pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea"]
    by_name = build_dataset(cfg("oxford_flowers", tmp_path), seed=0)
    assert by_name.name != flo.name  # different labels: different feature-cache identity


def test_caltech_split_rows_of_ignored_folders_are_dropped(tmp_path):
    split = make_coop(tmp_path, "caltech101")
    split["train"].append(["BACKGROUND_Google/image_0001.jpg", 99, "BACKGROUND_Google"])
    (tmp_path / "caltech-101" / "split_zhou_Caltech101.json").write_text(json.dumps(split))
    ds = build_dataset(cfg("caltech101", tmp_path), seed=0)
    assert "BACKGROUND Google" not in ds.classnames and len(ds.classnames) == 6


def test_clean_classname_like_coop():
    assert folders.clean_classname("Faces", coop.CALTECH_RENAMES) == "face"
    assert folders.clean_classname("airplanes", coop.CALTECH_RENAMES) == "airplane"
    assert folders.clean_classname("Leopards", coop.CALTECH_RENAMES) == "leopard"
    assert folders.clean_classname("Motorbikes", coop.CALTECH_RENAMES) == "motorbike"
    assert folders.clean_classname("american_pit_bull_terrier") == "american pit bull terrier"


# -- data errors ------------------------------------------------------------------------------------

def test_error_root_not_set():
    with pytest.raises(DataError, match=r"data\.root is not set.*expected layout"):
        build_dataset(cfg("dtd", None), seed=0)


def test_error_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        build_dataset(cfg("caltech101", missing), seed=0)
    msg = str(err.value)
    assert "data root not found" in msg and str(missing) in msg
    assert "expected layout: <data.root>/caltech-101/101_ObjectCategories/<class>/<image>.jpg" in msg


def test_error_missing_dataset_folder(tmp_path):
    with pytest.raises(DataError, match=r"dataset folder not found: .*food-101.*expected layout"):
        build_dataset(cfg("food101", tmp_path), seed=0)


def test_error_missing_image_folder(tmp_path):
    make_coop(tmp_path, "oxford_flowers")
    shutil.rmtree(tmp_path / "oxford_flowers" / "jpg")
    with pytest.raises(DataError, match=r"image folder not found: .*oxford_flowers[/\\]jpg"):
        build_dataset(cfg("oxford_flowers", tmp_path), seed=0)


def test_error_missing_split_file(tmp_path):
    make_coop(tmp_path, "dtd")
    path = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    path.unlink()
    with pytest.raises(DataError) as err:
        build_dataset(cfg("dtd", tmp_path), seed=0)
    msg = str(err.value)
    assert f"split file not found: {path}" in msg and "expected layout" in msg and "data.download" in msg


def test_error_empty_class_folder(tmp_path):
    make_coop(tmp_path, "dtd")
    folder = tmp_path / "dtd" / "images" / "braided"
    for f in folder.iterdir():
        f.unlink()
    with pytest.raises(DataError, match=rf"empty class folder {folder}.*class 'braided'.*expected layout"):
        build_dataset(cfg("dtd", tmp_path), seed=0)


def test_error_class_in_split_without_folder(tmp_path):
    make_coop(tmp_path, "food101")
    shutil.rmtree(tmp_path / "food-101" / "images" / "baklava")
    with pytest.raises(DataError) as err:
        build_dataset(cfg("food101", tmp_path), seed=0)
    msg = str(err.value)
    assert "class 'baklava' in split file" in msg and str(tmp_path / "food-101" / "images" / "baklava") in msg
    assert "has no folder" in msg and "expected layout" in msg


def test_error_malformed_split_file(tmp_path):
    make_coop(tmp_path, "dtd")
    path = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    path.write_text(json.dumps({"train": [["banded/banded_0001.jpg", 0]], "val": [], "test": []}))
    with pytest.raises(DataError, match=r"entry 0 of 'train'.*expected \[relative_path, label, classname\]"):
        build_dataset(cfg("dtd", tmp_path), seed=0)
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"is not readable JSON"):
        build_dataset(cfg("dtd", tmp_path), seed=0)


def test_error_inconsistent_split_labels(tmp_path):
    split = make_coop(tmp_path, "dtd")
    split["test"][0][1] = 3  # 'banded' row labelled like 'bubbly'
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    with pytest.raises(DataError, match=r"inconsistent: label 3 is used for both"):
        build_dataset(cfg("dtd", tmp_path), seed=0)


def test_error_no_listed_image_exists(tmp_path):
    make_coop(tmp_path, "oxford_pets")
    for f in (tmp_path / "oxford_pets" / "images").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"none of the 8 images listed in .*split_zhou_OxfordPets.json exist"):
        build_dataset(cfg("oxford_pets", tmp_path), seed=0)


def test_corrupt_image_stops_the_build_or_is_skipped(tmp_path, caplog):
    make_coop(tmp_path, "oxford_pets")
    bad = tmp_path / "oxford_pets" / "images" / "basset_hound_0001.jpg"  # a training image
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError) as err:
        build_dataset(cfg("oxford_pets", tmp_path), seed=0)
    assert str(bad) in str(err.value) and "data.skip_bad_images: true" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="fedpgp_ray.data.folders"):
        ds = build_dataset(cfg("oxford_pets", tmp_path, skip_bad_images=True), seed=0)
    assert str(bad) not in ds.train.images and len(ds.train) == 3 and len(ds.test) == 4
    assert "skipped 1 bad image" in caplog.text and str(bad) in caplog.text


def test_truncated_jpeg_is_caught(tmp_path):
    make_coop(tmp_path, "food101")
    bad = tmp_path / "food-101" / "images" / "baklava" / "30_0003.jpg"
    write_image(bad, seed=5, size=64)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match=r"1 unreadable, truncated or missing image.*30_0003\.jpg.*truncated"):
        build_dataset(cfg("food101", tmp_path), seed=0)


def test_missing_listed_file_is_a_bad_image(tmp_path):
    make_coop(tmp_path, "oxford_flowers")
    gone = tmp_path / "oxford_flowers" / "jpg" / "image_0002_0003.jpg"
    gone.unlink()
    with pytest.raises(DataError, match=rf"{gone}.*file not found"):
        build_dataset(cfg("oxford_flowers", tmp_path), seed=0)


def test_images_are_verified_once(tmp_path, monkeypatch):
    make_coop(tmp_path, "dtd")
    calls = []
    real = folders.check_image
    monkeypatch.setattr(folders, "check_image", lambda p: calls.append(p) or real(p))
    build_dataset(cfg("dtd", tmp_path), seed=0)
    assert len(calls) == 8  # train + test (CoOp's val images are not loaded)
    build_dataset(cfg("dtd", tmp_path), seed=0)
    assert len(calls) == 8  # the passing check was recorded: nothing re-read
    changed = tmp_path / "dtd" / "images" / "banded" / "banded_0001.jpg"
    write_image(changed, seed=99)
    os.utime(changed, ns=(1, 1))
    build_dataset(cfg("dtd", tmp_path), seed=0)
    assert len(calls) == 16  # a changed file invalidates the record


def test_check_image_reasons(tmp_path):
    good = write_image(tmp_path / "a.png", size=32)
    assert folders.check_image(str(good)) is None
    data = good.read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    assert folders.check_image(str(tmp_path / "t.png")) is not None
    assert folders.check_image(str(tmp_path / "missing.png")) == "file not found"


def _undecodable_png(path: Path) -> None:
    """A PNG whose header and chunk CRCs are intact but whose compressed pixel data does not decode."""
    import struct
    import zlib
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, format="PNG")
    data = path.read_bytes()
    at = data.index(b"IDAT")
    n = struct.unpack(">I", data[at - 4:at])[0]
    body = bytearray(data[at + 4:at + 4 + n])
    body[10:40] = bytes(30)
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(body)) & 0xFFFFFFFF)
    path.write_bytes(data[:at + 4] + bytes(body) + crc + data[at + 8 + n:])


def test_images_that_verify_but_do_not_decode_are_caught_and_skippable(tmp_path, caplog):
    png = tmp_path / "broken.png"
    _undecodable_png(png)
    with Image.open(png) as img:
        img.verify()  # the header check alone passes ...
    assert "broken data stream" in folders.check_image(str(png))  # ... the full decode does not
    jpeg = tmp_path / "cut.jpg"
    write_image(jpeg, seed=4, size=64)
    jpeg.write_bytes(jpeg.read_bytes()[:-200])  # truncated, no end marker: header intact
    assert "truncated" in folders.check_image(str(jpeg))
    make_coop(tmp_path, "oxford_pets")
    bad = tmp_path / "oxford_pets" / "images" / "Abyssinian_0001.jpg"  # a training image
    _undecodable_png(bad)  # PIL opens by content, whatever the extension
    with pytest.raises(DataError, match="Abyssinian_0001.jpg.*broken data stream"):
        build_dataset(cfg("oxford_pets", tmp_path), seed=0)
    with caplog.at_level(logging.WARNING, logger="fedpgp_ray.data.folders"):
        ds = build_dataset(cfg("oxford_pets", tmp_path, skip_bad_images=True), seed=0)
    assert str(bad) not in ds.train.images and len(ds.train) == 3 and "skipped 1 bad image" in caplog.text


# -- data.download (converted from a fabricated torchvision tree; the network is never used) ------------

def _fake_torchvision_tree(name: str, staging: Path) -> None:
    if name == "caltech101":
        for cls in ("Faces", "accordion", "BACKGROUND_Google"):
            for i in range(4):
                write_image(staging / "caltech101" / "101_ObjectCategories" / cls / f"image_{i + 1:04d}.jpg", i)
    elif name == "oxford_pets":
        base = staging / "oxford-iiit-pet"
        for i, (iid, lab) in enumerate([("Abyssinian_1", 1), ("Abyssinian_2", 1), ("beagle_1", 5), ("beagle_2", 5)]):
            write_image(base / "images" / f"{iid}.jpg", i)
        (base / "annotations").mkdir(parents=True)
        (base / "annotations" / "trainval.txt").write_text("Abyssinian_1 1 1 1\nbeagle_1 5 2 3\n")
        (base / "annotations" / "test.txt").write_text("Abyssinian_2 1 1 1\nbeagle_2 5 2 3\n")
    elif name == "oxford_flowers":
        from scipy.io import savemat
        base = staging / "flowers-102"
        for i in range(1, 7):
            write_image(base / "jpg" / f"image_{i:05d}.jpg", i)
        savemat(str(base / "imagelabels.mat"), {"labels": np.array([[1, 1, 1, 3, 3, 3]])})
        savemat(str(base / "setid.mat"), {"trnid": np.array([[1, 4]]), "valid": np.array([[2, 5]]),
                                          "tstid": np.array([[3, 6]])})
    elif name == "food101":
        base = staging / "food-101"
        for cls in ("apple_pie", "baklava"):
            for i in range(2):
                write_image(base / "images" / cls / f"{i}.jpg", i)
        (base / "meta").mkdir(parents=True)
        (base / "meta" / "train.json").write_text(json.dumps({"apple_pie": ["apple_pie/0"], "baklava": ["baklava/0"]}))
        (base / "meta" / "test.json").write_text(json.dumps({"apple_pie": ["apple_pie/1"], "baklava": ["baklava/1"]}))
    elif name == "dtd":
        base = staging / "dtd" / "dtd"
        for cls in ("banded", "zigzagged"):
            for i in range(3):
                write_image(base / "images" / cls / f"{cls}_{i:04d}.jpg", i)
        (base / "labels").mkdir(parents=True)
        for key, i in (("train1", 0), ("val1", 1), ("test1", 2)):
            (base / "labels" / f"{key}.txt").write_text(f"banded/banded_{i:04d}.jpg\nzigzagged/zigzagged_{i:04d}.jpg\n")


DOWNLOADED = {"caltech101": (["accordion", "face"], 4, 2), "oxford_pets": (["abyssinian", "beagle"], 2, 2),
              "oxford_flowers": (["canterbury bells", "pink primrose"], 2, 2),
              "food101": (["apple pie", "baklava"], 2, 2), "dtd": (["banded", "zigzagged"], 2, 2)}


@pytest.mark.parametrize("name", sorted(DOWNLOADED))
def test_download_builds_coop_layout_from_torchvision_tree(tmp_path, monkeypatch, name):
    fetched = []
    # torchvision's Flowers102.classes, stubbed: importing torchvision costs seconds (checked separately)
    monkeypatch.setattr(coop, "flowers102_classnames", lambda: ["pink primrose", "hard-leaved pocket orchid",
                                                                "canterbury bells"])
    monkeypatch.setattr(coop, "fetch_with_torchvision",
                        lambda spec, staging: fetched.append(spec.name) or _fake_torchvision_tree(spec.name, staging))
    ds = build_dataset(cfg(name, tmp_path, download=True), seed=0)
    names, n_train, n_test = DOWNLOADED[name]
    assert fetched == [name]
    assert ds.classnames == names and (len(ds.train), len(ds.test)) == (n_train, n_test)
    spec = coop.SPECS[name]
    assert (tmp_path / spec.dirname / spec.generated_split).is_file()
    assert (tmp_path / spec.dirname / spec.image_dir).is_dir()
    build_dataset(cfg(name, tmp_path, download=True), seed=0)
    assert fetched == [name]  # the generated split is reused: no second download


def test_download_not_used_when_coop_split_exists(tmp_path, monkeypatch):
    make_coop(tmp_path, "dtd")
    monkeypatch.setattr(coop, "fetch_with_torchvision", lambda *a: pytest.fail("must not download"))
    assert build_dataset(cfg("dtd", tmp_path, download=True), seed=0).classnames == EXPECTED_NAMES["dtd"]


# -- CIFAR ----------------------------------------------------------------------------------------------

def _cifar_rows(labels: list[int], offset: int) -> np.ndarray:
    """Rows in CIFAR's layout (1024 R, 1024 G, 1024 B); pixel (0, 0) = (offset+i, 100, 200)."""
    data = np.zeros((len(labels), 3072), dtype=np.uint8)
    for i in range(len(labels)):
        data[i, 0], data[i, 1024], data[i, 2048] = offset + i, 100, 200
        data[i, 1023] = 7  # last red pixel: (31, 31)
    return data


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar10(root: Path) -> None:
    folder = root / "cifar-10-batches-py"
    for b in range(5):
        labels = [(2 * b) % 10, (2 * b + 1) % 10, (2 * b + 2) % 10, (2 * b + 3) % 10]
        _dump(folder / f"data_batch_{b + 1}", {"batch_label": f"training batch {b + 1} of 5", "labels": labels,
                                                "data": _cifar_rows(labels, 10 * b), "filenames": ["x.png"] * 4})
    test = list(range(10))
    _dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": test,
                                   "data": _cifar_rows(test, 100), "filenames": ["y.png"] * 10})
    _dump(folder / "batches.meta", {"label_names": CIFAR10_NAMES, "num_cases_per_batch": 4, "num_vis": 3072})


def test_cifar10_from_torchvision_pickles(tmp_path):
    make_cifar10(tmp_path)
    ds = build_dataset(cfg("cifar10", tmp_path), seed=0)
    assert ds.classnames == CIFAR10_NAMES
    assert ds.train.images.shape == (20, 32, 32, 3) and ds.train.images.dtype == np.uint8
    assert ds.test.images.shape == (10, 32, 32, 3)
    assert ds.train.images[5, 0, 0].tolist() == [10 + 1, 100, 200]  # HWC from CIFAR's CHW rows
    assert ds.train.images[5, 31, 31, 0] == 7
    assert ds.train.labels[:4].tolist() == [0, 1, 2, 3] and ds.test.labels.tolist() == list(range(10))
    assert ds.test.load(3).size == (32, 32)
    data = cfg("cifar10", tmp_path, partition="dirichlet", base_novel=False, shots=1000, beta=0.3)
    part = partition_dataset(ds, data, num_clients=2, seed=0)
    assert part.novel is None and part.train_classes == list(range(10))
    joined = np.concatenate([c.train_indices for c in part.clients])
    assert sorted(joined.tolist()) == list(range(20))  # all data, each image with exactly one client
    # data.root may also point at the batch folder itself
    assert build_dataset(cfg("cifar10", tmp_path / "cifar-10-batches-py"), seed=0).name == ds.name


def test_cifar100_names_sorted_and_cleaned(tmp_path):
    folder = tmp_path / "cifar-100-python"
    names = ["maple_tree", "apple", "aquarium_fish"]  # not alphabetical: labels must be remapped
    train, test = [0, 1, 2, 0], [2, 1, 0]
    _dump(folder / "train", {"fine_labels": train, "coarse_labels": [0] * 4, "data": _cifar_rows(train, 0)})
    _dump(folder / "test", {"fine_labels": test, "coarse_labels": [0] * 3, "data": _cifar_rows(test, 50)})
    _dump(folder / "meta", {"fine_label_names": names, "coarse_label_names": ["trees"]})
    ds = build_dataset(cfg("cifar100", tmp_path), seed=0)
    assert ds.classnames == ["apple", "aquarium fish", "maple tree"]
    assert [ds.classnames[y] for y in ds.train.labels] == ["maple tree", "apple", "aquarium fish", "maple tree"]
    assert [ds.classnames[y] for y in ds.test.labels] == ["aquarium fish", "apple", "maple tree"]


def test_cifar_errors(tmp_path):
    with pytest.raises(DataError, match=r"folder not found: .*cifar-10-batches-py.*expected layout"):
        build_dataset(cfg("cifar10", tmp_path), seed=0)
    make_cifar10(tmp_path)
    missing = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    missing.unlink()
    with pytest.raises(DataError, match=rf"file not found: {missing}.*data_batch_1"):
        build_dataset(cfg("cifar10", tmp_path), seed=0)
    missing.write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match=rf"{missing} is not a CIFAR python pickle"):
        build_dataset(cfg("cifar10", tmp_path), seed=0)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_pickle_with_foreign_objects_is_refused(tmp_path):
    make_cifar10(tmp_path)
    _dump(tmp_path / "cifar-10-batches-py" / "batches.meta", {"label_names": CIFAR10_NAMES, "x": _Evil()})
    with pytest.raises(DataError, match=r"not a CIFAR python pickle .*unexpected object"):
        build_dataset(cfg("cifar10", tmp_path), seed=0)


# -- domain-level datasets ----------------------------------------------------------------------------

def make_domains(root: Path, spec, per_class: int = 3, extra_class: str | None = None) -> None:
    for d, domain in enumerate(spec.domains):
        for c, cls in enumerate(spec.classes + ((extra_class,) if extra_class else ())):
            for i in range(per_class):
                write_image(root / domain / cls / f"{domain}_{cls}_{i}.png", seed=1000 * d + 10 * c + i)


def test_office_caltech10_layout_and_split(tmp_path):
    make_domains(tmp_path, OFFICE_CALTECH10)
    ds = build_dataset(cfg("office_caltech10", tmp_path), seed=0)
    assert ds.domains == ["amazon", "caltech", "dslr", "webcam"]
    assert ds.classnames == ["back pack", "bike", "calculator", "headphones", "keyboard", "laptop computer",
                             "monitor", "mouse", "mug", "projector"]
    assert len(ds.train) == 4 * 10 * 2 and len(ds.test) == 4 * 10 * 1  # 30% test of 3 -> 1
    for part in (ds.train, ds.test):
        for path, label, dom in zip(part.images, part.labels, part.domains):
            domain, cls = Path(path).parts[-3:-1]
            assert ds.domains[dom] == domain and ds.classnames[label] == cls.replace("_", " ")
    assert not set(ds.train.images) & set(ds.test.images)
    again = build_dataset(cfg("office_caltech10", tmp_path), seed=7)  # the split ignores the run seed
    assert again.test.images == ds.test.images and again.name == ds.name


def test_domain_partition_and_held_out_evaluation(tmp_path):
    make_domains(tmp_path, OFFICE_CALTECH10, per_class=5)
    data = cfg("office_caltech10", tmp_path, partition="domain", held_out_domain="dslr", shots=2)
    ds = build_dataset(data, seed=0)
    part = partition_dataset(ds, data, num_clients=3, seed=0)
    assert [c.domain for c in part.clients] == ["amazon", "caltech", "webcam"]
    held = ds.domains.index("dslr")
    for client in part.clients:
        d = ds.domains.index(client.domain)
        assert (ds.train.domains[client.train_indices] == d).all()
        assert np.bincount(ds.train.labels[client.train_indices]).tolist() == [2] * 10  # shots per class
        assert (ds.test.domains[client.local.indices] == d).all()
        assert sorted(client.local.indices.tolist()) == np.flatnonzero(ds.test.domains == d).tolist()
    assert part.novel_kind == "domain"
    assert part.novel.indices.tolist() == np.flatnonzero(ds.test.domains == held).tolist()
    assert part.base.indices.tolist() == np.flatnonzero(ds.test.domains != held).tolist()
    assert part.novel.classes == part.train_classes == list(range(10))
    # Dirichlet label skew inside a domain: two clients per training domain, disjoint shares of it
    skew = partition_dataset(ds, cfg("office_caltech10", tmp_path, partition="domain", held_out_domain="dslr",
                                     shots=100, beta=0.5), num_clients=6, seed=0)
    assert [c.domain for c in skew.clients] == ["amazon", "amazon", "caltech", "caltech", "webcam", "webcam"]
    for a, b in zip(skew.clients[::2], skew.clients[1::2]):
        assert not set(a.train_indices.tolist()) & set(b.train_indices.tolist())
        d = ds.domains.index(a.domain)
        assert sorted(a.train_indices.tolist() + b.train_indices.tolist()) == \
            np.flatnonzero(ds.train.domains == d).tolist()


def test_domainnet_official_lists_and_extra_classes(tmp_path):
    make_domains(tmp_path, DOMAINNET10, per_class=2, extra_class="aircraft_carrier")
    lines = {"train": [], "test": []}
    for c, cls in enumerate(DOMAINNET10.classes + ("aircraft_carrier",)):
        lines["train"].append(f"clipart/{cls}/clipart_{cls}_0.png {c}")
        lines["test"].append(f"clipart/{cls}/clipart_{cls}_1.png {c}")
    for key in lines:
        (tmp_path / f"clipart_{key}.txt").write_text("\n".join(lines[key]) + "\n")
    ds = build_dataset(cfg("domainnet10", tmp_path), seed=0)
    assert ds.domains == ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
    assert ds.classnames == ["bird", "feather", "headphones", "ice cream", "teapot", "tiger", "whale", "windmill",
                             "wine glass", "zebra"]
    assert not any("aircraft_carrier" in p for p in ds.train.images + ds.test.images)
    clip_train = [Path(p).name for p, d in zip(ds.train.images, ds.train.domains) if d == 0]
    assert sorted(clip_train) == sorted(f"clipart_{c}_0.png" for c in DOMAINNET10.classes)
    clip_test = [Path(p).name for p, d in zip(ds.test.images, ds.test.domains) if d == 0]
    assert sorted(clip_test) == sorted(f"clipart_{c}_1.png" for c in DOMAINNET10.classes)
    assert len(ds.train) == 6 * 10 and len(ds.test) == 6 * 10  # other domains: seeded 1/1 of 2 images
    sub = build_dataset(cfg("domainnet10", tmp_path, domains=["sketch", "real"]), seed=0)
    assert sub.domains == ["real", "sketch"] and len(sub.test) == 20


def test_domain_errors(tmp_path):
    make_domains(tmp_path, OFFICE_CALTECH10, per_class=2)
    shutil.rmtree(tmp_path / "webcam")
    with pytest.raises(DataError, match=rf"domain folder not found: {tmp_path / 'webcam'}.*expected layout"):
        build_dataset(cfg("office_caltech10", tmp_path), seed=0)
    assert build_dataset(cfg("office_caltech10", tmp_path, domains=["amazon", "dslr"]), seed=0).domains == \
        ["amazon", "dslr"]
    with pytest.raises(DataError, match=r"data.domains: 'clipart' is not a domain of office_caltech10"):
        build_dataset(cfg("office_caltech10", tmp_path, domains=["clipart"]), seed=0)
    with pytest.raises(DataError, match=r"held_out_domain 'caltech' is not among the domains used"):
        build_dataset(cfg("office_caltech10", tmp_path, domains=["amazon", "dslr"], held_out_domain="caltech"),
                      seed=0)
    folder = tmp_path / "dslr" / "mug"
    for f in folder.iterdir():
        f.unlink()
    with pytest.raises(DataError, match=rf"empty class folder {folder}.*expected layout"):
        build_dataset(cfg("office_caltech10", tmp_path, domains=["amazon", "dslr"]), seed=0)
    shutil.rmtree(folder)
    with pytest.raises(DataError, match=rf"class folder not found: {folder}"):
        build_dataset(cfg("office_caltech10", tmp_path, domains=["amazon", "dslr"]), seed=0)
    with pytest.raises(DataError, match=r"no domain folder .* found in"):
        build_dataset(cfg("office_caltech10", tmp_path / "dslr"), seed=0)


def test_domainnet_half_official_split_is_an_error(tmp_path):
    make_domains(tmp_path, DOMAINNET10, per_class=2)
    (tmp_path / "sketch_train.txt").write_text("sketch/bird/sketch_bird_0.png 0\n")
    with pytest.raises(DataError, match=r"found .*sketch_train.txt but not .*sketch_test.txt"):
        build_dataset(cfg("domainnet10", tmp_path), seed=0)


def test_domain_truncated_png_is_reported_or_skipped(tmp_path, caplog):
    make_domains(tmp_path, OFFICE_CALTECH10, per_class=3)
    bad = tmp_path / "caltech" / "bike" / "caltech_bike_1.png"
    write_image(bad, size=64)
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError, match=rf"{bad}"):
        build_dataset(cfg("office_caltech10", tmp_path), seed=0)
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(cfg("office_caltech10", tmp_path, skip_bad_images=True), seed=0)
    assert len(ds.train) + len(ds.test) == 4 * 10 * 3 - 1 and str(bad) in caplog.text


# -- registry, determinism, configs ---------------------------------------------------------------------

ALL_DATASETS = ["caltech101", "cifar10", "cifar100", "domainnet10", "dtd", "food101", "office_caltech10",
                "oxford_flowers", "oxford_pets"]


def test_registry_names_and_unknown_dataset():
    assert set(ALL_DATASETS) <= set(available_datasets())
    with pytest.raises(DataError) as err:
        build_dataset(DataConfig(dataset="imagenet"), seed=0)
    msg = str(err.value)
    assert "unknown data.dataset 'imagenet'" in msg and all(n in msg for n in ALL_DATASETS)


_DUMP = """
import json, sys
from fedpgp_ray.config import DataConfig
from fedpgp_ray.data.registry import build_dataset
out = {}
for name, root in json.loads(sys.argv[1]).items():
    ds = build_dataset(DataConfig(dataset=name, root=root), seed=0)
    out[name] = [ds.name, ds.classnames, ds.domains, ds.train.images, ds.train.labels.tolist(), ds.test.labels.tolist()]
print(json.dumps(out))
"""


def test_label_maps_do_not_depend_on_hash_seed(tmp_path):
    make_domains(tmp_path / "office", OFFICE_CALTECH10, per_class=2)
    make_domains(tmp_path / "dn", DOMAINNET10, per_class=2)
    make_coop(tmp_path / "coop", "caltech101")
    roots = json.dumps({"office_caltech10": str(tmp_path / "office"), "domainnet10": str(tmp_path / "dn"),
                        "caltech101": str(tmp_path / "coop")})
    outputs = []
    for hash_seed in ("0", "1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO),
               folders.CACHE_ENV: str(tmp_path / f"cache{hash_seed}")}
        res = subprocess.run([sys.executable, "-c", _DUMP, roots], env=env, capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stderr
        outputs.append(json.loads(res.stdout))
    assert outputs[0] == outputs[1] == outputs[2]
    assert outputs[0]["office_caltech10"][1][0] == "back pack"


PAPER = REPO / "configs" / "paper"
PAPER_FILES = {f"{d}_b2n_{s}shot.yaml" for d in ("caltech101", "oxford_pets", "oxford_flowers", "food101", "dtd")
               for s in (8, 16)} | {"cifar10_dirichlet.yaml", "cifar100_dirichlet.yaml",
                                    "office_caltech10_domain.yaml", "domainnet10_domain.yaml"}


def test_paper_configs_load_and_follow_the_reference_protocol():
    assert {p.name for p in PAPER.glob("*.yaml")} == PAPER_FILES
    registered = available_datasets()
    for path in sorted(PAPER.glob("*.yaml")):
        c = load_config(path)
        assert c.data.dataset in registered and c.data.dataset != "world", path.name
        assert (c.model.name, c.model.pretrained) == ("ViT-B-16", "openai"), path.name
        assert (c.train.lr, c.train.momentum, c.train.weight_decay) == (0.001, 0.9, 5e-4), path.name
        assert (c.algorithm.name, c.algorithm.n_ctx, c.algorithm.rank, c.algorithm.mu, c.algorithm.tau) == \
            ("fedpgp", 16, 8, 0.5, 0.5), path.name
        assert c.data.root == "~/data" and c.data.augment_views > 0 and not c.data.download, path.name
        assert Path(c.output_dir).is_absolute() and "paper" in c.output_dir, path.name
        if "_b2n_" in path.name:
            shots = int(path.stem.split("_")[-1].removesuffix("shot"))
            assert c.data.shots == c.train.batch_size == shots and c.data.partition == "pathological"
            assert c.data.base_novel and (c.train.rounds, c.train.local_epochs) == (25, 2)
            assert (c.federation.num_clients, c.federation.client_fraction) == (10, 1.0)
        elif "dirichlet" in path.name:
            assert (c.data.partition, c.data.beta, c.data.base_novel) == ("dirichlet", 0.3, False)
            assert (c.federation.num_clients, c.federation.client_fraction, c.train.rounds) == (100, 0.1, 150)
        else:
            spec = OFFICE_CALTECH10 if c.data.dataset == "office_caltech10" else DOMAINNET10
            assert c.data.partition == "domain" and c.data.held_out_domain in spec.domains
            assert c.federation.num_clients == len(spec.domains) - 1 and not c.data.base_novel
