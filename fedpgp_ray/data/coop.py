"""The five category-level datasets in CoOp's on-disk layout (image folders + `split_zhou_*.json`).

    <data.root>/caltech-101/101_ObjectCategories/<class>/*.jpg   + split_zhou_Caltech101.json
    <data.root>/oxford_pets/images/*.jpg                         + split_zhou_OxfordPets.json
    <data.root>/oxford_flowers/jpg/*.jpg                         + split_zhou_OxfordFlowers.json
    <data.root>/food-101/images/<class>/*.jpg                    + split_zhou_Food101.json
    <data.root>/dtd/images/<class>/*.jpg                         + split_zhou_DescribableTextures.json

A split file maps "train", "val" and "test" to [relative_path, label, classname] rows; paths are
relative to the image folder. As in CoOp and the reference, few-shot training images are drawn
from `train` only (in `partition.py`; `val` is CoOp's validation set, left out unless
`data.few_shot_pool: train+val`), and test is the test set.

Labels: with `data.class_order: name` (default) label i is the i-th of the sorted cleaned class
names (SPEC: sort, first half base). `class_order: coop` keeps the split file's label ids, which
reproduces the reference's base/novel split exactly: CoOp numbers Caltech101 by case-sensitive
folder name (Faces, Leopards, Motorbikes before accordion) and Flowers102 in Oxford's category
order; on Pets, Food101 and DTD both orders coincide.

`data.download: true` (internet needed; never used by the tests) lets torchvision fetch a
dataset whose split file is missing, links its image folder into CoOp's layout and writes
`split_fedpgp_<Name>.json` built from the official split (CoOp's own split files are not
downloadable by torchvision); a CoOp split file, when present, always wins.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpgp_ray.config import DataConfig
from fedpgp_ray.data.base import ClassificationDataset, DataError, ImageSplit, register_dataset
from fedpgp_ray.data.folders import (SplitEntry, clean_classname, data_root, dataset_identity, layout_error,
                                     list_images, list_subfolders, read_split_file, verify_images)

log = logging.getLogger(__name__)

COOP_DATASETS_URL = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


@dataclass(frozen=True)
class CoopSpec:
    """Where one CoOp dataset lives under data.root and how its class names are cleaned.

    class_folders: images sit in one folder per class (the first component of each relative path).
    renames / ignored: CoOp's Caltech101 folder renames and the folders it leaves out.
    """
    name: str
    dirname: str
    image_dir: str
    split_file: str
    class_folders: bool
    renames: dict[str, str] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()

    @property
    def generated_split(self) -> str:
        return self.split_file.replace("split_zhou_", "split_fedpgp_")

    def expected(self) -> str:
        image = "<class>/<image>.jpg" if self.class_folders else "<image>.jpg"
        return (f"<data.root>/{self.dirname}/{self.image_dir}/{image} and "
                f"<data.root>/{self.dirname}/{self.split_file} (CoOp's split file, {COOP_DATASETS_URL})")


CALTECH_RENAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")

SPECS: dict[str, CoopSpec] = {s.name: s for s in (
    CoopSpec("caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", True,
             CALTECH_RENAMES, CALTECH_IGNORED),
    CoopSpec("oxford_pets", "oxford_pets", "images", "split_zhou_OxfordPets.json", False),
    CoopSpec("oxford_flowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", False),
    CoopSpec("food101", "food-101", "images", "split_zhou_Food101.json", True),
    CoopSpec("dtd", "dtd", "images", "split_zhou_DescribableTextures.json", True),
)}


def _class_order(spec: CoopSpec, split_path: Path, rows: list[SplitEntry], order: str) -> list[str]:
    """Cleaned class names in label order, after checking that split labels and names agree."""
    by_label: dict[int, str] = {}
    by_name: dict[str, int] = {}
    for _, label, raw in rows:
        name = clean_classname(raw, spec.renames)
        problem = None
        if by_label.setdefault(label, name) != name:
            problem = f"label {label} is used for both '{by_label[label]}' and '{name}'"
        elif by_name.setdefault(name, label) != label:
            problem = f"class '{name}' has two labels, {by_name[name]} and {label}"
        if problem:
            raise DataError(f"{spec.name}: split file {split_path} is inconsistent: {problem}; use CoOp's "
                            f"original file ({COOP_DATASETS_URL})")
    if order == "coop":
        return [by_label[k] for k in sorted(by_label)]
    return sorted(by_name)


def _check_class_folders(spec: CoopSpec, image_dir: Path, split_path: Path, rows: list[SplitEntry]) -> None:
    """Every class folder the split file refers to exists and holds images."""
    folders: dict[str, str] = {}
    for rel, _, raw in rows:
        folders.setdefault(rel.replace("\\", "/").split("/", 1)[0], clean_classname(raw, spec.renames))
    for folder in sorted(folders):
        path = image_dir / folder
        if not path.is_dir():
            raise layout_error(f"{spec.name}: class '{folders[folder]}' in split file {split_path} has no "
                               f"folder: {path} does not exist", spec.expected())
        if not list_images(path):
            raise layout_error(f"{spec.name}: empty class folder {path} (class '{folders[folder]}' of split "
                               f"file {split_path})", spec.expected())


def load_coop(spec: CoopSpec, cfg: DataConfig) -> ClassificationDataset:
    """Build a CoOp-layout dataset (see module docstring); every error names the path and the layout."""
    root = data_root(cfg, spec.name, spec.expected())
    ddir = root / spec.dirname
    split_path, generated = ddir / spec.split_file, ddir / spec.generated_split
    if cfg.download and not split_path.is_file() and not generated.is_file():
        download(spec, ddir)
    if not ddir.is_dir():
        raise layout_error(f"{spec.name}: dataset folder not found: {ddir}", spec.expected())
    image_dir = ddir / spec.image_dir
    if not image_dir.is_dir():
        raise layout_error(f"{spec.name}: image folder not found: {image_dir}", spec.expected())
    if not split_path.is_file() and generated.is_file():
        log.warning("%s: %s not found, using %s (built from the official split, not CoOp's)",
                    spec.name, split_path, generated)
        split_path = generated
    if not split_path.is_file():
        raise layout_error(f"{spec.name}: split file not found: {split_path} (download CoOp's file from "
                           f"{COOP_DATASETS_URL}, or set data.download: true to build one from the "
                           f"official split)", spec.expected())
    split = read_split_file(split_path, spec.name, spec.expected())
    keep_row = (lambda rel: rel.split("/", 1)[0] not in spec.ignored) if spec.ignored else (lambda rel: True)
    pool = split["train"] + (split["val"] if cfg.few_shot_pool == "train+val" else [])
    train_rows = [r for r in pool if keep_row(r[0])]
    test_rows = [r for r in split["test"] if keep_row(r[0])]
    rows = train_rows + test_rows
    classnames = _class_order(spec, split_path, rows, cfg.class_order)
    if spec.class_folders:
        _check_class_folders(spec, image_dir, split_path, rows)
    index = {name: i for i, name in enumerate(classnames)}

    def paths_labels(part: list[SplitEntry]) -> tuple[list[str], np.ndarray]:
        return ([str(image_dir / rel) for rel, _, _ in part],
                np.array([index[clean_classname(raw, spec.renames)] for _, _, raw in part], dtype=np.int64))

    train_paths, train_labels = paths_labels(train_rows)
    test_paths, test_labels = paths_labels(test_rows)
    all_paths = train_paths + test_paths
    if not any(os.path.isfile(p) for p in all_paths):  # stops at the first file found
        raise layout_error(f"{spec.name}: none of the {len(all_paths)} images listed in {split_path} exist "
                           f"under {image_dir}", spec.expected())
    keep = verify_images(all_paths, skip_bad=cfg.skip_bad_images, dataset=spec.name)
    k_train, k_test = keep[:len(train_paths)], keep[len(train_paths):]
    train_paths = [p for p, k in zip(train_paths, k_train) if k]
    test_paths = [p for p, k in zip(test_paths, k_test) if k]
    train_labels, test_labels = train_labels[k_train], test_labels[k_test]
    name = dataset_identity(spec.name, classnames, [(train_paths, train_labels), (test_paths, test_labels)],
                            extra=cfg.class_order)
    return ClassificationDataset(name, classnames, ImageSplit(train_paths, train_labels),
                                 ImageSplit(test_paths, test_labels))


def _register(spec: CoopSpec) -> None:
    @register_dataset(spec.name)
    def build(cfg: DataConfig, seed: int) -> ClassificationDataset:  # seed unused: the split file is fixed
        return load_coop(spec, cfg)
    build.__name__ = f"build_{spec.name}"
    build.__doc__ = f"{spec.name}: CoOp layout {spec.expected()}."


for _spec in SPECS.values():
    _register(_spec)


# -- data.download: true ----------------------------------------------------------------------------

def download(spec: CoopSpec, ddir: Path) -> None:
    """Fetch with torchvision into `<ddir>/torchvision`, then convert to CoOp's layout (needs internet)."""
    log.info("%s: downloading with torchvision into %s", spec.name, ddir / "torchvision")
    try:
        fetch_with_torchvision(spec, ddir / "torchvision")
    except Exception as err:  # network, disk or archive errors from torchvision
        raise DataError(f"{spec.name}: data.download failed ({type(err).__name__}: {err}); download the data "
                        f"yourself into this layout: {spec.expected()} (see docs/DATASETS.md)") from None
    convert_torchvision_layout(spec, ddir)


