"""Federated partitions: disjoint classes, shots, determinism, class order across processes."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fedpgp_ray.config import DataConfig
from fedpgp_ray.data.base import ClassificationDataset, DataError, ImageSplit
from fedpgp_ray.data.partition import (dirichlet_indices, partition_dataset, pathological_classes,
                                       split_base_novel)


def _dataset(n_classes=21, train_per=10, test_per=3) -> ClassificationDataset:
    names = sorted(f"class {i:02d}" for i in range(n_classes))
    tr = np.repeat(np.arange(n_classes), train_per)
    te = np.repeat(np.arange(n_classes), test_per)
    img = lambda n: np.zeros((n, 4, 4, 3), dtype=np.uint8)
    return ClassificationDataset("toy", names, ImageSplit(img(len(tr)), tr), ImageSplit(img(len(te)), te))


def test_base_novel_is_first_ceil_half():
    assert split_base_novel(21) == (list(range(11)), list(range(11, 21)))
    assert split_base_novel(4) == ([0, 1], [2, 3])


def test_pathological_partition_disjoint_shots_and_local_sets():
    ds = _dataset()
    part = partition_dataset(ds, DataConfig(shots=3), num_clients=4, seed=5)
    assert part.train_classes == list(range(11))
    seen = set()
    for c in part.clients:
        assert not seen & set(c.classes), "clients' classes must be disjoint"
        seen |= set(c.classes)
        labels = ds.train.labels[c.train_indices]
        assert all((labels == k).sum() == 3 for k in c.classes), "exactly `shots` images per own class"
        assert set(ds.test.labels[c.local.indices]) == set(c.classes)
    assert seen == set(range(11))
    assert set(ds.test.labels[part.novel.indices]) == set(range(11, 21))
    assert part.novel.classes == list(range(11, 21))
    # chunks of round(11/4) = 3 classes, the last takes the remainder
    assert [len(c.classes) for c in part.clients] == [3, 3, 3, 2]


def test_partition_is_deterministic_and_the_class_shuffle_seed_is_fixed():
    """The reference shuffles classes with one fixed seed (2023): experiment seeds vary training noise, not
    which classes a client holds, unless data.partition_seed is null (then the seed varies both)."""
    ds = _dataset()
    a = partition_dataset(ds, DataConfig(shots=3), 4, seed=1)
    b = partition_dataset(ds, DataConfig(shots=3), 4, seed=1)
    c = partition_dataset(ds, DataConfig(shots=3), 4, seed=2)
    assert all(np.array_equal(x.train_indices, y.train_indices) for x, y in zip(a.clients, b.clients))
    assert [x.classes for x in a.clients] == [x.classes for x in c.clients]
    assert [x.classes for x in a.clients] == pathological_classes(list(range(11)), 4, 2023)
    assert not all(np.array_equal(x.train_indices, y.train_indices) for x, y in zip(a.clients, c.clients))
    vary = [partition_dataset(ds, DataConfig(shots=3, partition_seed=None), 4, seed=s) for s in (1, 2)]
    assert [x.classes for x in vary[0].clients] != [x.classes for x in vary[1].clients]
    assert [x.classes for x in vary[0].clients] == pathological_classes(list(range(11)), 4, 1)


def test_too_many_clients_is_a_clear_error():
    with pytest.raises(DataError, match="at least one class per client"):
        pathological_classes(list(range(3)), 5, 0)


def test_dirichlet_covers_every_image_once():
    labels = np.repeat(np.arange(5), 40)
    shards = dirichlet_indices(labels, np.arange(200), 4, 0.3, np.random.default_rng(0))
    joined = np.sort(np.concatenate(shards))
    assert np.array_equal(joined, np.arange(200))
    # strong skew at beta 0.3: some client misses some class
    assert any(len(np.unique(labels[s])) < 5 for s in shards)


def test_dirichlet_local_test_sets_split_per_class_with_the_training_proportions():
    """The reference's rule: a client's local test set is its Dirichlet share of each class's test images."""
    ds = _dataset(n_classes=6, train_per=200, test_per=100)
    cfg = DataConfig(partition="dirichlet", beta=0.3, shots=1000, base_novel=False)
    part = partition_dataset(ds, cfg, 5, seed=0)
    locals_ = [c.local.indices for c in part.clients]
    joined = np.sort(np.concatenate(locals_))
    assert np.array_equal(joined, np.arange(len(ds.test)))  # disjoint, and together the whole test set
    for c in part.clients:
        for k in range(6):  # same share of class k in train and test (up to the floor of each cut)
            train_share = (ds.train.labels[c.train_indices] == k).sum() / 200
            test_share = (ds.test.labels[c.local.indices] == k).sum() / 100
            assert abs(train_share - test_share) <= 0.011
    # the old rule, behind data.local_test: classes: every test image of every class the client holds
    old = partition_dataset(ds, DataConfig(partition="dirichlet", beta=0.3, shots=1000, base_novel=False,
                                           local_test="classes"), 5, seed=0)
    for a, b in zip(part.clients, old.clients):
        assert np.array_equal(a.train_indices, b.train_indices)  # the option changes only the test sets
        assert np.array_equal(b.local.indices, np.flatnonzero(np.isin(ds.test.labels, b.classes)))
    assert sum(len(c.local.indices) for c in old.clients) > len(ds.test)


def test_dirichlet_partition_keeps_only_base_classes():
    ds = _dataset(n_classes=10, train_per=20)
    part = partition_dataset(ds, DataConfig(partition="dirichlet", beta=0.5, shots=50), 3, seed=0)
    for c in part.clients:
        assert set(ds.train.labels[c.train_indices]) <= set(range(5))


PROBE = """
import json, sys
from fedpgp_ray.config import DataConfig, WorldConfig
from fedpgp_ray.data.registry import build_dataset
from fedpgp_ray.data.partition import partition_dataset
cfg = DataConfig(shots=2, world=WorldConfig(num_classes=24, train_per_class=3, test_per_class=2))
ds = build_dataset(cfg, 0)
part = partition_dataset(ds, cfg, 4, 0)
print(json.dumps({"names": ds.classnames, "clients": [c.classes for c in part.clients],
                  "train": [c.train_indices.tolist() for c in part.clients]}))
"""


def test_class_order_and_partition_identical_across_hash_seeds():
    outs = []
    for hash_seed in ("0", "123", "random"):
        env = {"PYTHONHASHSEED": hash_seed, "PATH": "/usr/bin:/bin"}
        proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
        outs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1] == outs[2]
    assert outs[0]["names"] == sorted(outs[0]["names"])
