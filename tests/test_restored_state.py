"""Restored personal state is trainable state; a client the runtime drops is never silent.

A worker that does not hold a client yet (a replacement Ray actor, a resumed process) restores its
saved state on first use. When that first use is an evaluation (run under inference mode), the
state, SGD momentum included, must still be trainable at the client's next fit: every faulted or
resumed run below ends with the metrics of the unfaulted run. Client sampling (seed 0, 5 clients):
fraction 0.6 trains [0, 2, 4], [2, 3, 4], [0, 1, 3] in rounds 1-3; fraction 0.5 trains [0, 3],
[2, 3], [1, 4], [1, 4], [0, 3] in rounds 1-5. Two actors: slot 0 serves clients 0, 2, 4; slot 1: 1, 3.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from test_ray_runtime import assert_same_metrics, make_cfg, ray_session, run_ray, tiny_weights  # noqa: F401

from fedpgp_ray.checkpoint import CheckpointStore
from fedpgp_ray.client import ClientWorker
from fedpgp_ray.run import DROPPED_EXIT, main as run_main, run_experiment
from fedpgp_ray.runtime import RUNTIMES
from fedpgp_ray.runtime.local import LocalRuntime
from fedpgp_ray.runtime.ray import FaultPlan, RayRuntime


class DriverKilled(Exception):
    pass


class CrashAfterFit:
    """Ends the driver in round CRASH_ROUND after the clients trained (and saved their states), before
    the server aggregated and checkpointed the round: a crash mid-round."""
    CRASH_ROUND = 2

    def fit(self, rnd, client_ids, global_params):
        out = super().fit(rnd, client_ids, global_params)
        if rnd == self.CRASH_ROUND:
            raise DriverKilled(f"driver killed in round {rnd}")
        return out


class CrashingLocalRuntime(CrashAfterFit, LocalRuntime):
    pass


class CrashingRayRuntime(CrashAfterFit, RayRuntime):
    pass


def sampled_cfg(out: Path, weights: str, fraction: float, rounds: int, **runtime):
    cfg = make_cfg(out, weights, **runtime)
    cfg.federation.client_fraction = fraction
    cfg.train.rounds = rounds
    cfg.evaluation.every = 1
    return cfg


def finals(doc: dict) -> dict:
    return {c: {k: v for k, v in m.items() if "seconds" not in k} for c, m in doc["final_clients"].items()}


def report(what: str, doc: dict, unfaulted: dict) -> None:
    """One line for `pytest -s`: the faulted run's final metrics beside the unfaulted run's."""
    def line(d: dict) -> str:
        return "/".join(f"{d['final'][k]:.2f}" for k in ("local", "base", "novel", "hm3"))
    print(f"\n{what}: final Local/Base/Novel/HM3 {line(doc)} (unfaulted {line(unfaulted)}), "
          f"dropped {len(doc['dropped_clients'])}")


def test_a_state_restored_by_evaluate_trains_like_the_one_in_memory(tiny_weights, tmp_path):
    cfg = sampled_cfg(tmp_path / "run", tiny_weights, 1.0, 2, kind="local")
    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    threads = torch.get_num_threads()
    try:
        held = ClientWorker(cfg, store=store)
        params = held.global_params()
        held.fit(0, 1, params)  # saves the client's personal state and SGD momentum
        fresh = ClientWorker(cfg, store=store)  # a replacement actor / a resumed process
        assert fresh.evaluate(0, 1, params).metrics == held.evaluate(0, 1, params).metrics
        restored = fresh.states[0]
        assert not any(t.is_inference() for t in restored.personal.values())
        assert not any(t.is_inference() for s in restored.optimizer["state"].values() for t in s.values())
        again, expected = fresh.fit(0, 2, params), held.fit(0, 2, params)
    finally:
        torch.set_num_threads(threads)
    assert again.metrics["loss"] == expected.metrics["loss"]
    assert all(torch.equal(again.params[k], expected.params[k]) for k in expected.params)


def test_resume_of_a_sampled_run_killed_mid_round_in_process(tiny_weights, tmp_path, monkeypatch):
    unfaulted = run_experiment(sampled_cfg(tmp_path / "unfaulted", tiny_weights, 0.5, 5, kind="local"),
                               progress=False)
    monkeypatch.setitem(RUNTIMES, "local", "test_restored_state:CrashingLocalRuntime")
    with pytest.raises(DriverKilled):
        run_experiment(sampled_cfg(tmp_path / "resumed", tiny_weights, 0.5, 5, kind="local"), progress=False)
    monkeypatch.setitem(RUNTIMES, "local", "fedpgp_ray.runtime.local:LocalRuntime")
    # the resumed process evaluates clients 0, 1, 4 (restored under inference mode) before it trains them
    assert run_main(["--resume", str(tmp_path / "resumed"), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert doc["dropped_clients"] == [] and doc["rounds_done"] == 5
    report("in-process, fraction 0.5, driver killed mid-round 2, resumed", doc, unfaulted)
    assert_same_metrics(doc, unfaulted)
    assert finals(doc) == finals(unfaulted)


@pytest.fixture(scope="module")
def unfaulted_sampled(ray_session, tiny_weights, tmp_path_factory) -> dict:  # noqa: F811
    """The reference Ray run for the fault tests: 3 rounds, 3 of 5 clients each, evaluated every round."""
    return run_ray(sampled_cfg(tmp_path_factory.mktemp("unfaulted"), tiny_weights, 0.6, 3))


@pytest.mark.slow
def test_actors_killed_after_finishing_and_evaluating_clients_lose_nothing(unfaulted_sampled, tiny_weights,
                                                                           tmp_path):
    # round 1: slot 0's actor is killed once client 0's fit has returned (its replacement evaluates
    # client 0 first); slot 1's once client 3's evaluation has returned (its replacement trains 3
    # in round 2, then evaluates client 1 first). Clients 0 and 1 train again in round 3.
    faults = FaultPlan(kill_after_fit={(1, 0)}, kill_after_evaluate={(1, 3)})
    doc = run_ray(sampled_cfg(tmp_path / "faulted", tiny_weights, 0.6, 3), faults)
    assert doc["rounds"][1]["metrics"]["actor_restarts"] == 1 and doc["rounds"][2]["metrics"]["actor_restarts"] == 1
    assert doc["dropped_clients"] == []
    assert all(r["metrics"]["clients_dropped"] == 0 for r in doc["rounds"])
    assert doc["rounds"][3]["metrics"]["clients_reported"] == 3
    report("Ray, actors killed after a fit and after an evaluation", doc, unfaulted_sampled)
    assert_same_metrics(doc, unfaulted_sampled)
    assert finals(doc) == finals(unfaulted_sampled)


@pytest.mark.slow
def test_actor_replaced_after_a_timeout_loses_nothing(unfaulted_sampled, tiny_weights, tmp_path):
    # round 1: slot 0 trains client 0, then hangs in client 2's fit; the replacement trains 2 and 4,
    # then evaluates client 0 first; client 0 trains again in round 3.
    cfg = sampled_cfg(tmp_path / "hung", tiny_weights, 0.6, 3, task_timeout_s=30)
    doc = run_ray(cfg, FaultPlan(hang={(1, 2)}))
    assert doc["rounds"][1]["metrics"]["tasks_timed_out"] == 1
    assert doc["dropped_clients"] == []
    report("Ray, actor replaced after a task timeout", doc, unfaulted_sampled)
    assert_same_metrics(doc, unfaulted_sampled)
    assert finals(doc) == finals(unfaulted_sampled)


@pytest.mark.slow
def test_resume_of_a_sampled_ray_run_killed_mid_round(ray_session, tiny_weights, tmp_path, monkeypatch):  # noqa: F811
    unfaulted = run_ray(sampled_cfg(tmp_path / "unfaulted", tiny_weights, 0.5, 5))
    monkeypatch.setitem(RUNTIMES, "ray", "test_restored_state:CrashingRayRuntime")
    with pytest.raises(DriverKilled):
        run_experiment(sampled_cfg(tmp_path / "resumed", tiny_weights, 0.5, 5), progress=False)
    monkeypatch.setitem(RUNTIMES, "ray", "fedpgp_ray.runtime.ray:RayRuntime")
    assert run_main(["--resume", str(tmp_path / "resumed"), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert doc["dropped_clients"] == [] and doc["rounds_done"] == 5
    report("Ray, fraction 0.5, driver killed mid-round 2, resumed", doc, unfaulted)
    assert_same_metrics(doc, unfaulted)
    assert finals(doc) == finals(unfaulted)


@pytest.mark.slow
def test_a_dropped_client_is_loud_and_fails_the_run_unless_allowed(ray_session, tiny_weights, tmp_path,  # noqa: F811
                                                                   monkeypatch, capsys):
    monkeypatch.setenv("FEDPGP_RAY_FAULTS", json.dumps({"fail": [3]}))
    cfg = make_cfg(tmp_path / "run", tiny_weights, max_client_retries=0)
    raw = {"seed": 0, "output_dir": cfg.output_dir, "model": {"name": "fedpgp-tiny", "pretrained": tiny_weights},
           "data": {"dataset": "world", "shots": 4,
                    "world": {"num_classes": 40, "train_per_class": 8, "test_per_class": 6}},
           "train": {"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.002},
           "federation": {"num_clients": 5}, "tracking": {"mlflow": False},
           "runtime": {"kind": "ray", "num_actors": 2, "num_cpus_per_actor": 1, "threads_per_worker": 1,
                       "max_client_retries": 0}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert run_main(["--config", str(config), "--no-progress"]) == DROPPED_EXIT
    out, err = capsys.readouterr()
    assert "round 1/2:" in out and "DROPPED client 3 (fit: fit raised RuntimeError: injected failure" in out
    assert "DROPPED" in out.split("algorithm")[1]  # the final table has a DROPPED column
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "round 1 client 3" in errors[0] and "round 2 client 3" in errors[0]
    assert "federation.allow_dropped_clients=true" in errors[0]
    doc = json.loads((tmp_path / "run" / "results.json").read_text())  # the results are kept
    assert [(d["round"], d["client"]) for d in doc["dropped_clients"]] == [(1, 3), (2, 3)]
    assert doc["rounds"][1]["metrics"]["clients_dropped"] == 1 and doc["rounds"][1]["clients"]["3"]["dropped"] == 1
    # the same run accepted: exit 0, still named in the round lines and the results
    assert run_main(["--config", str(config), "--no-progress", "--overwrite",
                     "--set", "federation.allow_dropped_clients=true"]) == 0
    out, _ = capsys.readouterr()
    assert "DROPPED client 3" in out


@pytest.mark.slow
def test_a_damaged_client_state_on_ray_rolls_server_and_actors_back(unfaulted_sampled, tiny_weights, tmp_path):
    # a finished 2-round run; client 2's newest state (round 2) is truncated. Resumed to 3 rounds, an actor
    # meets it when it evaluates client 2 in round 3: the whole run goes back to round 1 (server checkpoint,
    # every actor's in-memory states) and redoes rounds 2 and 3, ending as the unfaulted 3-round run.
    run_experiment(sampled_cfg(tmp_path / "run", tiny_weights, 0.6, 2), progress=False)
    state = tmp_path / "run" / "checkpoints" / "clients" / "2" / "round_2.pt"
    state.write_bytes(state.read_bytes()[:100])
    assert run_main(["--resume", str(tmp_path / "run"), "--set", "train.rounds=3", "--no-progress"]) == 0
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    assert state.with_name("round_2.pt.unreadable").is_file()
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2, 3]
    report("Ray, newest state of client 2 truncated, resumed (rolled back)", doc, unfaulted_sampled)
    assert_same_metrics(doc, unfaulted_sampled)
    assert finals(doc) == finals(unfaulted_sampled)
