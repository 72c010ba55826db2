"""CIFAR-10 and CIFAR-100 from torchvision's on-disk format (the official python pickles).

    <data.root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    <data.root>/cifar-100-python/{train, test, meta}

`data.root` may also point at the batch folder itself. Images stay in memory as uint8
[n, 32, 32, 3]. Class names are cleaned (underscores to spaces) and sorted; labels are
positions in that list (the official label order is already alphabetical).
`data.download: true` lets torchvision fetch the archive first (internet needed).

The reference protocol (SPEC) uses all training images with a Dirichlet(beta = 0.3)
label skew over 100 clients; see configs/paper/cifar*_dirichlet.yaml.
"""
from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpgp_ray.config import DataConfig
from fedpgp_ray.data.base import ClassificationDataset, DataError, ImageSplit, register_dataset
from fedpgp_ray.data.folders import clean_classname, data_root, layout_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CifarSpec:
    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    names_key: str
    labels_key: str

    def expected(self) -> str:
        files = ", ".join(self.train_files + self.test_files + (self.meta_file,))
        return f"<data.root>/{self.folder}/{{{files}}} (torchvision's CIFAR format)"


CIFAR10 = CifarSpec("cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                    ("test_batch",), "batches.meta", "label_names", "labels")
CIFAR100 = CifarSpec("cifar100", "cifar-100-python", ("train",), ("test",), "meta", "fine_label_names",
                     "fine_labels")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The CIFAR pickles hold dicts of lists, strings and numpy arrays: refuse any other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module.split(".")[0] == "numpy" and name in {"_reconstruct", "ndarray", "dtype", "_frombuffer",
                                                          "scalar"}) or (module in ("_codecs", "codecs")
                                                                          and name == "encode"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def _load_pickle(path: Path, spec: CifarSpec) -> dict[str, Any]:
    if not path.is_file():
        raise layout_error(f"{spec.name}: file not found: {path}", spec.expected())
    try:
        with open(path, "rb") as fh:
            data = _NumpyOnlyUnpickler(fh, encoding="latin1").load()
    except Exception as err:  # truncated or foreign files raise many types
        raise DataError(f"{spec.name}: {path} is not a CIFAR python pickle ({type(err).__name__}: {err}): "
                        f"replace it with the file from the official archive, or delete the folder and set "
                        f"data.download: true") from None
    if not isinstance(data, dict):
        raise DataError(f"{spec.name}: {path} holds a {type(data).__name__}, expected a dict (CIFAR format)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in data.items()}


def _field(data: dict[str, Any], key: str, path: Path, spec: CifarSpec) -> Any:
    if key not in data:
        raise DataError(f"{spec.name}: {path} has no '{key}' entry (keys: {', '.join(sorted(data))}); "
                        f"is it a file of the other CIFAR version?")
    return data[key]


def _read_split(folder: Path, files: tuple[str, ...], spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for fname in files:
        path = folder / fname
        batch = _load_pickle(path, spec)
        raw = np.asarray(_field(batch, "data", path, spec))
        lab = np.asarray(_field(batch, spec.labels_key, path, spec), dtype=np.int64)
        if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != 3 * 32 * 32 or len(raw) != len(lab):
            raise DataError(f"{spec.name}: {path}: 'data' must be uint8 [n, 3072] with one label per row, got "
                            f"{raw.dtype} {list(raw.shape)} and {len(lab)} labels")
        images.append(raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _batch_folder(cfg: DataConfig, spec: CifarSpec) -> Path:
    if cfg.download and cfg.root is not None:
        root = Path(cfg.root).expanduser()
        if not (root / spec.folder / spec.meta_file).is_file() and not (root / spec.meta_file).is_file():
            _download(spec, root)
    root = data_root(cfg, spec.name, spec.expected())
    if (root / spec.meta_file).is_file() and not (root / spec.folder).is_dir():
        return root  # data.root points at the batch folder itself
    folder = root / spec.folder
    if not folder.is_dir():
        raise layout_error(f"{spec.name}: folder not found: {folder}", spec.expected())
    return folder


def _download(spec: CifarSpec, root: Path) -> None:
    import torchvision.datasets as tvd

    log.info("%s: downloading with torchvision into %s", spec.name, root)
    cls = tvd.CIFAR10 if spec is CIFAR10 else tvd.CIFAR100
    try:
        root.mkdir(parents=True, exist_ok=True)
        cls(str(root), train=True, download=True)
    except Exception as err:  # network or disk errors
        raise DataError(f"{spec.name}: data.download failed ({type(err).__name__}: {err}); download the python "
                        f"version of the dataset yourself: {spec.expected()}") from None


def load_cifar(spec: CifarSpec, cfg: DataConfig) -> ClassificationDataset:
    folder = _batch_folder(cfg, spec)
    meta_path = folder / spec.meta_file
    raw_names = [n.decode("latin1") if isinstance(n, bytes) else str(n)
                 for n in _field(_load_pickle(meta_path, spec), spec.names_key, meta_path, spec)]
    cleaned = [clean_classname(n) for n in raw_names]
    if len(set(cleaned)) != len(cleaned):
        raise DataError(f"{spec.name}: {meta_path} lists duplicate class names")
    classnames = sorted(cleaned)
    remap = np.array([classnames.index(n) for n in cleaned], dtype=np.int64)
    train_x, train_y = _read_split(folder, spec.train_files, spec)
    test_x, test_y = _read_split(folder, spec.test_files, spec)
    for y, what in ((train_y, "training"), (test_y, "test")):
        if y.size and (y.min() < 0 or y.max() >= len(raw_names)):
            raise DataError(f"{spec.name}: {what} labels outside 0..{len(raw_names) - 1} in {folder}")
    digest = hashlib.sha256()
    for arr in (train_x, train_y, test_x, test_y):
        digest.update(np.ascontiguousarray(arr).data)
    name = f"{spec.name}-{digest.hexdigest()[:16]}"
    return ClassificationDataset(name, classnames, ImageSplit(train_x, remap[train_y]),
                                 ImageSplit(test_x, remap[test_y]))


@register_dataset("cifar10")
def build_cifar10(cfg: DataConfig, seed: int) -> ClassificationDataset:
    """CIFAR-10 (10 classes, 50000 train / 10000 test images)."""
    return load_cifar(CIFAR10, cfg)


@register_dataset("cifar100")
def build_cifar100(cfg: DataConfig, seed: int) -> ClassificationDataset:
    """CIFAR-100 with its 100 fine labels."""
    return load_cifar(CIFAR100, cfg)
