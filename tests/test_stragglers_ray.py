"""Deadline mode on Ray: a straggler is cut when the round closes (its actor told on its control thread),
and a hung actor in a closed round loses no other client's work. Own Ray instance (2 CPUs), token auth on."""
from __future__ import annotations

from pathlib import Path

import pytest

import ray

from conftest import RAY_SESSION_TOKEN, TINY
from fedpgp_ray.checkpoint import CheckpointStore
from fedpgp_ray.client_speed import speed_factors
from fedpgp_ray.config import config_from_dict
from fedpgp_ray.federation import run_federation
from fedpgp_ray.run import feature_cache_dir
from fedpgp_ray.runtime.ray import FaultPlan, RayRuntime


@pytest.fixture(scope="module")
def ray_session():
    patch = pytest.MonkeyPatch()
    patch.delenv("RAY_AUTH_MODE", raising=False)
    patch.setenv("RAY_AUTH_TOKEN", RAY_SESSION_TOKEN)
    patch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    patch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    patch.undo()


@pytest.mark.slow
def test_over_selection_on_ray_cuts_the_straggler_and_survives_a_hung_actor(ray_session, tmp_path):
    # seed 3: client 1 is the one 100000x slower; it is first on actor 1 (clients 1, 3, 5), which it blocks.
    # Each round samples all 6 clients for m = 3: actor 0's clients 0, 2, 4 report, the round closes, the
    # straggler is told and stops waiting (late, trained), 3 and 5 never start. Round 2: client 3's fit hangs
    # the actor after the close; it is replaced after runtime.task_timeout_s, and no reported client is lost.
    cfg = config_from_dict({**TINY, "seed": 3, "output_dir": str(tmp_path / "run"), "runtime": {
        "kind": "ray", "num_actors": 2, "num_cpus_per_actor": 1, "threads_per_worker": 1, "task_timeout_s": 20}},
        ["federation.num_clients=6", "federation.client_fraction=0.5", "federation.over_selection=1.0",
         "client_speed.kind=slow_fraction", "client_speed.slow_fraction=0.17", "client_speed.slowdown=100000"])
    assert speed_factors(cfg.client_speed, 3, 6).tolist() == [1, 100000, 1, 1, 1, 1]
    store = CheckpointStore(Path(cfg.output_dir) / "checkpoints")
    with RayRuntime(cfg, store, feature_cache_dir(), faults=FaultPlan(hang={(2, 3)})) as runtime:
        doc = run_federation(cfg, runtime, store)
    for rnd in (1, 2):
        m, clients = doc["rounds"][rnd]["metrics"], doc["rounds"][rnd]["clients"]
        assert (m["clients_sampled"], m["clients_reported"], m["clients_late"]) == (6, 3, 3), rnd
        assert m["clients_late_trained"] == 1 and m["clients_dropped"] == 0 and m["clients_failed"] == 0
        assert {c for c, v in clients.items() if "train_loss" in v} == {"0", "2", "4"}
        assert {c for c, v in clients.items() if v.get("late")} == {"1", "3", "5"}
    assert doc["rounds"][1]["metrics"]["tasks_timed_out"] == 0
    assert doc["rounds"][2]["metrics"]["tasks_timed_out"] == 1 and doc["rounds"][2]["metrics"]["actor_restarts"] == 1
    # the straggler's local update is kept (saved with its round), though its upload was discarded
    assert sorted(p.name for p in (Path(cfg.output_dir) / "checkpoints" / "clients" / "1").iterdir()) == \
        ["round_1.pt", "round_2.pt"]
    assert not (Path(cfg.output_dir) / "checkpoints" / "clients" / "5").exists()  # never started
    assert doc["final"]["hm3"] > 0
