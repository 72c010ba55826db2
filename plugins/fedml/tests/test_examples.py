"""The two FedML examples, run as a user runs them: a copy of examples/, its own command, its printed table.

`python run_fedpgp.py` (simulation, sp) and `bash run_cross_silo.sh` (1 server + 2 silos, GRPC on
127.0.0.1) must print a table per round starting at round 0 (before training) and the final
Local / Base / Novel / HM3 / HM2, with the shipped tiny CLIP well above chance; write
results.json, tables and figures into separate folders; and log one MLflow run each, from the
server only, into one store beside them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FINAL_ROW = re.compile(r"^fedpgp\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", re.M)


@pytest.fixture(scope="module")
def examples(tmp_path_factory, root) -> Path:
    """A copy of plugins/fedml/examples (the outputs land in the copy, not in the source tree)."""
    target = tmp_path_factory.mktemp("examples") / "examples"
    shutil.copytree(EXAMPLES, target, ignore=shutil.ignore_patterns("outputs"))
    return target


def run_example(examples: Path, command: list[str]) -> str:
    env = {**os.environ, "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(command, cwd=examples, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def round_rows(stdout: str) -> dict[int, list[str]]:
    """The per-round table: {round: cells} from the lines after the header `round loss Local ...`."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["round", "loss", "Local"])
    rows = {}
    for line in lines[start + 1:]:
        cells = line.split()
        if not cells or not cells[0].isdigit():
            break
        rows[int(cells[0])] = cells[1:]
    return rows


