"""Reliability: bad input refused in one line before any work; a run directory belongs to one run;
resume refuses what it cannot honour and falls back past a damaged checkpoint (docs/RELIABILITY.md)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedpgp_ray import rundir
from fedpgp_ray.config import ConfigError, config_from_dict
from fedpgp_ray.run import main, run_experiment

from conftest import TINY
from processes import free_port, stop_group

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, **changes) -> Path:
    data = {**TINY, "output_dir": str(tmp_path / "run"), "runtime": {"kind": "local"}, **changes}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


# -- config values and files ------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["train.lr=.nan", "algorithm.mu=.nan", "algorithm.tau=.inf",
                                      "runtime.placement_timeout_s=-.inf", "data.beta=.NaN"])
def test_non_finite_numbers_are_refused(override):
    with pytest.raises(ConfigError, match="is not a finite number") as err:
        config_from_dict({}, [override])
    assert f"'{override.split('=')[0]}'" in str(err.value) and "\n" not in str(err.value)


def test_non_finite_number_in_a_config_file_exits_2_before_any_work(tmp_path, capsys):
    config = write_config(tmp_path, algorithm={"mu": float("nan")})
    assert main(["--config", str(config), "--no-progress"]) == 2
    assert "'algorithm.mu' = nan is not a finite number" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_config_file_that_is_not_text(tmp_path, capsys):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x80\x04\x95\xff\xfe" + bytes(range(256)))
    assert main(["--config", str(binary)]) == 2
    assert f"config file {binary} is not UTF-8 text" in one_error_line(capsys)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert main(["--config", str(listing)]) == 2
    assert f"config file {listing} holds a list, not a mapping" in one_error_line(capsys)


def test_set_value_that_is_not_yaml(capsys):
    assert main(["--set", "train.lr=[0.1,", "--no-progress"]) == 2
    err = one_error_line(capsys)
    assert "--set train.lr: value '[0.1,' is not valid YAML" in err


def test_read_only_output_dir_fails_at_start_up(tmp_path):
    """A read-only bind mount (in a private mount namespace: root ignores file modes) over the run's parent."""
    parent = tmp_path / "ro"
    parent.mkdir()
    config = write_config(tmp_path, output_dir=str(parent / "run"))
    script = (f"mount --bind {parent} {parent} && mount -o remount,bind,ro {parent} && "
              f"exec {sys.executable} -m fedpgp_ray.run --config {config} --no-progress")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert lines == [f"error: output_dir {parent / 'run'} is not writable (Read-only file system): choose a "
                     f"writable directory with --set output_dir=/path or fix its permissions"]
    assert "Traceback" not in proc.stderr


def test_output_file_in_a_missing_place_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = write_config(tmp_path)
    assert main(["--config", str(config), "--output", str(blocker / "results.json"), "--no-progress"]) == 2
    assert "is not writable" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


# -- one run per directory ----------------------------------------------------------------------------
@pytest.fixture
def finished_run(tmp_path):
    """A finished 2-round run (in-process) and its config file."""
    config = write_config(tmp_path)
    assert main(["--config", str(config), "--no-progress"]) == 0
    return tmp_path / "run", config


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != rundir.LOCK_FILE}


