"""Cross-device scale: costs and memory in sampled clients, not in the federation (docs/SCALE.md)."""
from __future__ import annotations

import numpy as np
import pytest

from fedpgp_ray.config import DataConfig, load_config
from fedpgp_ray.data.base import ClassificationDataset, DataError, ImageSplit
from fedpgp_ray.data.partition import ClientTable, partition_dataset
from fedpgp_ray.federation import build_strategy
from fedpgp_ray.strategy import sample_clients, sample_eval_clients, spread_over_clients


def _dataset(n_classes=16, train_per=1000, test_per=20) -> ClassificationDataset:
    names = sorted(f"class {i:02d}" for i in range(n_classes))
    tr = np.repeat(np.arange(n_classes), train_per)
    te = np.repeat(np.arange(n_classes), test_per)
    img = lambda n: np.zeros((n, 1, 1, 3), dtype=np.uint8)
    return ClassificationDataset("toy", names, ImageSplit(img(len(tr)), tr), ImageSplit(img(len(te)), te))


def test_shared_partition_of_100k_clients_is_compact_and_follows_the_rules():
    ds = _dataset()
    cfg = DataConfig(partition="shared", shots=2, classes_per_client=2)
    part = partition_dataset(ds, cfg, num_clients=100_000, seed=0)
    table = part.clients
    assert isinstance(table, ClientTable) and part.shared_images and len(table) == 100_000
    # a few bytes per image: 4 images of int32 + 2 int16 classes + one int64 offset per client
    assert table.nbytes <= 100_000 * (4 * 4 + 2 * 2 + 8) + 8
    assert table.train_indices.dtype == np.int32 and table.classes.dtype == np.int16
    base = set(range(8))
    for k in (0, 1, 4242, 99_999, -1):
        c = table[k]
        assert c.client_id == (k % 100_000)
        assert len(c.classes) == 2 and set(c.classes) <= base
        labels = ds.train.labels[c.train_indices]
        assert sorted(labels.tolist()) == sorted(c.classes * 2), "exactly `shots` images of each own class"
        assert len(set(c.train_indices.tolist())) == 4 and np.all(np.diff(c.train_indices) > 0)
        assert set(ds.test.labels[c.local.indices]) == set(c.classes) and c.local.classes == sorted(base)
    # images are shared between clients: 400,000 client images over 8,000 base-class images
    assert len(np.unique(table.train_indices)) <= 8000
    # every base class is held by some clients, about uniformly
    counts = np.bincount(table.classes.ravel(), minlength=8)
    assert counts.min() > 0.9 * counts.mean()
    again = partition_dataset(ds, cfg, num_clients=100_000, seed=0)
    assert np.array_equal(again.clients.train_indices, table.train_indices)
    other = partition_dataset(ds, cfg, num_clients=100_000, seed=1)
    assert not np.array_equal(other.clients.train_indices, table.train_indices)
    with pytest.raises(IndexError):
        table[100_000]


def test_shared_partition_refuses_more_classes_per_client_than_base_classes():
    with pytest.raises(DataError, match="classes_per_client"):
        partition_dataset(_dataset(), DataConfig(partition="shared", classes_per_client=9), 10, seed=0)


def test_evaluation_sampling_is_seeded_and_separate_from_training():
    cfg = load_config(None, ["federation.num_clients=100000", "federation.client_fraction=0.0001",
                             "evaluation.num_clients=10", "evaluation.every=1", "train.rounds=5"])
    strategy = build_strategy(cfg)
    evals = [strategy.configure_evaluate(r) for r in range(6)]
    assert all(len(e) == 10 and len(set(e)) == 10 and e == sorted(e) for e in evals)
    assert evals == [build_strategy(cfg).configure_evaluate(r) for r in range(6)], "seeded"
    assert len({tuple(e) for e in evals}) == 6, "a new sample each round"
    trains = [strategy.configure_train(r) for r in range(1, 6)]
    assert all(t != e for t, e in zip(trains, evals[1:])), "not training's sample"
    # changing training's sampling changes nothing in evaluation's sample
    more = build_strategy(load_config(None, ["federation.num_clients=100000", "federation.client_fraction=0.001",
                                             "evaluation.num_clients=10", "evaluation.every=1", "train.rounds=5"]))
    assert [more.configure_evaluate(r) for r in range(6)] == evals
    assert sample_eval_clients(100, 0.1, None, 0, 3) == sample_eval_clients(100, 0.5, 10, 0, 3)
    assert sample_eval_clients(10, 1.0, None, 0, 3) == list(range(10))
    assert sample_clients(100, 0.1, 0, 3) != sample_eval_clients(100, 0.1, None, 0, 3)
    # the final evaluation: the same kind of sample, or every client when asked
    assert strategy.configure_evaluate(5) == evals[5]
    final_all = build_strategy(load_config(None, ["federation.num_clients=1000", "evaluation.num_clients=10",
                                                  "evaluation.final=all", "train.rounds=5"]))
    assert final_all.configure_evaluate(5) == list(range(1000))
    assert len(final_all.configure_evaluate(0)) == 10


def test_quickstart_still_evaluates_every_client_every_evaluation_round():
    strategy = build_strategy(load_config(None))
    assert strategy.configure_evaluate(0) == list(range(10)) == strategy.configure_evaluate(25)
    assert strategy.configure_evaluate(3) is None


def test_spread_over_clients_gives_the_standard_error_and_percentiles():
    per_client = {c: {"local": float(v), "base": 50.0} for c, v in enumerate([10, 20, 30, 40])}
    spread = spread_over_clients(per_client)
    assert spread["clients_evaluated"] == 4
    assert spread["local_se"] == pytest.approx(np.std([10, 20, 30, 40], ddof=1) / 2)
    assert spread["local_p50"] == 25 and spread["base_se"] == 0.0
    assert "novel_se" not in spread
    assert spread_over_clients({0: {"local": 5.0}})["local_se"] == 0.0
