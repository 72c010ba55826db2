"""MLflow tracking: params, batched per-round metrics, artifacts, resume, off switch, fail-fast, MLproject."""
from __future__ import annotations

import copy
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml
from processes import free_port

from fedpgp_ray import mlflow_project, tracking
from fedpgp_ray.config import config_from_dict
from fedpgp_ray.run import main, run_experiment

# MLflow's own SQLAlchemy models trigger this on every new store; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

REPO = Path(__file__).resolve().parents[1]
PROJECT = REPO / "mlflow_projects" / "fedpgp"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Small enough that a round takes a few seconds on 2 cores.
SMALL = {"seed": 0, "model": {"pretrained": None}, "algorithm": {"n_ctx": 4},
         "data": {"dataset": "world", "shots": 2, "world": {"num_classes": 12, "train_per_class": 4, "test_per_class": 4}},
         "train": {"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.002},
         "federation": {"num_clients": 3}}
SMALL_OVERRIDES = ("model.pretrained=null algorithm.n_ctx=4 data.shots=2 data.world.num_classes=12 "
                   "data.world.train_per_class=4 data.world.test_per_class=4 train.local_epochs=1 "
                   "federation.num_clients=3 federation.client_fraction=1.0")


@pytest.fixture(autouse=True)
def _no_mlflow_env(monkeypatch):
    """Tests choose their store explicitly; an MLflow environment of the caller must not leak in."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)


def small_cfg(tmp_path, *overrides: str, mlflow: bool = True):
    data = {**copy.deepcopy(SMALL), "output_dir": str(tmp_path / "run"), "tracking": {"mlflow": mlflow}}
    return config_from_dict(data, list(overrides))  # deep copy: overrides write into nested dicts


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def artifact_files(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifact_files(client, run_id, item.path) if item.is_dir else {item.path}
    return out


# -- units (no training) --------------------------------------------------------------------------------
def test_params_are_prefixed_and_never_clash_with_project_params(tmp_path):
    params = tracking.config_params(small_cfg(tmp_path))
    assert params and all(k.startswith("cfg.") for k in params)
    assert params["cfg.train.rounds"] == "2" and params["cfg.model.pretrained"] == "null"
    project = yaml.safe_load((PROJECT / "MLproject").read_text())
    assert not set(project["entry_points"]["main"]["parameters"]) & set(params)


def test_round_metrics_are_split_into_batches_of_1000_with_the_marker_last():
    report = types.SimpleNamespace(round=3, metrics={"round_seconds": 1.0, "local": 50.0, "novel": float("nan")},
                                   clients={c: {"local": 1.0, "base": 2.0, "train_loss": 0.5} for c in range(400)})
    metrics = tracking.round_metrics(report)
    assert "novel" not in metrics and metrics["client/31/train_loss"] == 0.5
    assert "client/32/local" not in metrics  # a bounded number of per-client series (all in clients.parquet)
    assert list(metrics)[-1] == tracking.STEP_MARKER
    metrics = {**{f"extra/{i}": 1.0 for i in range(1202 - len(metrics))}, **metrics}
    calls = []
    fake = types.SimpleNamespace(log_batch=lambda run_id, metrics=(), **_: calls.append(list(metrics)))
    run = types.SimpleNamespace(info=types.SimpleNamespace(run_id="r", run_name="n", experiment_id="1",
                                                            artifact_uri="file:///x"))
    tracker = tracking.MlflowTracker(small_cfg(Path("/tmp")), fake, run, "sqlite:////x.db", set())
    tracker.queue_round(3, metrics)
    tracker.flush()
    tracker.close()
    assert [len(c) for c in calls] == [1000, 202]
    assert calls[-1][-1].key == tracking.STEP_MARKER and all(p.step == 3 for c in calls for p in c)


def test_project_parameters_map_onto_run_arguments():
    assert mlflow_project.project_argv("/c.yaml", "2", "", "", "", "") == ["--config", "/c.yaml", "--set", "train.rounds=2"]
    argv = mlflow_project.project_argv("", "", "local,fedpgp", "3", "train.lr=0.01 'data.domains=[a, b]'", "/out")
    assert argv == ["--algorithms", "local,fedpgp", "--set", "seed=3", "--set", "output_dir=/out",
                    "--set", "train.lr=0.01", "--set", "data.domains=[a, b]"]


def test_project_entry_point_refuses_a_missing_workdir(tmp_path, capsys):
    assert mlflow_project.project_main(["run", "--workdir", str(tmp_path / "missing"), "--config", "quickstart"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --workdir") and len(err.strip().splitlines()) == 1


def test_compare_and_bench_parameters_pass_through():
    pairs = ["--config", "/c.yaml", "--algorithms", "", "--seeds", "0,1", "--ablations", "false",
             "--overrides", "train.rounds=1 federation.num_clients=3", "--no-progress", "true"]
    assert mlflow_project.passthrough_argv(pairs) == ["--config", "/c.yaml", "--seeds", "0,1", "--no-progress",
                                                "--set", "train.rounds=1", "--set", "federation.num_clients=3"]
    project = yaml.safe_load((PROJECT / "MLproject").read_text())
    modules = {"compare": REPO / "fedpgp_ray" / "compare.py", "bench": REPO / "fedpgp_ray" / "bench.py"}
    assert set(project["entry_points"]) == {"main"} | {name for name, path in modules.items() if path.exists()}


def test_python_env_repeats_requirements_txt():
    env = yaml.safe_load((PROJECT / "python_env.yaml").read_text())
    lines = [ln.split("#")[0].strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    assert env["python"] == "3.11" and env["dependencies"] == [ln for ln in lines if ln]


def test_uri_rules(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path)
    # the default store sits beside the run directory: runs under one folder share it
    assert tracking.resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path / "..")
    assert tracking.default_tracking_uri("s3://bucket/runs/a") == f"sqlite:///{Path.home() / '.fedpgp-ray' / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    cfg.tracking.uri = "sqlite:///rel/mlflow.db"
    assert tracking.resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path / 'rel' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(cfg) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "mlruns"))
    with pytest.raises(tracking.TrackingError, match="file store"):
        tracking.resolve_tracking_uri(cfg)


def test_mlflow_is_imported_only_when_tracking_is_on():
    code = "import sys, fedpgp_ray.run, fedpgp_ray.tracking; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -- fail fast, off switch ----------------------------------------------------------------------------------
def test_unreachable_tracking_server_fails_before_training(tmp_path, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "output_dir": str(tmp_path / "run")}))
    began = time.perf_counter()
    assert main(["--config", str(config), "--no-progress"]) == 2
    assert time.perf_counter() - began < 60  # not MLflow's minutes of retries (a hang guard, not a speed test)
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: MLflow tracking server") and uri in err and "cannot be reached" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()  # no round ran


def test_tracking_off_writes_no_store_and_contacts_none(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # would fail if used
    cfg = small_cfg(tmp_path, "train.rounds=1", mlflow=False)
    run_experiment(cfg, progress=False)
    captured = capsys.readouterr()  # start-up says what it does (stderr), then one line per round (stdout)
    assert "starting the local runtime" in captured.err and "loading the backbone" in captured.err
    assert "fedpgp round 0/1:" in captured.out and "fedpgp round 1/1:" in captured.out
    out = Path(cfg.output_dir)
    assert (out / "results.json").is_file()
    assert not (out.parent / "mlflow.db").exists() and not (out / tracking.RUN_FILE).exists()
    assert not (out.parent / tracking.ARTIFACT_DIR).exists()
    # the tables and figures are written to the run directory all the same
    assert {"results.csv", "results.md", "rounds.csv", "accuracy.png", "clients.png"} <= {p.name for p in out.iterdir()}


def test_mlflow_run_id_is_honoured_and_a_second_experiment_gets_a_child_run(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("handed-over", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(experiment).info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_RUN_ID", parent)  # what `mlflow run` hands to its command
    monkeypatch.setattr(tracking, "_CLAIMED", {})
    first = tracking.start_tracker(small_cfg(tmp_path / "a"))
    second = tracking.start_tracker(small_cfg(tmp_path / "b"))
    first.finished = second.finished = True  # no training here: keep the atexit hook off these runs
    first.close(), second.close()
    assert first.run_id == parent and second.run_id != parent
    assert client.get_run(second.run_id).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(parent).data.params["cfg.output_dir"] == str(tmp_path / "a" / "run")
    assert not (tmp_path / "a" / "mlflow.db").exists()  # the handed-over store, not the default

    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    with pytest.raises(tracking.TrackingError, match="MLFLOW_RUN_ID"):
        tracking.start_tracker(small_cfg(tmp_path / "c"))


# -- resume -----------------------------------------------------------------------------------------------
class CrashAt:
    """A listener that raises at a round: that round is checkpointed, but never reaches the tracker."""

    def __init__(self, rnd: int) -> None:
        self.rnd = rnd

    def on_round(self, report, global_params) -> None:
        if report.round == self.rnd:
            raise RuntimeError(f"crash at round {self.rnd}")


def test_resume_continues_the_same_run_without_duplicated_steps(tmp_path):
    from mlflow import MlflowClient

    cfg = small_cfg(tmp_path)
    with pytest.raises(RuntimeError, match="crash at round 2"):
        run_experiment(cfg, progress=False, listeners=[CrashAt(2)])
    out = Path(cfg.output_dir)
    saved = json.loads((out / tracking.RUN_FILE).read_text())
    client = MlflowClient(saved["tracking_uri"])
    assert saved["tracking_uri"] == f"sqlite:///{out.parent / 'mlflow.db'}"
    assert steps(client, saved["run_id"], "round_seconds") == [0, 1]  # round 2 checkpointed, not logged

    resumed = small_cfg(tmp_path, "train.rounds=3")
    run_experiment(resumed, resume=True, progress=False)
    assert json.loads((out / tracking.RUN_FILE).read_text())["run_id"] == saved["run_id"]
    runs = client.search_runs([saved["experiment_id"]])
    assert [r.info.run_id for r in runs] == [saved["run_id"]]
    run = runs[0]
    for key in ("round_seconds", "local", "hm3", "client/0/local"):
        assert steps(client, run.info.run_id, key) == [0, 1, 2, 3], key  # round 2 backfilled, none twice
    assert steps(client, run.info.run_id, "train_loss") == [1, 2, 3]
    assert run.info.status == "FINISHED"
    assert run.data.params["cfg.train.rounds"] == "2" and run.data.tags["resume.cfg.train.rounds"] == "3"
    files = artifact_files(client, run.info.run_id)
    assert {"checkpoints/server/round_1.pt", "checkpoints/server/round_3.pt", "results/results.json",
            "figures/accuracy.png"} <= files


# -- the MLflow Project, end to end --------------------------------------------------------------------------
@pytest.mark.slow
def test_mlflow_run_project_logs_every_round_and_the_artifacts(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("fedpgp-project-test", artifact_location=(tmp_path / "art").as_uri())
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    rounds = 2
    # from a user's own directory: a packaged config by name, the default output_dir (relative)
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", str(PROJECT),
           "-P", "config=quickstart", "-P", f"rounds={rounds}", "--env-manager", "local",
           "--experiment-name", "fedpgp-project-test", "-P", f"overrides={SMALL_OVERRIDES}"]
    before = sorted(p.relative_to(PROJECT) for p in PROJECT.rglob("*"))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"mlflow ui --backend-store-uri {shlex.quote(uri)}" in proc.stdout

    (run,) = client.search_runs([experiment])
    rid, params = run.info.run_id, run.data.params
    assert run.info.status == "FINISHED"
    assert params["rounds"] == "2" and params["cfg.train.rounds"] == "2"  # -P params and cfg.* side by side
    out = tmp_path / "runs" / f"mlflow-{rid}"  # under the directory `mlflow run` ran in, not in mlflow_projects/
    assert params["cfg.output_dir"] == str(out) and (out / "results.json").is_file()
    assert sorted(p.relative_to(PROJECT) for p in PROJECT.rglob("*")) == before
    tags = run.data.tags
    assert {"algorithm", "dataset", "runtime"} <= set(tags) and tags["algorithm"] == "fedpgp"
    from fedpgp_ray import __version__
    assert tags["fedpgp_ray_version"] == __version__ and tags["config_file"] == "quickstart.yaml"
    assert tags["hostname"] == socket.gethostname() and len(tags["git_commit"]) == 40
    every, clients = int(params["cfg.evaluation.every"]), int(params["cfg.federation.num_clients"])
    evaluated = [r for r in range(rounds + 1) if r in (0, rounds) or r % every == 0]
    trained = list(range(1, rounds + 1))
    assert steps(client, rid, "round_seconds") == list(range(rounds + 1))
    for key in ("local", "base", "novel", "hm3", "hm2"):
        assert steps(client, rid, key) == evaluated, key
    for key in ("train_loss", "train_loss_ce", "train_loss_con", "clients_sampled", "clients_reported",
                "clients_failed", "bytes_uploaded"):
        assert steps(client, rid, key) == trained, key
    for cid in range(clients):
        assert steps(client, rid, f"client/{cid}/local") == evaluated
        assert steps(client, rid, f"client/{cid}/train_loss") == trained
    assert steps(client, rid, "tracking_seconds") == list(range(rounds + 1))

    files = artifact_files(client, rid)
    every_ckpt = int(params["cfg.tracking.checkpoint_every"])
    expected = {"config/config.yaml", "results/results.json", "results/results.csv", "results/results.md",
                "results/rounds.csv", "figures/accuracy.png", "figures/clients.png",
                *(f"checkpoints/server/round_{r}.pt" for r in trained if r % every_ckpt == 0 or r == rounds),
                *(f"checkpoints/clients/{c}/round_{rounds}.pt" for c in range(clients))}
    assert expected <= files, expected - files
    local = Path(client.download_artifacts(rid, "", str(tmp_path / "down")))
    for name in ("accuracy.png", "clients.png"):
        data = (local / "figures" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR" and len(data) > 5000, name
        from PIL import Image

        with Image.open(local / "figures" / name) as image:
            image.verify()
    doc = json.loads((local / "results" / "results.json").read_text())
    assert doc == json.loads((out / "results.json").read_text())
    assert yaml.safe_load((local / "config" / "config.yaml").read_text())["train"]["rounds"] == rounds
    assert "| all |" in (local / "results" / "results.md").read_text()


RACER = """
import os, sys, time
from pathlib import Path
from fedpgp_ray.config import config_from_dict
from fedpgp_ray.tracking import start_tracker
base = Path(sys.argv[1])
cfg = config_from_dict({"output_dir": str(base / f"run{os.getpid()}"), "tracking": {"mlflow": True}})
Path(cfg.output_dir).mkdir()
(base / f"ready{os.getpid()}").touch()
while not (base / "go").exists():
    time.sleep(0.001)
start_tracker(cfg).end("FINISHED")
"""


def test_first_runs_started_at_once_into_a_fresh_store_all_start(tmp_path):
    """Without the store's first-use lock, 3 of 4 failed: `table latest_metrics already exists`."""
    import mlflow

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    try:
        deadline = time.monotonic() + 240
        while len(list(tmp_path.glob("ready*"))) < 4 and time.monotonic() < deadline \
                and all(p.poll() is None for p in procs):
            time.sleep(0.05)
        (tmp_path / "go").touch()  # all four open the fresh store within milliseconds
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    runs = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4
