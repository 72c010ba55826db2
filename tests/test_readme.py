"""The README's commands run in order on a copy of the checkout: `make run`, then the block between
`<!-- readme-commands:start -->` and `<!-- readme-commands:end -->` as it stands, in one shell.

Afterwards the workspace holds exactly one tracking store (`./mlflow.db`) with every run in it;
the test prints its runs and registered models."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_readme_cluster import repo_copy

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(r"<!-- readme-commands:start -->\n```bash\n(.*?)```\n<!-- readme-commands:end -->", text, re.S)
    assert found, "README.md lost its readme-commands markers"
    return found.group(1)


def test_readme_commands_run_in_order_and_share_one_store(tmp_path):
    work = repo_copy(tmp_path / "repo")
    link = work / "fedpgp_ray" / "configs"  # a link in git (to ../configs): repo_copy copies plain files only
    if not link.exists():
        link.symlink_to(Path("..") / "configs")
    (work / ".venv").symlink_to(VENV)  # `make run` would create it; the suite's own environment stands in
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "VIRTUAL_ENV"))}
    env.update(PYTHONPATH=str(work))  # this copy's package, not an installed one
    began = time.monotonic()
    # make run as the README says, without rebuilding the environment (-o: the stamp counts as made)
    script = f"set -euo pipefail\nmake -o .venv/.installed-stamp run\n{readme_block()}"
    done = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True,
                          timeout=3000, start_new_session=True)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert "error:" not in log, log[-6000:]
    stores = sorted(str(p.relative_to(work)) for p in work.rglob("mlflow.db"))
    assert stores == ["mlflow.db"], stores  # one store per workspace, whatever the entry point

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    names = sorted(r.info.run_name for r in runs)
    for expected in ("fedpgp-quickstart", "fedpgp-world_domains", "fedpgp-rank4", "clip-clip", "fedpgp-fedpgp"):
        assert expected in names, names
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    models = sorted(f"{m.name} (v{max(int(v.version) for v in m.latest_versions)})"
                    for m in client.search_registered_models())
    print(f"\nREADME commands in order: {time.monotonic() - began:.0f} s; stores: {stores}; "
          f"runs: {names}; registered models ({len(models)}): {models}")
