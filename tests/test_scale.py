"""Cross-device scale: costs and memory in sampled clients, not in the federation (docs/SCALE.md)."""
from __future__ import annotations

import dataclasses

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


# -- balanced assignment of a phase's clients to workers ------------------------------------------
from fedpgp_ray.runtime.assign import balanced_slots  # noqa: E402


def test_balanced_slots_keeps_clients_home_when_the_spread_is_even():
    assert balanced_slots(list(range(10)), 2) == {0: [0, 2, 4, 6, 8], 1: [1, 3, 5, 7, 9]}
    assert balanced_slots([], 2) == {0: [], 1: []}


def test_balanced_slots_never_overloads_one_worker():
    # every sampled id is even: by home alone, actor 0 would get all 10 and actor 1 none
    slots = balanced_slots([2 * k for k in range(10)], 2)
    assert sorted(len(v) for v in slots.values()) == [5, 5]
    assert sorted(slots[0] + slots[1]) == [2 * k for k in range(10)]
    assert slots[0] == [0, 2, 4, 6, 8], "the first clients stay home"
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 6))
        ids = sorted(rng.choice(100_000, size=int(rng.integers(1, 40)), replace=False).tolist())
        slots = balanced_slots(ids, n)
        sizes = [len(v) for v in slots.values()]
        assert max(sizes) == -(-len(ids) // n) and sorted(sum(slots.values(), [])) == ids  # the fair share


# -- bounded personal-state cache over the run storage --------------------------------------------
SMALL_WORLD = ["data.partition=shared", "data.shots=2", "data.world.num_classes=8", "data.world.train_per_class=20",
               "data.world.test_per_class=4", "federation.num_clients=1000", "train.local_epochs=1",
               "model.pretrained=null", "algorithm.n_ctx=4"]


def _worker(tmp_path, name, cache_size, store_dir="store"):
    from fedpgp_ray.checkpoint import CheckpointStore
    from fedpgp_ray.client import ClientWorker

    cfg = load_config(None, [*SMALL_WORLD, f"runtime.client_state_cache={cache_size}"])
    return ClientWorker(cfg, store=CheckpointStore(tmp_path / store_dir), cache_dir=str(tmp_path / "features"))


def _rounds(worker, clients, rounds=3):
    """A small federation on one worker: fit then evaluate `clients` each round (global params fixed)."""
    import torch

    glob = worker.global_params()
    out = []
    for rnd in range(1, rounds + 1):
        for cid in clients:
            fit = worker.fit(cid, rnd, glob)
            out.append((rnd, cid, {k: v.clone() for k, v in fit.params.items()}, fit.metrics["loss"]))
            out.append((rnd, cid, worker.evaluate(cid, rnd, glob).metrics))
            assert len(worker.states) <= worker.states.capacity
    return out, torch


def test_state_cache_is_bounded_and_reloads_from_storage_with_identical_results(tmp_path):
    clients = [3, 999, 17, 500]
    small = _worker(tmp_path, "small", 2, "small")
    large = _worker(tmp_path, "large", 1000, "large")
    got, torch = _rounds(small, clients)
    want, _ = _rounds(large, clients)
    assert len(small.states) == 2 and len(large.states) == 4
    for a, b in zip(got, want):
        assert a[:2] == b[:2]
        if len(a) == 4:
            assert all(torch.equal(a[2][k], b[2][k]) for k in a[2]) and a[3] == b[3]
        else:
            assert a[2] == b[2]


def test_a_state_trained_on_another_worker_replaces_the_cached_one(tmp_path):
    """Two Ray actors share the run storage: actor A cached client 5 after round 1, actor B trained it in
    round 2; told the round that last trained it, A reads B's state instead of its stale copy."""
    a = _worker(tmp_path, "a", 10)
    b = _worker(tmp_path, "b", 10)
    glob = a.global_params()
    a.fit(5, 1, glob)
    b.fit(5, 2, glob)
    fresh = b.evaluate(5, 2, glob).metrics
    assert a.states[5].round == 1
    assert a.evaluate(5, 2, glob, state_round=2).metrics == fresh
    assert a.states[5].round == 2


# -- results that scale: Parquet with every client, bounded JSON, distribution figures ------------
@pytest.mark.slow
def test_a_sampled_run_writes_every_evaluated_client_to_parquet_and_bounded_summaries(tmp_path):
    import json

    import pyarrow.parquet as pq

    from fedpgp_ray.client_results import MAX_LISTED_CLIENTS
    from fedpgp_ray.run import run_experiment

    cfg = load_config(None, [*SMALL_WORLD, "federation.num_clients=200", "federation.client_fraction=0.02",
                             "evaluation.num_clients=6", "evaluation.every=1", "evaluation.final=all",
                             "train.rounds=2", "runtime.kind=local", "tracking.mlflow=false",
                             f"output_dir={tmp_path / 'run'}", "runtime.client_state_cache=3"])
    doc = run_experiment(cfg, progress=False)
    rounds = {r["round"]: r for r in doc["rounds"]}
    assert rounds[1]["metrics"]["clients_evaluated"] == 6 and rounds[1]["metrics"]["clients_sampled"] == 4
    assert "local_se" in rounds[1]["metrics"] and "local_p50" in rounds[1]["metrics"]
    assert rounds[2]["metrics"]["clients_evaluated"] == 200  # evaluation.final=all
    assert len(rounds[2]["clients"]) == MAX_LISTED_CLIENTS and rounds[2]["clients_total"] == 200
    assert len(doc["final_clients"]) == MAX_LISTED_CLIENTS
    summary = doc["final_summary"]["local"]
    assert summary["n"] == 200 and sum(summary["histogram"]) == 200
    assert summary["mean"] == pytest.approx(doc["final"]["local"])
    assert summary["ci95"] == pytest.approx(1.96 * rounds[2]["metrics"]["local_se"])
    assert len(doc["dataset_manifest"]["clients"]) == MAX_LISTED_CLIENTS
    assert doc["dataset_manifest"]["clients_total"] == 200
    table = pq.read_table(tmp_path / "run" / "clients.parquet").to_pylist()
    evaluated = {r: sorted(row["client_id"] for row in table if row["round"] == r and row["local"] is not None)
                 for r in range(3)}
    assert [len(evaluated[r]) for r in range(3)] == [6, 6, 200], "one row per evaluated client"
    trained = [row for row in table if row.get("train_loss") is not None]
    assert len(trained) == 8 and all(row["round"] in (1, 2) for row in trained)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["final_summary"]["local"]["n"] == 200
    assert (tmp_path / "run" / "clients.png").stat().st_size > 0


def test_client_figure_shows_a_distribution_beyond_the_listed_clients(tmp_path):
    from fedpgp_ray import plots
    from fedpgp_ray.client_results import accuracy_summary, listed

    per_client = {str(c): {"local": float(c % 100), "base": 40.0, "novel": 30.0} for c in range(1000)}
    doc = {"algorithm": "fedpgp", "dataset": "world", "final": {}, "rounds": [],
           "final_clients": listed(per_client), "final_summary": accuracy_summary(per_client)}
    assert len(doc["final_clients"]) == 32 and doc["final_summary"]["local"]["n"] == 1000
    bars = plots.client_bars({**doc, "final_summary": accuracy_summary(doc["final_clients"])}, tmp_path / "b.png")
    dist = plots.client_bars(doc, tmp_path / "d.png")
    from PIL import Image
    assert Image.open(bars).size != Image.open(dist).size  # the distribution figure, not 32 bars


def test_the_world_is_rendered_once_per_machine_and_read_back_identically(tmp_path, monkeypatch):
    from fedpgp_ray.data import world

    monkeypatch.setenv("FEDPGP_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    render = world.render_classes
    monkeypatch.setattr(world, "render_classes", lambda *a, **k: calls.append(1) or render(*a, **k))
    cfg = DataConfig(world=dataclasses.replace(DataConfig().world, num_classes=8, train_per_class=3,
                                               test_per_class=2))
    first = world.build_world(cfg, seed=0)
    assert len(calls) == 2  # train and test, once each
    again = world.build_world(cfg, seed=0)
    assert len(calls) == 2, "read from the cache, not rendered again"
    assert np.array_equal(first.train.images, again.train.images) and np.array_equal(first.test.labels,
                                                                                      again.test.labels)
    fresh = world.build_split(world.world_classes(8), 3, ["task"], 32, 0, world.STREAM_TRAIN)
    assert np.array_equal(np.asarray(again.train.images), fresh.images)
    assert sorted(p.suffix for p in (tmp_path / "cache" / "world").glob("*.npy")) == [".npy", ".npy"]
