"""Dataset registry: config `data.dataset` -> ClassificationDataset.

Importing a dataset module registers its builders (`@register_dataset`). Names:
world (procedural, offline default), caltech101, oxford_pets, oxford_flowers, food101, dtd
(CoOp layouts, `coop.py`), cifar10, cifar100 (`cifar.py`), office_caltech10, domainnet10
(`domains.py`). See docs/DATASETS.md for what each needs on disk.
"""
from __future__ import annotations

import importlib

from fedpgp_ray.config import DataConfig
from fedpgp_ray.data.base import DATASETS, ClassificationDataset, DataError

_MODULES = ("fedpgp_ray.data.world", "fedpgp_ray.data.coop", "fedpgp_ray.data.cifar", "fedpgp_ray.data.domains")


def _import_all() -> None:
    for name in _MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # only a dataset module that does not exist (yet) is skipped
                raise


def available_datasets() -> list[str]:
    """Every registered dataset name, sorted."""
    _import_all()
    return sorted(DATASETS)


def build_dataset(cfg: DataConfig, seed: int) -> ClassificationDataset:
    """Build the dataset named by `cfg.dataset`; an unknown name is a DataError listing the choices."""
    _import_all()
    if cfg.dataset not in DATASETS:
        raise DataError(f"unknown data.dataset '{cfg.dataset}': choose one of {', '.join(sorted(DATASETS))}")
    return DATASETS[cfg.dataset](cfg, seed)