def check_example(stdout: str, out: Path, clients: int, config: dict) -> list[float]:
    rounds = config["train_args"]["comm_round"]
    data = config["fedpgp_args"]["fedpgp_config"]["data"]["world"]
    assert "round 0 = before training" in stdout
    rows = round_rows(stdout)
    assert sorted(rows) == list(range(rounds + 1)), stdout
    assert rows[0][0] == "-" and all(rows[r][0] != "-" for r in range(1, rounds + 1))  # no loss before training
    (final,) = FINAL_ROW.findall(stdout)
    local, base, novel, hm3, hm2 = map(float, final)
    # chance: a client's own classes (Local), all base classes, all novel classes
    n_base = (data["num_classes"] + 1) // 2
    chance_local, chance_base, chance_novel = 100 / (n_base / clients), 100 / n_base, 100 / (data["num_classes"] - n_base)
    print(f"\n{out.name}: final Local/Base/Novel/HM3/HM2 = {local}/{base}/{novel}/{hm3}/{hm2} "
          f"(chance {chance_local:.1f}/{chance_base:.1f}/{chance_novel:.1f})")
    assert local > 2 * chance_local and base > 4 * chance_base and novel > 4 * chance_novel
    doc = json.loads((out / "results.json").read_text())
    assert [round(doc["final"][k], 2) for k in ("local", "base", "novel", "hm3", "hm2")] == [local, base, novel, hm3, hm2]
    assert [r["round"] for r in doc["rounds"]] == list(range(rounds + 1))
    assert {"results.csv", "results.md", "rounds.csv", "accuracy.png", "clients.png"} <= {p.name for p in out.iterdir()}
    assert f"results: {out / 'results.json'}" in stdout and "MLflow: run" in stdout
    # the run layout of `fedpgp-ray run`: config, server checkpoints, the clients' personal states
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "server" / f"round_{rounds}.pt").is_file()
    assert len(list((out / "checkpoints" / "clients").iterdir())) == clients
    assert "MLflow models:" in stdout  # the classifiers were logged and registered, as on the Ray path
    from PIL import Image

    probe = out.parent / f"probe-{out.name}.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(probe)
    for client in ("0", str(clients - 1)):  # predict --run works on the FedML run directory
        proc = subprocess.run([sys.executable, "-m", "fedpgp_ray.cli", "predict", "--run", str(out), "--client",
                               client, str(probe)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and proc.stdout.strip(), proc.stdout + proc.stderr
    return [local, base, novel]


def test_sp_example_prints_results_and_logs_one_run(examples):
    stdout = run_example(examples, [sys.executable, "run_fedpgp.py"])
    config = yaml.safe_load((examples / "fedml_config.yaml").read_text())
    check_example(stdout, examples / "outputs" / "sp", config["train_args"]["client_num_in_total"], config)


def test_cross_silo_example_prints_results_on_the_server_and_logs_one_run(examples):
    stdout = run_example(examples, ["bash", "run_cross_silo.sh"])
    config = yaml.safe_load((examples / "cross_silo_config.yaml").read_text())
    assert "exit codes [0, 0, 0]" in stdout
    rounds = config["train_args"]["comm_round"]
    for rank in (1, 2):  # each silo's log has a line per round
        silo_log = (examples / "outputs" / "cross_silo" / "logs" / f"rank{rank}.log").read_text()
        assert all(f"round {r}/{rounds}" in silo_log for r in range(1, rounds + 1)), silo_log[-2000:]
    check_example(stdout, examples / "outputs" / "cross_silo", config["train_args"]["client_num_in_total"], config)

    # one store for the workspace (the examples folder) ; each example is one run there (the silos log nothing)
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{examples / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted(n for n in ("fedpgp-sp", "fedpgp-cross_silo")
                           if (examples / "outputs" / n.split("-", 1)[1]).exists()), names
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {"fedpgp_ray_version", "hostname"} <= set(run.data.tags)


def test_sigterm_stops_the_sp_example_like_ctrl_c_and_ends_its_mlflow_run_killed(tmp_path):
    """SIGTERM (docker, systemd, Kubernetes) mid-run: exit 143, one line saying a FedML run starts over,
    the MLflow run KILLED (before: killed by the signal, nothing said, the run left RUNNING)."""
    import signal
    import time

    examples = tmp_path / "examples"
    shutil.copytree(EXAMPLES, examples, ignore=shutil.ignore_patterns("outputs"))
    config = yaml.safe_load((examples / "fedml_config.yaml").read_text())
    config["train_args"]["comm_round"] = 200  # long enough to be stopped mid-run
    (examples / "fedml_config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "run_fedpgp.py"], cwd=examples, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        for line in proc.stdout:  # the row of round 2: training is under way
            if line.split()[:1] == ["2"]:
                break
            assert time.monotonic() < deadline, "no round 2 row"
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("terminated (SIGTERM)")]
    assert len(lines) == 1 and "a FedML run does not resume" in lines[0], err[-3000:]
    assert "Traceback" not in err
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{examples / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["KILLED"]


def test_sigterm_to_the_cross_silo_server_ends_its_mlflow_run_killed(tmp_path):
    """The server process (rank 0) holds the MLflow run; FedML's cross-silo server trains while its runner is
    being built, and SIGTERM there must still end the run KILLED with one line."""
    import signal
    import time

    import psutil

    examples = tmp_path / "examples"
    shutil.copytree(EXAMPLES, examples, ignore=shutil.ignore_patterns("outputs"))
    config = yaml.safe_load((examples / "cross_silo_config.yaml").read_text())
    config["train_args"]["comm_round"] = 200
    (examples / "cross_silo_config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    launcher = subprocess.Popen(["bash", "run_cross_silo.sh"], cwd=examples, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in launcher.stdout:  # the server's round-2 row: training is under way
            if line.split()[:1] == ["2"]:
                break
        server = next(p for p in psutil.Process(launcher.pid).children(recursive=True)
                      if p.cmdline()[-2:] == ["--rank", "0"])
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)  # not our child: psutil gives no exit status (the sp test checks 143)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)  # the silos (they wait for a server that is gone)
        launcher.wait()
    log = (examples / "outputs" / "cross_silo" / "logs" / "rank0.log").read_text()
    lines = [line for line in log.splitlines() if line.startswith("terminated (SIGTERM)")]
    assert len(lines) == 1 and "a FedML run does not resume" in lines[0], log[-3000:]
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{examples / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("fedpgp-cross_silo", "KILLED")]
