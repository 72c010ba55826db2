"""The README's "On a Ray cluster" commands, run exactly as written (extracted from README.md).

Twice: on a fresh HOME (no ~/.ray/auth_token: the README's own `ray get-auth-token --generate`
creates it), and on a HOME where a local `ray.init()` already wrote the token (a machine where
`make run` has run, the case that used to fail with HTTP 401). Each run happens in a copy of the
repository (the commands write runs/ under the current directory) inside a network namespace the
test creates (`unshare -n`, loopback only), so the README's fixed ports cannot collide with
anything else on the machine and no traffic leaves it. Needs root, as the CI machines have.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def readme_commands() -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(r"<!-- cluster-recipe:start -->\n```bash\n(.*?)```\n<!-- cluster-recipe:end -->", text, re.S)
    assert found, "README.md lost its cluster-recipe markers"
    return found.group(1)


def test_docs_show_the_same_commands():
    assert readme_commands() in (REPO / "docs" / "RAY.md").read_text()


def repo_copy(dest: Path) -> Path:
    """The working tree as git sees it (tracked and untracked-but-not-ignored files)."""
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def user_env(home: Path) -> dict[str, str]:
    """A user's shell: the venv active, a HOME of its own, no Ray or MLflow settings inherited."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_", "FEDPGP_", "AWS_", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(BIN.parent))
    return env


def in_private_network(script: str) -> list[str]:
    return ["unshare", "-n", "bash", "-c", f"ip link set lo up\n{script}"]


def leftovers(home: Path) -> dict[int, str]:
    """pid -> command of the processes still running with this HOME (the README's cluster must be gone)."""
    mark = f"HOME={home}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if mark in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ")[:120].decode()
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return found


def run_readme(tmp_path: Path, home: Path) -> None:
    work = repo_copy(tmp_path / "repo")
    env = user_env(home)
    temp_dirs = set(Path("/tmp").glob("ray-??????"))  # the recipe's mktemp -d /tmp/ray-XXXXXX
    began = time.monotonic()
    done = subprocess.run(in_private_network(readme_commands()), cwd=work, env=env, capture_output=True, text=True,
                          timeout=1800, start_new_session=True)
    log = done.stdout + done.stderr
    try:
        assert "succeeded" in log and "Job 'raysubmit_" in log, log[-5000:]
        assert not re.search(r"(?<![\d.])401(?![\d.])", log) and "Missing authentication token" not in log
        doc = json.loads((work / "runs" / "quickstart-job" / "results.json").read_text())
        assert doc["runtime"] == "ray" and [r["round"] for r in doc["rounds"]][-1] == doc["config"]["train"]["rounds"]
        assert doc["rounds"][-1]["metrics"]["clients_reported"] == 10
        assert "fedpgp round 1/" in log  # --no-progress: one line per round in the job's log
        # the job logs into the workspace's store (named in the job's env_vars), not one beside runs/
        assert (work / "mlflow.db").is_file() and not (work / "runs" / "mlflow.db").exists()
        deadline = time.monotonic() + 60
        while leftovers(home) and time.monotonic() < deadline:
            time.sleep(2)
        assert not leftovers(home), leftovers(home)  # `kill $RAY_HEAD_PID` stopped this cluster
        assert set(Path("/tmp").glob("ray-??????")) <= temp_dirs  # and `rm -rf "$RAY_TMP"` removed its folder
        assert (home / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600  # the token is the user's only
        print(f"README cluster commands: {time.monotonic() - began:.0f} s")
    finally:
        for pid in leftovers(home):  # never leave a cluster behind, even when an assertion failed
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_readme_cluster_commands_on_a_fresh_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    run_readme(tmp_path, home)
    assert (home / ".ray" / "auth_token").is_file()  # the README's first line created it


def test_readme_cluster_commands_after_a_local_ray_init_wrote_the_token(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    # what `make run` does first: a local Ray instance, token auth left at Ray's default
    init = "import ray; ray.init(num_cpus=1, include_dashboard=False); ray.shutdown()"
    done = subprocess.run(in_private_network(f"{sys.executable} -c '{init}'"), env=user_env(home),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (home / ".ray" / "auth_token").is_file()
    run_readme(tmp_path, home)
