"""Domain-level datasets in plain folder layouts: Office-Caltech10 and the 10-class DomainNet subset.

    <data.root>/<domain>/<class>/<image>        (or <data.root>/office_caltech_10/... , .../domainnet/...)

Office-Caltech10: domains amazon, caltech, dslr, webcam; classes back_pack, bike, calculator,
headphones, keyboard, laptop_computer, monitor, mouse, mug, projector.
DomainNet-10 (FedBN's subset): domains clipart, infograph, painting, quickdraw, real, sketch;
classes bird, feather, headphones, ice_cream, teapot, tiger, whale, windmill, wine_glass, zebra.
Other class folders (e.g. the rest of DomainNet's 345) are ignored.

Class and domain lists are fixed tuples, sorted; labels are positions in the sorted cleaned
class names (never set order). `ImageSplit.domains` indexes `ClassificationDataset.domains`.

Train/test: DomainNet's official `<domain>_train.txt` / `<domain>_test.txt` (next to the
domain folders) are used when present. Otherwise each (domain, class) folder is split with
a fixed seed, independent of the experiment seed: 30% test (at least one image when the
class has two or more), 70% train. Few-shot sampling happens later, in the partition.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpgp_ray.config import DataConfig
from fedpgp_ray.data.base import ClassificationDataset, DataError, ImageSplit, register_dataset
from fedpgp_ray.data.folders import (IMAGE_EXTENSIONS, class_folder_images, clean_classname, data_root,
                                     dataset_identity, layout_error, verify_images)

log = logging.getLogger(__name__)

TEST_FRACTION = 0.3
SPLIT_SEED = 0  # the per-domain train/test split never changes with the experiment seed


@dataclass(frozen=True)
class DomainSpec:
    name: str
    subdir: str  # accepted alternative: the domains live in <data.root>/<subdir>/
    domains: tuple[str, ...]
    classes: tuple[str, ...]
    official_lists: bool = False  # <domain>_train.txt / <domain>_test.txt (DomainNet)

    def expected(self) -> str:
        lists = " (+ optional <domain>_train.txt, <domain>_test.txt)" if self.official_lists else ""
        return (f"<data.root>/<domain>/<class>/<image> with domains {', '.join(self.domains)} and class folders "
                f"{', '.join(self.classes)}{lists}")


OFFICE_CALTECH10 = DomainSpec(
    "office_caltech10", "office_caltech_10", ("amazon", "caltech", "dslr", "webcam"),
    ("back_pack", "bike", "calculator", "headphones", "keyboard", "laptop_computer", "monitor", "mouse", "mug",
     "projector"))
DOMAINNET10 = DomainSpec(
    "domainnet10", "domainnet", ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
    ("bird", "feather", "headphones", "ice_cream", "teapot", "tiger", "whale", "windmill", "wine_glass", "zebra"),
    official_lists=True)


def _dataset_dir(spec: DomainSpec, root: Path) -> Path:
    if any((root / d).is_dir() for d in spec.domains):
        return root
    if (root / spec.subdir).is_dir():
        return root / spec.subdir
    raise layout_error(f"{spec.name}: no domain folder ({', '.join(spec.domains)}) found in {root} or "
                       f"{root / spec.subdir}", spec.expected())


def _selected_domains(spec: DomainSpec, cfg: DataConfig, ddir: Path) -> list[str]:
    wanted = list(cfg.domains) or list(spec.domains)
    for d in wanted:
        if d not in spec.domains:
            raise DataError(f"data.domains: '{d}' is not a domain of {spec.name}: choose from "
                            f"{', '.join(spec.domains)} (or [] for all)")
    domains = sorted(dict.fromkeys(wanted))
    for d in domains:
        if not (ddir / d).is_dir():
            raise layout_error(f"{spec.name}: domain folder not found: {ddir / d}", spec.expected())
    if cfg.held_out_domain is not None and cfg.held_out_domain not in domains:
        raise DataError(f"data.held_out_domain '{cfg.held_out_domain}' is not among the domains used "
                        f"({', '.join(domains)}): choose one of them or null")
    return domains


def _seeded_split(spec: DomainSpec, ddir: Path, domain: str) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    train, test = [], []
    for cls in spec.classes:
        images = class_folder_images(ddir / domain / cls, spec.name, spec.expected())
        rng = np.random.default_rng([SPLIT_SEED, spec.domains.index(domain), spec.classes.index(cls)])
        order = rng.permutation(len(images))
        n = len(images)
        n_test = min(max(round(TEST_FRACTION * n), 1), n - 1) if n >= 2 else 0
        test += [(images[i], cls) for i in sorted(order[:n_test])]
        train += [(images[i], cls) for i in sorted(order[n_test:])]
    return train, test


def _official_split(spec: DomainSpec, ddir: Path, domain: str, lists: tuple[Path, Path]
                    ) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    for cls in spec.classes:  # a missing or empty class folder is reported as a layout error
        class_folder_images(ddir / domain / cls, spec.name, spec.expected())
    parts = []
    for path in lists:
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            rel = line.split()[0].replace("\\", "/")
            pieces = rel.split("/")
            if len(pieces) < 3 or pieces[0] != domain or not rel.lower().endswith(tuple(IMAGE_EXTENSIONS)):
                raise DataError(f"{spec.name}: {path} line {n}: expected '<domain>/<class>/<image> <label>' with "
                                f"domain '{domain}', got {line.strip()!r}")
            if pieces[1] in spec.classes:
                rows.append((ddir / rel, pieces[1]))
        missing = [c for c in spec.classes if not any(cls == c for _, cls in rows)]
        if missing:
            raise DataError(f"{spec.name}: {path} lists no image of class(es) {', '.join(missing)}: use "
                            f"DomainNet's official list or delete both list files to split by folder")
        parts.append(rows)
    return parts[0], parts[1]


def load_domains(spec: DomainSpec, cfg: DataConfig) -> ClassificationDataset:
    root = data_root(cfg, spec.name, spec.expected())
    ddir = _dataset_dir(spec, root)
    domains = _selected_domains(spec, cfg, ddir)
    classnames = sorted(clean_classname(c) for c in spec.classes)
    label_of = {c: classnames.index(clean_classname(c)) for c in spec.classes}
    splits: dict[str, list[tuple[str, int, int]]] = {"train": [], "test": []}
    for d_index, domain in enumerate(domains):
        lists = (ddir / f"{domain}_train.txt", ddir / f"{domain}_test.txt")
        present = [p.is_file() for p in lists] if spec.official_lists else [False, False]
        if any(present) and not all(present):
            have, lack = (lists[0], lists[1]) if present[0] else (lists[1], lists[0])
            raise layout_error(f"{spec.name}: found {have} but not {lack}: keep both official lists or neither",
                               spec.expected())
        train, test = (_official_split(spec, ddir, domain, lists) if all(present)
                       else _seeded_split(spec, ddir, domain))
        log.debug("%s/%s: %d train, %d test (%s)", spec.name, domain, len(train), len(test),
                  "official lists" if all(present) else "seeded split")
        splits["train"] += [(str(p), label_of[c], d_index) for p, c in train]
        splits["test"] += [(str(p), label_of[c], d_index) for p, c in test]
    n_train = len(splits["train"])
    everything = splits["train"] + splits["test"]
    keep = verify_images([p for p, _, _ in everything], skip_bad=cfg.skip_bad_images, dataset=spec.name)
    built = {}
    for key, rows, mask in (("train", splits["train"], keep[:n_train]), ("test", splits["test"], keep[n_train:])):
        rows = [r for r, k in zip(rows, mask) if k]
        built[key] = ImageSplit([r[0] for r in rows], np.array([r[1] for r in rows], dtype=np.int64),
                                np.array([r[2] for r in rows], dtype=np.int64))
    name = dataset_identity(spec.name, classnames, [(s.images, s.labels) for s in built.values()],
                            extra=",".join(domains))
    return ClassificationDataset(name, classnames, built["train"], built["test"], domains=domains)


@register_dataset("office_caltech10")
def build_office_caltech10(cfg: DataConfig, seed: int) -> ClassificationDataset:
    """Office-Caltech10: 4 domains x 10 classes, folder layout, seeded 70/30 split."""
    return load_domains(OFFICE_CALTECH10, cfg)


@register_dataset("domainnet10")
def build_domainnet10(cfg: DataConfig, seed: int) -> ClassificationDataset:
    """DomainNet 10-class subset: 6 domains, official train/test lists when present."""
    return load_domains(DOMAINNET10, cfg)