def test_a_new_run_into_another_runs_directory_refuses_or_overwrites(finished_run, capsys):
    out, config = finished_run
    record = json.loads((out / rundir.RECORD_FILE).read_text())
    before = snapshot(out)
    capsys.readouterr()
    assert main(["--config", str(config), "--set", "train.rounds=1", "--no-progress"]) == 2
    err = one_error_line(capsys)
    assert f"output_dir {out} holds run {record['run_id']}" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(out) == before  # nothing rewritten

    # output_dir may hold other things too (even `.`): --overwrite removes only the run's own files
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    (out / "data" / "images.csv").write_text("a,b\n")
    (out / "backbone.json").write_text("{}")  # a run file this new run does not write again
    assert main(["--config", str(config), "--set", "train.rounds=1", "--overwrite", "--no-progress"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "data" / "images.csv").read_text() == "a,b\n"
    assert not (out / "backbone.json").exists()
    assert json.loads((out / rundir.RECORD_FILE).read_text())["run_id"] != record["run_id"]
    rounds = sorted(p.name for p in (out / "checkpoints" / "server").iterdir())
    assert rounds == ["round_0.pt", "round_1.pt"]  # the old run's round_2 is gone with it
    assert json.loads((out / "results.json").read_text())["config"]["train"]["rounds"] == 1


def test_overwrite_never_touches_a_folder_without_a_run_record(tmp_path, capsys):
    """output_dir: . in a project folder: the user's config.yaml and results.json are not a run."""
    project = tmp_path / "project"
    project.mkdir()
    config = project / "config.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(project), "runtime": {"kind": "local"}}))
    (project / "results.json").write_text('{"mine": 1}')
    before = snapshot(project)
    for extra in ([], ["--overwrite"]):
        assert main(["--config", str(config), "--no-progress", *extra]) == 2
        err = one_error_line(capsys)
        assert "config.yaml, results.json but no run record (run.json with a run id)" in err, err
        assert snapshot(project) == before


def test_overwrite_validates_the_new_request_before_deleting_the_old_run(finished_run, capsys):
    out, config = finished_run
    before = snapshot(out)
    capsys.readouterr()
    assert main(["--config", str(config), "--set", "model.pretrained=fedpgp-wrold", "--overwrite",
                 "--no-progress"]) == 2
    assert "unknown pretrained tag 'fedpgp-wrold'" in one_error_line(capsys)
    assert snapshot(out) == before  # the old run is intact
    assert main(["--config", str(config), "--set", f"data.root={out / 'no-such-folder'}", "--overwrite",
                 "--no-progress"]) == 2
    assert "is not a folder" in one_error_line(capsys)
    assert snapshot(out) == before
    nobody = f"http://127.0.0.1:{free_port()}"  # a tracking server that is not there
    assert main(["--config", str(config), "--set", "tracking.mlflow=true", "--set", f"tracking.uri={nobody}",
                 "--overwrite", "--no-progress"]) == 2
    assert f"MLflow tracking server {nobody} cannot be reached" in one_error_line(capsys)
    assert snapshot(out) == before


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cuda_without_cuda_is_one_line_before_the_run_directory_exists(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["--config", str(config), "--set", "model.device=cuda", "--no-progress"]) == 2
    assert "model.device is 'cuda' but no CUDA device is visible" in one_error_line(capsys)
    assert not (tmp_path / "run" / rundir.RECORD_FILE).exists()


def test_a_budget_below_one_round_is_refused_before_the_run_directory_and_the_mlflow_run(tmp_path, capsys):
    config = write_config(tmp_path, privacy={"enabled": True, "noise_multiplier": 0.5, "clip_norm": 0.1,
                                             "max_epsilon": 0.01},
                          tracking={"mlflow": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert main(["--config", str(config), "--no-progress"]) == 2
    assert "'privacy.max_epsilon' = 0.01 is below the epsilon of a single round" in one_error_line(capsys)
    assert not (tmp_path / "run" / rundir.RECORD_FILE).exists() and not (tmp_path / "run" / "config.yaml").exists()
    store = tmp_path / "mlflow.db"
    if store.exists():  # the store check may create the file; it must hold no run
        import mlflow
        client = mlflow.MlflowClient(f"sqlite:///{store}")
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_a_second_concurrent_run_refuses_at_once(tmp_path, capsys):
    config = write_config(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); "
                               "l.acquire(); print('held', flush=True); time.sleep(120)", str(out / rundir.LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["--config", str(config), "--no-progress"]) == 2
        assert f"another run is writing into {out}" in one_error_line(capsys)
        assert sorted(p.name for p in out.iterdir()) == [rundir.LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
    assert main(["--config", str(config), "--no-progress"]) == 0  # a dead holder leaves no stale lock


def test_resume_refuses_changed_shapes_and_semantics_and_keeps_the_directory(finished_run, capsys):
    out, _ = finished_run
    before = snapshot(out)
    capsys.readouterr()
    argv = ["--resume", str(out), "--set", "algorithm.n_ctx=8", "--set", "algorithm.name=promptfl",
            "--set", "seed=3", "--no-progress"]
    assert main(argv) == 2
    err = one_error_line(capsys)
    for change in ("algorithm.n_ctx: 16 -> 8", "algorithm.name: 'fedpgp' -> 'promptfl'", "seed: 0 -> 3"):
        assert change in err, err
    assert snapshot(out) == before
    for change in ("data.world.num_classes=20", "federation.num_clients=4", "model.name=ViT-B-16",
                   "data.partition=dirichlet"):
        assert main(["--resume", str(out), "--set", change, "--no-progress"]) == 2
        assert change.split("=")[0] in one_error_line(capsys)
    assert snapshot(out) == before


def test_resume_allows_safe_changes_and_logs_them(finished_run, caplog):
    out, _ = finished_run
    record = (out / rundir.RECORD_FILE).read_text()
    with caplog.at_level(logging.WARNING, logger="fedpgp_ray.rundir"):
        assert main(["--resume", str(out), "--set", "train.rounds=3", "--set", "evaluation.every=3",
                     "--no-progress"]) == 0
    assert "train.rounds: 2 -> 3" in caplog.text and "evaluation.every: 1 -> 3" in caplog.text
    doc = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2, 3]
    assert (out / rundir.RECORD_FILE).read_text() == record  # the same run, extended


def test_resume_falls_back_past_a_truncated_checkpoint(finished_run, caplog, capsys):
    out, _ = finished_run
    newest = out / "checkpoints" / "server" / "round_2.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="fedpgp_ray.checkpoint"):
        assert main(["--resume", str(out), "--no-progress"]) == 0
    warnings = [r for r in caplog.records if "falling back to round 1" in r.getMessage()]
    assert len(warnings) == 1
    assert (out / "checkpoints" / "server" / "round_2.pt.unreadable").is_file()
    doc = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2]  # round 2 ran again

    for path in (out / "checkpoints" / "server").glob("round_*.pt"):  # no readable round left
        path.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(["--resume", str(out), "--no-progress"]) == 2
    assert "and no earlier round is kept" in one_error_line(capsys)


def test_run_experiment_resume_compares_with_the_saved_config(finished_run):
    out, config = finished_run
    cfg = config_from_dict({**TINY, "output_dir": str(out), "runtime": {"kind": "local"}}, ["algorithm.rank=2"])
    with pytest.raises(rundir.RunDirError, match=r"cannot change algorithm.rank: 8 -> 2"):
        run_experiment(cfg, resume=True, progress=False)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00\x81 not text", b"", b"train: [unclosed", b"- a list\n"],
                         ids=["bytes", "empty", "bad-yaml", "not-a-mapping"])
def test_resume_with_an_unreadable_saved_config_exits_2_in_one_line(tmp_path, capsys, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / rundir.CONFIG_FILE).write_bytes(content)
    assert main(["--resume", str(out), "--no-progress"]) == 2
    assert f"the saved {out / rundir.CONFIG_FILE} cannot be read" in one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == [rundir.CONFIG_FILE]  # no run started, nothing written
    assert (out / rundir.CONFIG_FILE).read_bytes() == content


def test_resume_refuses_keys_missing_from_an_earlier_versions_config(finished_run, capsys):
    out, _ = finished_run
    saved = yaml.safe_load((out / rundir.CONFIG_FILE).read_text())
    del saved["data"]["partition_seed"]  # as an earlier version wrote it: its runs used the experiment seed
    (out / rundir.CONFIG_FILE).write_text(yaml.safe_dump(saved))
    before = snapshot(out)
    capsys.readouterr()
    assert main(["--resume", str(out), "--set", "seed=3", "--no-progress"]) == 2
    err = one_error_line(capsys)
    assert "data.partition_seed: <missing> -> 2023 (earlier versions: None)" in err and "seed: 0 -> 3" in err, err
    assert str(out / rundir.CONFIG_FILE) in err
    assert main(["--resume", str(out), "--set", "data.partition_seed=null", "--no-progress"]) == 2
    assert "data.partition_seed: <missing> -> None" in one_error_line(capsys)  # only the file can say
    assert snapshot(out) == before

    saved["data"]["partition_seed"] = 2023  # what the user adds, following the message
    (out / rundir.CONFIG_FILE).write_text(yaml.safe_dump(saved))
    assert main(["--resume", str(out), "--no-progress"]) == 0


# -- tracking store failures ----------------------------------------------------------------------------
SMALL_SETS = ["--set", "data.world.num_classes=12", "--set", "data.shots=2", "--set", "federation.num_clients=3",
              "--set", "algorithm.n_ctx=4", "--set", "runtime.kind=local", "--no-progress"]


def small_config_file(tmp_path: Path, rounds: int = 1) -> Path:
    return write_config(tmp_path, data={"dataset": "world", "shots": 2, "world": {"num_classes": 12,
                        "train_per_class": 4, "test_per_class": 4}}, algorithm={"n_ctx": 4},
                        federation={"num_clients": 3}, train={**TINY["train"], "rounds": rounds},
                        tracking={"mlflow": True})


def test_sqlite_store_on_a_read_only_filesystem_is_reported_at_start_up(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    config = small_config_file(tmp_path)
    script = (f"mount --bind {store} {store} && mount -o remount,bind,ro {store} && "
              f"MLFLOW_TRACKING_URI=sqlite:///{store}/mlflow.db exec {sys.executable} -m fedpgp_ray.run "
              f"--config {config} --no-progress")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"SQLite store {store}/mlflow.db cannot be written" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "will be retried" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # no round ran


ERROR_500_SERVER = """
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error_code": "INTERNAL_ERROR", "message": "database is gone"}')
    do_GET = do_POST = do_PATCH = do_DELETE = answer
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
print("ready", flush=True)
server.serve_forever()
"""


def test_http_store_answering_500_is_reported_at_start_up(tmp_path, monkeypatch, capsys):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", ERROR_500_SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        assert main(["--config", str(small_config_file(tmp_path)), "--no-progress"]) == 2
        err = one_error_line(capsys)
        assert f"MLflow tracking store http://127.0.0.1:{port} cannot be used" in err and "500" in err, err
        assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # lowered for the probe only
    finally:
        server.kill()
        server.wait()
    assert not (tmp_path / "run" / "checkpoints").exists()


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts), stopped and started by PID."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import urllib.request
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/server.db",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=(self.root / "server.log").open("a"), start_new_session=True)
        for _ in range(600):
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=1).close()
                return
            except OSError:
                assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
                import time
                time.sleep(0.2)
        raise AssertionError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, 60)  # its own session: the server and its workers, nothing else
        self.proc = None


