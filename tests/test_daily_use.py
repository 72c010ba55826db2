"""Daily use: threads from the resources a worker was given, progress inside long rounds, and
`run --algorithms` on one Ray instance."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_cfg
from fedpgp_ray.config import load_config, packaged_configs
from fedpgp_ray.runtime import base
from fedpgp_ray.runtime.base import RoundProgress, worker_threads

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_config_gets_its_threads_from_its_resources():
    for name in packaged_configs():
        rc = load_config(name).runtime
        threads = worker_threads(rc)
        assert threads >= 1, name
        # never torch's default (every core per process) and never more than the CPUs given
        assert threads == (rc.threads_per_worker or max(int(rc.num_cpus_per_actor), 1)), name
        assert rc.threads_per_worker or threads <= max(rc.num_cpus_per_actor, 1), name


def test_in_process_worker_uses_the_cpus_it_was_given(tmp_path):
    from fedpgp_ray.runtime.local import LocalRuntime

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cfg = make_cfg(tmp_path, ["runtime.num_cpus_per_actor=1"])  # threads_per_worker 0: from the CPUs
        LocalRuntime(cfg, None, str(tmp_path / "cache"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_round_progress_counts_clients_only_in_long_rounds(capsys):
    quick = RoundProgress(3, "fit", 10)  # the default interval: a fast round says nothing
    for done in range(1, 11):
        quick.client_done(done)
    assert capsys.readouterr().err == ""
    slow = RoundProgress(3, "fit", 4, every_s=0.0)
    for done in range(1, 5):
        slow.client_done(done)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"round 3 fit: {d}/4 clients done" for d in (1, 2, 3)]


def test_a_local_run_reports_progress_inside_rounds(tmp_path, capsys, monkeypatch):
    from fedpgp_ray.run import main

    monkeypatch.setattr(base, "PROGRESS_EVERY_S", 0.0)
    out = tmp_path / "run"
    args = ["--set", f"output_dir={out}", "--set", "train.rounds=1", "--set", "tracking.mlflow=false",
            "--set", "runtime.kind=local", "--set", "model.pretrained=null", "--set", "federation.num_clients=3",
            "--set", "data.world.num_classes=12", "--set", "data.world.test_per_class=4", "--no-progress"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "round 1 fit: 2/3 clients done" in err and "writing results.json" in err
    assert main(["--resume", str(out), "--no-progress"]) == 0
    assert "resume: rounds 0-1 are checkpointed; no round left to train" in capsys.readouterr().err


@pytest.mark.slow
def test_run_algorithms_on_ray_starts_one_ray_instance(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    cmd = [sys.executable, "-m", "fedpgp_ray.run", "--algorithms", "clip,local",
           "--set", f"output_dir={tmp_path / 'runs' / 'q'}", "--set", "train.rounds=1", "--set", "tracking.mlflow=false",
           "--set", "runtime.kind=ray", "--set", "runtime.num_actors=1", "--set", "model.pretrained=null",
           "--set", "federation.num_clients=2", "--set", "data.world.num_classes=8",
           "--set", "data.world.test_per_class=4", "--set", "data.world.train_per_class=4", "--set", "data.shots=2",
           "--no-progress"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    starts = [line for line in proc.stderr.splitlines() if line.startswith("Ray: starting a local instance")]
    assert len(starts) == 1 and "for all runs" in starts[0], proc.stderr
    for name in ("clip", "local"):
        assert json.loads((tmp_path / "runs" / "q" / name / "results.json").read_text())["algorithm"] == name
