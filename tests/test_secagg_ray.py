"""SecAgg on the Ray runtime: the same sums as in-process, and client actors killed mid-protocol."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

from conftest import RAY_SESSION_TOKEN

from fedpgp_ray.checkpoint import CheckpointStore
from fedpgp_ray.config import config_from_dict
from fedpgp_ray.federation import run_federation
from fedpgp_ray.run import feature_cache_dir
from fedpgp_ray.runtime.local import LocalRuntime
from fedpgp_ray.runtime.ray import FaultPlan, RayRuntime


@pytest.fixture(scope="module")
def ray_session():
    """A fresh local Ray instance (2 CPUs), token auth on with a token from the environment."""
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


def make_cfg(out: Path, kind: str):
    return config_from_dict({
        "seed": 0, "output_dir": str(out),
        "model": {"name": "fedpgp-tiny", "pretrained": None},
        "data": {"dataset": "world", "shots": 4, "world": {"num_classes": 40, "train_per_class": 8, "test_per_class": 6}},
        "train": {"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.002},
        "federation": {"num_clients": 5},
        "tracking": {"mlflow": False},
        # 5 clients: every other client is a neighbour (k = 4); t = floor(0.25 k) + 1 = 2 of them reconstruct
        "secagg": {"enabled": True, "clip_range": 1.0, "threshold": 0.25},
        "runtime": {"kind": kind, "num_actors": 2, "num_cpus_per_actor": 1, "threads_per_worker": 1,
                    "placement_timeout_s": 20},
    })


def run(cfg, faults: FaultPlan | None = None) -> dict:
    store = CheckpointStore(Path(cfg.output_dir) / "checkpoints")
    if cfg.runtime.kind == "local":
        with LocalRuntime(cfg, store, feature_cache_dir()) as runtime:
            return run_federation(cfg, runtime, store)
    with RayRuntime(cfg, store, feature_cache_dir(), faults=faults) as runtime:
        return run_federation(cfg, runtime, store)


@pytest.mark.slow
def test_secagg_on_ray_matches_in_process_and_survives_actor_kills(ray_session, tmp_path):
    # the fedpgp-tiny backbone is random but seeded: identical in every process
    in_process = run(make_cfg(tmp_path / "local", "local"))
    on_ray = run(make_cfg(tmp_path / "ray", "ray"))
    for a, b in zip(on_ray["rounds"], in_process["rounds"]):
        for key in ("local", "base", "novel", "secagg/survivors"):
            assert a["metrics"].get(key) == pytest.approx(b["metrics"].get(key), abs=1e-4), (a["round"], key)
    # slot 1 serves clients 1 and 3: killed before round 1's masked inputs (both drop out, their masks are
    # removed with the shares of the 3 others) and before round 2's unmasking (their inputs count; shares from the rest)
    faults = FaultPlan(secagg_kill={(1, "masked_input", 3), (2, "unmask", 1)})
    killed = run(make_cfg(tmp_path / "killed", "ray"), faults)
    assert killed["rounds"][1]["metrics"]["secagg/survivors"] == 3
    assert killed["rounds"][2]["metrics"]["secagg/survivors"] == 5
    # a kill that leaves fewer than t = 2 share holders fails the round loudly, nothing unmasked
    from fedpgp_ray.strategy import RoundFailedError
    cfg = make_cfg(tmp_path / "failed", "ray")
    with pytest.raises(RoundFailedError, match="threshold"):
        run(cfg, FaultPlan(secagg_kill={(1, "unmask", 1), (1, "unmask", 0)}))
