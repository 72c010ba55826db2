"""FedBuff (federation.mode async): the staleness weights and the buffered server step against hand
computation, the config's one-line refusals, and in-process runs: it trains, and a crash then `--resume`
never applies an update twice. Ray runs, faults and MLflow: tests/test_fedbuff_ray.py."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, make_cfg

from fedpgp_ray.async_rounds import LEASE_BLOCK, TaskLease, pick_client, run_async_federation
from fedpgp_ray.checkpoint import CheckpointStore
from fedpgp_ray.config import ConfigError, FedBuffConfig, config_from_dict
from fedpgp_ray.fedbuff import FedBuffServer, buffered_step, server_steps, staleness_histogram, staleness_weight
from fedpgp_ray.federation import run_federation
from fedpgp_ray.run import main as run_main, run_experiment
from fedpgp_ray.runtime.local import LocalRuntime

ASYNC = ["federation.mode=async", "runtime.kind=local"]


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# -- the math ---------------------------------------------------------------------------------------------
def test_staleness_weights_by_hand():
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == pytest.approx(0.5)  # 1/sqrt(1+3)
    assert staleness_weight(8, "sqrt") == pytest.approx(1 / 3)
    assert staleness_weight(7, "constant") == 1.0
    assert staleness_weight(1, "polynomial", 2.0) == pytest.approx(0.25)  # (1+1)^-2
    assert staleness_weight(3, "polynomial", 0.5) == pytest.approx(staleness_weight(3, "sqrt"))
    with pytest.raises(ValueError):
        staleness_weight(-1)


def test_buffered_step_by_hand():
    x = {"a": t(1.0, 2.0)}
    new = buffered_step(x, [({"a": t(1.0, 0.0)}, 1.0), ({"a": t(0.0, 2.0)}, 0.5)], server_lr=0.5, buffer_size=2)
    # x + 0.5 * (1 * [1, 0] + 0.5 * [0, 2]) / 2 = [1.25, 2.25]
    assert torch.allclose(new["a"], t(1.25, 2.25)) and new["a"].dtype == torch.float32


def test_server_buffers_k_updates_weights_by_staleness_against_the_version_sent():
    x0 = {"a": t(0.0, 0.0)}
    server = FedBuffServer(x0, FedBuffConfig(buffer_size=2, max_staleness=2, server_lr=1.0))
    for task in (1, 2, 3):
        assert server.send(task) == (0, x0)
    assert server.receive(1, 10, {"a": t(2.0, 0.0)}) is None  # buffered, no step yet
    applied = server.receive(2, 11, {"a": t(0.0, 4.0)})
    assert [(a.client_id, a.task_id, a.staleness, a.weight) for a in applied] == [(10, 1, 0, 1.0), (11, 2, 0, 1.0)]
    x1 = server.params
    assert server.step == 1 and torch.allclose(x1["a"], t(1.0, 2.0))  # (2,0)/2 + (0,4)/2
    version, sent = server.send(4)
    assert version == 1 and sent is x1
    # task 3 trained from x0 (staleness 1): its delta is against x0, weighted 1/sqrt(2)
    assert server.receive(3, 12, {"a": t(2.0, 2.0)}) is None
    applied = server.receive(4, 13, {"a": t(1.0, 6.0)})  # from x1: delta (0, 4), staleness 0
    w = 1 / math.sqrt(2)
    assert [(a.task_id, a.staleness) for a in applied] == [(3, 1), (4, 0)]
    expected = t(1.0 + (w * 2.0 + 0.0) / 2, 2.0 + (w * 2.0 + 4.0) / 2)
    assert server.step == 2 and torch.allclose(server.params["a"], expected)
    assert set(server._versions) == {2}  # nothing in flight: only the current version is kept
    assert server.staleness_seen == {0: 3, 1: 1}


def test_server_drops_updates_older_than_max_staleness_and_forgets_lost_tasks():
    x0 = {"a": t(1.0)}
    server = FedBuffServer(x0, FedBuffConfig(buffer_size=1, max_staleness=0, server_lr=0.5))
    server.send(1)
    server.send(2)
    server.send(3)
    assert server.receive(1, 0, {"a": t(3.0)}) is not None  # K=1: a step, x = 1 + 0.5 * 2 = 2
    assert torch.allclose(server.params["a"], t(2.0))
    assert server.receive(2, 1, {"a": t(100.0)}) is None  # staleness 1 > 0: dropped, params unchanged
    assert server.stale_dropped == 1 and torch.allclose(server.params["a"], t(2.0))
    server.forget(3)  # lost with its actor: the version it was sent is released
    assert server.in_flight() == 0 and set(server._versions) == {1}
    assert staleness_histogram(server.staleness_seen, 0) == {"async/staleness_count/0": 1.0,
                                                              "async/staleness_count/dropped": 1.0}


def test_run_length_defaults_to_the_sync_runs_client_updates(tmp_path):
    cfg = make_cfg(tmp_path, [*ASYNC, "fedbuff.buffer_size=3"])  # 2 rounds x 5 clients = 10 updates
    assert server_steps(cfg) == 4
    cfg = make_cfg(tmp_path, [*ASYNC, "fedbuff.buffer_size=3", "fedbuff.server_steps=7"])
    assert server_steps(cfg) == 7


def test_client_choice_is_seeded_and_skips_busy_clients():
    assert pick_client(0, 5, 100, set()) == pick_client(0, 5, 100, set())
    first = pick_client(0, 5, 100, set())
    assert pick_client(0, 5, 100, {first}) != first
    assert pick_client(0, 9, 3, {0, 1}) == 2


def test_task_ids_are_leased_so_a_resumed_run_never_reuses_one(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    lease = TaskLease(store)
    assert [lease.take() for _ in range(3)] == [1, 2, 3]
    again = TaskLease(store)  # a new session after a crash
    assert again.take() == LEASE_BLOCK + 1
    assert json.loads(store.storage.read_text("async_tasks.json"))["reserved"] == 2 * LEASE_BLOCK


# -- config: one-line refusals ----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["federation.mode=async", "privacy.enabled=true"], "federation.mode async with privacy.enabled is refused"),
    (["federation.mode=async", "secagg.enabled=true"], "federation.mode async with secagg.enabled is refused"),
    (["fedbuff.buffer_size=3"], "'fedbuff.buffer_size' is set but federation.mode is 'sync'"),
    (["federation.mode=async", "fedbuff.concurrency=6"], "'fedbuff.concurrency' = 6 is out of range"),
    (["federation.mode=async", "fedbuff.staleness=linear"], "'fedbuff.staleness' = 'linear' is out of range"),
    (["federation.mode=async", "fedbuff.staleness_exponent=2"], "only applies to 'polynomial'"),
    (["federation.mode=async", "fedbuff.server_lr=0"], "'fedbuff.server_lr' = 0.0 is out of range"),
    (["federation.mode=asynchronous"], "'federation.mode' = 'asynchronous' is out of range"),
])
def test_bad_async_configs_are_one_line(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        make_cfg(tmp_path, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_refuses_async_dp_in_one_line(tmp_path, capsys):
    code = run_main(["--set", f"output_dir={tmp_path / 'run'}", "--set", "federation.mode=async",
                     "--set", "privacy.enabled=true", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Poisson" in err and "docs/PRIVACY.md" in err
    assert not (tmp_path / "run").exists()


def test_default_is_sync_and_run_federation_refuses_async(tmp_path):
    assert config_from_dict({}).federation.mode == "sync"
    with pytest.raises(ValueError, match="run_async_federation"):
        run_federation(make_cfg(tmp_path, ASYNC), runtime=None)


# -- in-process runs ----------------------------------------------------------------------------------------
class Crash(RuntimeError):
    pass


class CrashingRuntime(LocalRuntime):
    """The in-process runtime whose driver crashes when it would collect its n+1-th finished task."""

    def __init__(self, *args, crash_after: int) -> None:
        super().__init__(*args)
        self.crash_after = crash_after

    def async_executor(self, concurrency):
        executor = super().async_executor(concurrency)
        collect, count = executor.next_done, [0]

        def next_done():
            if count[0] == self.crash_after:
                raise Crash(f"driver crashed after {count[0]} tasks")
            count[0] += 1
            return collect()
        executor.next_done = next_done
        return executor


def applied_tasks(history):
    return [task for h in history for _, task, _ in h["applied"]]


def test_crash_then_resume_applies_no_update_twice(tmp_path):
    # K=2, 3 in flight, in-process tasks finish in order: after 9 finished fits the server has stepped 4
    # times (tasks 1-8), task 9 sits in the buffer and tasks 10-12 are in flight when the driver crashes
    cfg = make_cfg(tmp_path, [*ASYNC, "fedbuff.buffer_size=2", "fedbuff.concurrency=3", "fedbuff.server_steps=7",
                              "evaluation.every=100"])
    store = CheckpointStore(Path(cfg.output_dir) / "checkpoints")
    with CrashingRuntime(cfg, store, None, crash_after=5 + 9) as runtime:  # 5: the round-0 evaluation
        with pytest.raises(Crash):
            run_async_federation(cfg, runtime, store)
    crashed = store.latest_server()
    assert crashed["round"] == 4 and applied_tasks(crashed["history"]) == list(range(1, 9))
    with LocalRuntime(cfg, store, None) as runtime:
        doc = run_async_federation(cfg, runtime, store, resume=True)
    history = store.latest_server()["history"]
    assert [h["round"] for h in history] == list(range(8))
    applied = applied_tasks(history)
    assert len(applied) == len(set(applied)) == 7 * 2  # each update applied once
    assert applied[:8] == list(range(1, 9))
    assert all(task > LEASE_BLOCK for task in applied[8:])  # new ids: tasks 9-12 (buffered, in flight) never applied
    assert doc["async"]["resumed_from_step"] == 4 and doc["rounds_done"] == 7
    assert doc["async"]["updates_applied"] == 14  # totals carried over the crash


@pytest.mark.slow
def test_in_process_fedbuff_trains_and_reports_staleness(tmp_path):
    """The shipped tiny CLIP (fedpgp-world) on the quickstart's world: HM3 rises over round 0."""
    cfg = make_cfg(tmp_path, [*ASYNC, "model.pretrained=fedpgp-world", "data.world.style=task",
                              "data.world.num_classes=64", "data.world.train_per_class=16",
                              "data.world.test_per_class=10", "data.shots=16", "federation.num_clients=10",
                              "train.rounds=3", "train.local_epochs=2", "fedbuff.buffer_size=5",
                              "fedbuff.concurrency=4", "evaluation.every=3"])
    doc = run_experiment(cfg, progress=False)
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == list(range(7))  # ceil(3 rounds x 10 clients / K=5) = 6 steps
    assert doc["final"]["hm3"] > rounds[0]["metrics"]["hm3"] + 1.0
    steps = [r["metrics"] for r in rounds[1:]]
    assert all(m["updates_applied"] == 5 and "wall_seconds" in m for m in steps)
    assert all(m["async/staleness_max"] <= 1 for m in steps) and any(m["async/staleness_max"] == 1 for m in steps)
    assert rounds[3]["metrics"]["async/received_per_step"] == 5.0
    assert sum(v for k, v in rounds[3]["metrics"].items() if k.startswith("async/staleness_count/")) == 15
    saved = json.loads((Path(cfg.output_dir) / "results.json").read_text())
    assert saved["async"]["updates_applied"] == 30 and saved["config"]["federation"]["mode"] == "async"