def fetch_with_torchvision(spec: CoopSpec, staging: Path) -> None:
    """torchvision's own download (network); nothing else in this module touches the network."""
    import torchvision.datasets as tvd

    staging.mkdir(parents=True, exist_ok=True)
    if spec.name == "caltech101":
        tvd.Caltech101(str(staging), download=True)
    elif spec.name == "oxford_pets":
        tvd.OxfordIIITPet(str(staging), split="trainval", download=True)
    elif spec.name == "oxford_flowers":
        tvd.Flowers102(str(staging), split="train", download=True)
    elif spec.name == "food101":
        tvd.Food101(str(staging), split="train", download=True)
    elif spec.name == "dtd":
        tvd.DTD(str(staging), split="train", download=True)
    else:  # pragma: no cover - every spec is listed above
        raise DataError(f"{spec.name}: no torchvision downloader")


# torchvision's folder (under <ddir>/torchvision) holding the images of each dataset.
TORCHVISION_IMAGES = {
    "caltech101": "caltech101/101_ObjectCategories",
    "oxford_pets": "oxford-iiit-pet/images",
    "oxford_flowers": "flowers-102/jpg",
    "food101": "food-101/images",
    "dtd": "dtd/dtd/images",
}
GENERATED_SPLIT_SEED = 1  # Caltech101 has no official split: CoOp's 50/20/30 per class, seeded


