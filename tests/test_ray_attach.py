"""Attaching to a running cluster (`runtime.address`): a head started on loopback is reached on
loopback, and a driver with the wrong token gets one line instead of Ray's traceback."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY
from processes import free_port, stop_group

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def loopback_head(tmp_path_factory):
    """A single-node Ray head listening on 127.0.0.1 only, token auth on (its own token and HOME)."""
    base = tmp_path_factory.mktemp("head")
    token = os.urandom(16).hex()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(base), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    temp = Path(f"/tmp/ray-attach-{os.getpid()}")  # Ray's socket paths must stay short
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(temp.glob("session_*/logs/raylet.out")) and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(3)
        yield {"address": f"127.0.0.1:{port}", "token": token, "home": base}
    finally:
        stop_group(head)
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def run_driver(head: dict, token: str, tmp_path: Path) -> subprocess.CompletedProcess:
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "run"),
                                      "train": {**TINY["train"], "rounds": 1},
                                      "runtime": {"kind": "ray", "num_actors": 1, "address": head["address"]}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(head["home"]), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return subprocess.run([sys.executable, "-m", "fedpgp_ray.run", "--config", str(config), "--no-progress"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_wrong_token_is_one_line(loopback_head, tmp_path):
    proc = run_driver(loopback_head, os.urandom(16).hex(), tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: the Ray cluster at {loopback_head['address']} refused this driver's token "
                      f"(InvalidAuthToken): use the token of the cluster (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                      f"~/.ray/auth_token as on the machine that started it; `ray get-auth-token` prints it there)"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "run.json").exists()  # a failed start claims nothing


@pytest.mark.slow
def test_a_head_on_loopback_is_attached_on_loopback(loopback_head, tmp_path):
    """Without single-node mode in the driver, Ray rewrites 127.0.0.1 to this machine's own address,
    where the head does not listen: the driver hung for ever."""
    proc = run_driver(loopback_head, loopback_head["token"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "results.json").exists()
