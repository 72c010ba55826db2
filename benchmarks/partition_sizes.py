"""Per-client local test-set sizes of the CIFAR Dirichlet configs under both data.local_test rules.

    python benchmarks/partition_sizes.py [--seed 0]

Needs no CIFAR files: the partition depends only on the labels, so a stand-in dataset with CIFAR's
label layout (10 x 5,000 / 1,000 or 100 x 500 / 100 images per class) is partitioned with
configs/paper/cifar{10,100}_dirichlet.yaml.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from fedpgp_ray.config import load_config
from fedpgp_ray.data.base import ClassificationDataset, ImageSplit
from fedpgp_ray.data.partition import partition_dataset

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "paper"


def stand_in(classes: int, train_per: int, test_per: int) -> ClassificationDataset:
    pixel = np.zeros((1, 1, 1, 3), dtype=np.uint8)
    train, test = np.repeat(np.arange(classes), train_per), np.repeat(np.arange(classes), test_per)
    split = lambda y: ImageSplit(np.broadcast_to(pixel, (len(y), 1, 1, 3)), y)
    return ClassificationDataset("stand-in", [f"c{i}" for i in range(classes)], split(train), split(test))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, layout in (("cifar10", (10, 5000, 1000)), ("cifar100", (100, 500, 100))):
        cfg = load_config(CONFIGS / f"{name}_dirichlet.yaml")
        ds = stand_in(*layout)
        for rule in ("classes", "split"):
            data = dataclasses.replace(cfg.data, local_test=rule)
            part = partition_dataset(ds, data, cfg.federation.num_clients, args.seed)
            sizes = np.array([len(c.local.indices) for c in part.clients])
            print(f"{name} ({cfg.federation.num_clients} clients, beta {data.beta}, seed {args.seed}) "
                  f"local_test={rule:<8} per client: mean {sizes.mean():.0f}, median {np.median(sizes):.0f}, "
                  f"min {sizes.min()}, max {sizes.max()}; sum {sizes.sum()} = {sizes.sum() / len(ds.test):.1f} x "
                  f"the {len(ds.test)} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
