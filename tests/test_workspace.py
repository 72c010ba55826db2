"""One tracking store per workspace: every entry point resolves the same default store."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedpgp_ray import tracking
from fedpgp_ray.workspace import default_store_path, in_ray_job_package

REPO = Path(__file__).resolve().parents[1]


def test_runs_under_the_working_directory_share_its_store(tmp_path):
    for out in ("runs/quickstart", "runs/quickstart/fedpgp", "runs/compare/fedpgp/seed0",
                "runs/mlflow-0123abcd", str(tmp_path / "runs" / "x")):
        assert default_store_path(out, cwd=tmp_path) == tmp_path / "mlflow.db", out


def test_runs_outside_the_working_directory_keep_the_store_beside_their_folder(tmp_path):
    elsewhere = tmp_path / "data" / "runs" / "a"
    assert default_store_path(elsewhere, cwd=tmp_path / "work") == tmp_path / "data" / "runs" / "mlflow.db"
    # output_dir = the working directory itself: the store does not go inside the run directory
    assert default_store_path(".", cwd=tmp_path) == tmp_path.parent / "mlflow.db"


def test_uri_output_dir_and_ray_job_package_use_a_persistent_store(tmp_path):
    home = Path.home() / ".fedpgp-ray" / "mlflow.db"
    assert default_store_path("s3://bucket/runs/x?endpoint_override=127.0.0.1:9000", cwd=tmp_path) == home
    job = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    assert in_ray_job_package(job) and not in_ray_job_package(tmp_path)
    assert default_store_path("runs/q", cwd=job) == home
    # an absolute run directory outside the job package keeps its store beside it (lasting, shared)
    assert default_store_path(str(tmp_path / "shared" / "q"), cwd=job) == tmp_path / "shared" / "mlflow.db"


def test_a_named_store_inside_a_ray_job_package_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job_db = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc" / "mlflow.db"
    with pytest.raises(tracking.TrackingError, match="inside Ray's temporary job directory"):
        tracking._normalize_uri(f"sqlite:///{job_db}")


def test_run_names_never_carry_a_uri_query():
    assert tracking.run_dir_name("s3://bucket/runs/c?endpoint_override=http://127.0.0.1:9000&scheme=http") == "c"
    assert tracking.run_dir_name("s3://bucket/runs/c/") == "c"
    assert tracking.run_dir_name("/abs/runs/quickstart") == "quickstart"


def test_mlflow_cli_default_is_the_workspace_store(tmp_path):
    """`mlflow run` creates its run in MLflow's own default store: the same file as ours."""
    code = ("import mlflow.tracking._tracking_service.utils as u; print(u.get_tracking_uri())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=120)
    uri = out.stdout.strip().splitlines()[-1]
    assert uri.startswith("sqlite:") and Path(uri.split("sqlite:///")[-1]).resolve() == tmp_path / "mlflow.db"


@pytest.mark.slow
def test_a_tracked_run_records_its_dataset_and_system_metrics_on_request(tmp_path, monkeypatch):
    """mlflow.data dataset input on every tracked run; system metrics only with tracking.system_metrics."""
    from mlflow import MlflowClient

    from fedpgp_ray.config import config_from_dict
    from fedpgp_ray.run import run_experiment
    from fedpgp_ray.tracking_data import dataset_digest

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    small = {"seed": 0, "model": {"pretrained": None}, "algorithm": {"n_ctx": 4},
             "data": {"dataset": "world", "shots": 2, "world": {"num_classes": 12, "train_per_class": 4,
                                                                 "test_per_class": 4}},
             "train": {"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.002},
             "federation": {"num_clients": 3}, "tracking": {"log_models": False}}
    ids = {}
    for system in (False, True):
        cfg = config_from_dict({**small, "output_dir": str(tmp_path / "runs" / f"s{int(system)}")},
                               [f"tracking.system_metrics={str(system).lower()}"])
        run_experiment(cfg, progress=False)
        ids[system] = json.loads((tmp_path / "runs" / f"s{int(system)}" / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    for system, run_id in ids.items():
        run = client.get_run(run_id)
        (inp,) = run.inputs.dataset_inputs
        assert inp.dataset.name == "world-pathological" and inp.dataset.digest == dataset_digest(cfg)
        assert [(t.key, t.value) for t in inp.tags] == [("mlflow.data.context", "federated")]
        has_system = any(k.startswith("system/") for k in run.data.metrics)
        if not system:  # off unless asked for (when on, a short run may end before the first sample)
            assert not has_system, sorted(run.data.metrics)