class StopAndRestart:
    """A listener (runs before the tracker) that stops the server at one round and starts it at a later one."""

    def __init__(self, server: MlflowServer, stop_at: int, start_at: int) -> None:
        self.server, self.stop_at, self.start_at = server, stop_at, start_at

    def on_round(self, report, global_params) -> None:
        if report.round == self.stop_at:
            self.server.stop()
        if report.round == self.start_at:
            self.server.start()


@pytest.mark.slow
def test_a_tracking_server_that_goes_away_mid_run_loses_no_round(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from fedpgp_ray import tracking

    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        cfg = config_from_dict(yaml.safe_load(small_config_file(tmp_path, rounds=4).read_text()),
                               ["tracking.log_models=false"])
        trackers = []
        monkeypatch.setattr("fedpgp_ray.run.LISTENER_FACTORIES",
                            [lambda c, r: trackers.extend(tracking.mlflow_listeners(c, r)) or trackers])
        run_experiment(cfg, progress=False, listeners=[StopAndRestart(server, stop_at=1, start_at=3)])
        tracker = trackers[0]
        assert tracker.writer.failures > 0  # rounds 1 and 2 met a dead server ...
        client = MlflowClient(server.uri)
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED"
        for key in ("round_seconds", "local", "client/0/local"):  # ... and still every round is in the store
            assert sorted(m.step for m in client.get_metric_history(tracker.run_id, key)) == [0, 1, 2, 3, 4], key
        print(f"time in on_round per round (s): {tracker.seconds}")  # figures, not assertions
    finally:
        server.stop()


@pytest.mark.slow
def test_ctrl_c_with_the_tracking_server_gone_ends_the_process(tmp_path):
    import signal
    import time

    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server")
    server.start()
    config = small_config_file(tmp_path, rounds=50)
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "PYTHONUNBUFFERED": "1"}
    run = subprocess.Popen([sys.executable, "-m", "fedpgp_ray.run", "--config", str(config), "--no-progress"],
                           env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in run.stdout:  # the per-round lines of --no-progress
            if " round 2/" in line:
                break
        server.stop()
        for line in run.stdout:
            if " round 4/" in line:  # two rounds after the store went away: the run goes on
                break
        began = time.monotonic()
        run.send_signal(signal.SIGINT)
        rest = run.stdout.read()
        run.wait(timeout=120)
        print(f"exit {time.monotonic() - began:.1f} s after Ctrl-C")  # a figure, not an assertion
        assert run.returncode == 130, rest
        assert f"interrupted: the completed rounds are checkpointed; continue with `fedpgp-ray run --resume " \
               f"{tmp_path / 'run'}`" in rest
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        server.stop()


# -- hung client actors (the injected hang itself: tests/test_ray_runtime.py) ------------------------------
def test_automatic_task_timeout_is_generous_and_follows_the_slowest_task():
    from fedpgp_ray.runtime.ray import task_timeout

    assert task_timeout(None, 0.0) == 600.0         # nothing measured yet
    assert task_timeout(None, 3.0) == 600.0         # quickstart-sized tasks
    assert task_timeout(None, 240.0) == 2400.0      # slow tasks: 10 x the slowest
    assert task_timeout(30.0, 240.0) == 30.0        # runtime.task_timeout_s wins
    with pytest.raises(ConfigError, match="task_timeout_s"):
        config_from_dict({}, ["runtime.task_timeout_s=0"])


# -- SIGTERM is Ctrl-C; a failed start claims nothing ---------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "ray"])
def test_sigterm_stops_like_ctrl_c_and_ends_the_mlflow_run_killed(tmp_path, kind):
    import signal

    import mlflow

    config = small_config_file(tmp_path, rounds=50)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONUNBUFFERED": "1"}
    run = subprocess.Popen([sys.executable, "-m", "fedpgp_ray.run", "--config", str(config), "--no-progress",
                            "--set", f"runtime.kind={kind}", "--set", "runtime.num_actors=1"],
                           env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        for line in run.stdout:
            if " round 2/" in line:
                break
        run.send_signal(signal.SIGTERM)  # what `ray job stop`, docker, systemd and Kubernetes send
        rest = run.stdout.read()
        run.wait(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 143, rest
    assert (f"terminated (SIGTERM): the completed rounds are checkpointed; continue with `fedpgp-ray run "
            f"--resume {tmp_path / 'run'}`") in rest
    assert "Traceback" not in rest
    run_id = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"]
    assert mlflow.MlflowClient(store).get_run(run_id).info.status == "KILLED"


def test_a_failed_start_claims_nothing_so_the_corrected_retry_runs(tmp_path, capsys):
    empty_root = tmp_path / "caltech"
    empty_root.mkdir()  # a folder, but not a dataset: found only when the runtime builds the data
    config = write_config(tmp_path)
    assert main(["--config", str(config), "--set", "data.dataset=caltech101", "--set", f"data.root={empty_root}",
                 "--no-progress"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "caltech101: dataset folder not found" in errors[0], errors
    leftovers = {p.name for p in (tmp_path / "run").iterdir()} - {rundir.LOCK_FILE} \
        if (tmp_path / "run").exists() else set()
    assert leftovers == set()  # no run.json, no config.yaml: nothing claims the directory
    assert main(["--config", str(config), "--no-progress"]) == 0  # the corrected retry just works


def test_output_naming_a_directory_is_refused_before_the_run(tmp_path, capsys):
    config = write_config(tmp_path)
    (tmp_path / "out").mkdir()
    assert main(["--config", str(config), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert f"--output {tmp_path / 'out'} is a directory: name a file in it" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()