def flowers102_classnames() -> list[str]:
    """The 102 category names in Oxford's label order (torchvision ships them; CoOp's cat_to_name.json)."""
    from torchvision.datasets import Flowers102

    return list(Flowers102.classes)


def _read_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _official_split(spec: CoopSpec, staging: Path, image_dir: Path) -> dict[str, list[list]]:
    """CoOp-format rows from the official metadata of the torchvision download."""
    split: dict[str, list[list]] = {"train": [], "val": [], "test": []}
    if spec.name == "caltech101":
        folders = [f for f in list_subfolders(image_dir) if f not in spec.ignored]  # case-sensitive, as CoOp
        rng = np.random.default_rng(GENERATED_SPLIT_SEED)
        for label, folder in enumerate(folders):
            files = [p.name for p in list_images(image_dir / folder)]
            files = [files[i] for i in rng.permutation(len(files))]
            n_train, n_val = round(0.5 * len(files)), round(0.2 * len(files))
            for key, part in (("train", files[:n_train]), ("val", files[n_train:n_train + n_val]),
                              ("test", files[n_train + n_val:])):
                split[key] += [[f"{folder}/{f}", label, clean_classname(folder, spec.renames)] for f in part]
    elif spec.name == "oxford_pets":
        ann = staging / "oxford-iiit-pet" / "annotations"
        for key, fname in (("train", "trainval.txt"), ("test", "test.txt")):
            for line in _read_lines(ann / fname):
                image_id, label = line.split()[:2]
                breed = "_".join(image_id.split("_")[:-1]).lower()
                split[key].append([f"{image_id}.jpg", int(label) - 1, breed])
    elif spec.name == "oxford_flowers":
        from scipy.io import loadmat

        names = flowers102_classnames()
        base = staging / "flowers-102"
        labels = loadmat(str(base / "imagelabels.mat"), squeeze_me=True)["labels"]
        ids = loadmat(str(base / "setid.mat"), squeeze_me=True)
        for key, mat_key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
            for image_id in np.atleast_1d(ids[mat_key]).tolist():
                label = int(labels[image_id - 1]) - 1
                split[key].append([f"image_{image_id:05d}.jpg", label, names[label]])
    elif spec.name == "food101":
        meta = staging / "food-101" / "meta"
        for key in ("train", "test"):
            by_class = json.loads((meta / f"{key}.json").read_text())
            classes = sorted(by_class)
            for label, cls in enumerate(classes):
                split[key] += [[f"{rel}.jpg", label, cls] for rel in by_class[cls]]
    elif spec.name == "dtd":
        labels_dir = staging / "dtd" / "dtd" / "labels"
        classes = list_subfolders(image_dir)
        for key, fname in (("train", "train1.txt"), ("val", "val1.txt"), ("test", "test1.txt")):
            for rel in _read_lines(labels_dir / fname):
                cls = rel.split("/", 1)[0]
                split[key].append([rel, classes.index(cls), cls])
    return split


def convert_torchvision_layout(spec: CoopSpec, ddir: Path) -> Path:
    """Link torchvision's image folder into CoOp's layout and write `split_fedpgp_<Name>.json`."""
    staging = ddir / "torchvision"
    source = staging / TORCHVISION_IMAGES[spec.name]
    image_dir = ddir / spec.image_dir
    if not source.is_dir():
        raise layout_error(f"{spec.name}: torchvision download has no image folder {source}", spec.expected())
    if not image_dir.exists():
        try:
            image_dir.symlink_to(os.path.relpath(source, ddir), target_is_directory=True)
        except OSError as err:
            raise DataError(f"{spec.name}: cannot link {image_dir} -> {source} ({err}): move that folder to "
                            f"{image_dir} yourself") from None
    try:
        split = _official_split(spec, staging, image_dir)
    except (OSError, KeyError, ValueError, IndexError) as err:
        raise DataError(f"{spec.name}: the torchvision download under {staging} is incomplete "
                        f"({type(err).__name__}: {err}): delete {staging} and download again") from None
    out = ddir / spec.generated_split
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(split))
    tmp.replace(out)
    log.info("%s: wrote %s (%d train, %d val, %d test)", spec.name, out, len(split["train"]),
             len(split["val"]), len(split["test"]))
    return out
