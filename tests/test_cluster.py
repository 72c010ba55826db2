"""The quickstart on a real two-node Ray cluster (this machine; see tests/two_node_cluster.py), token auth on.

(a) run directory on a path the worker node does not share -> the job FAILS before training with one
    clear line (node, path, fix);
(b) run directory on a path both nodes see -> SUCCEEDS with all 10 clients' states and the MLflow artifacts;
(c) s3:// run directory (moto on 127.0.0.1) -> SUCCEEDS with the same final metrics as (b);
(d) a client actor on the worker node killed mid-round -> replaced, final metrics equal (b)'s.

One cluster serves the module. Jobs run the quickstart (10 clients) shortened to 2 rounds of 1 epoch.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest

from s3_server import S3_ENV, make_bucket, moto_server, s3_uri
from two_node_cluster import TwoNodeCluster

pytestmark = pytest.mark.slow

QUICK = ["--set", "runtime.kind=ray", "--set", "train.rounds=2", "--set", "train.local_epochs=1"]
FINAL = ("local", "base", "novel", "hm3", "hm2")


def entrypoint(output_dir: str, *extra: str) -> list[str]:
    return ["python", "-m", "fedpgp_ray.run", "--config", "configs/quickstart.yaml", "--set",
            f"output_dir={output_dir}", *QUICK, *extra, "--no-progress"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the two-node cluster test needs root (unshare -m / -n), as on the CI machines")
    base = Path(tempfile.mkdtemp(prefix="fpc-", dir="/tmp"))  # short: Ray's Unix sockets live under it
    cl = TwoNodeCluster(base)
    try:
        yield cl.start()
    finally:
        cl.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def env_vars() -> dict[str, str]:
    return {"FEDPGP_CACHE_DIR": os.environ["FEDPGP_CACHE_DIR"]}


@pytest.fixture(scope="module")
def shared_run(cluster, env_vars) -> dict:
    """(b): the quickstart into a directory both nodes see, MLflow on (SQLite beside the run)."""
    out = cluster.shared / "b"
    db = cluster.shared / "mlflow.db"
    job = cluster.submit("b-shared", entrypoint(str(out)),
                         {**env_vars, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    assert cluster.job_status("b-shared") == "SUCCEEDED"
    return {"out": out, "db": db, "log": job.stdout, "doc": json.loads((out / "results.json").read_text())}


def test_a_unshared_run_directory_fails_before_training_with_one_clear_line(cluster, env_vars):
    out = cluster.private / "a"  # the head (driver) writes here; the worker node sees its own empty tmpfs
    job = cluster.submit("a-unshared", entrypoint(str(out), "--set", "tracking.mlflow=false"), env_vars)
    assert job.returncode != 0
    assert cluster.job_status("a-unshared") == "FAILED"
    errors = {line for line in job.stdout.splitlines() if line.startswith("error:")}  # Ray repeats the log tail
    assert len(errors) == 1, job.stdout[-4000:]
    (line,) = errors
    assert line.startswith("error: client actor on node 127.0.0.1 (node id ")
    assert f"the run storage marker {out}/checkpoints/storage_marker.json that the driver wrote does not exist there" \
        in line
    assert "filesystem every node mounts" in line and "s3://" in line
    assert " round 1/" not in job.stdout and not (out / "checkpoints" / "clients").exists()  # no training


def test_b_shared_path_keeps_every_client_state_and_the_mlflow_artifacts(shared_run):
    doc, out = shared_run["doc"], shared_run["out"]
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2]
    assert doc["rounds"][2]["metrics"]["clients_reported"] == 10
    assert sorted(os.listdir(out / "checkpoints" / "clients"), key=int) == [str(c) for c in range(10)]
    for cid in range(10):
        assert (out / "checkpoints" / "clients" / str(cid) / "round_2.pt").is_file()
    # --no-progress: one plain line per round in the job's log
    assert [line.split(":")[0] for line in shared_run["log"].splitlines() if line.startswith("fedpgp round ")] \
        == ["fedpgp round 0/2", "fedpgp round 1/2", "fedpgp round 2/2"]
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{shared_run['db']}")
    assert client.get_run(run_id).info.status == "FINISHED"
    listed = {a.path for a in client.list_artifacts(run_id, "checkpoints/clients")}
    assert listed == {f"checkpoints/clients/{c}" for c in range(10)}
    with sqlite3.connect(shared_run["db"]) as db:  # metrics reached the store the driver logged to
        steps = {s for (s,) in db.execute("select step from metrics where key='round_seconds'")}
    assert steps == {0, 1, 2}


def test_c_s3_run_directory_gives_the_same_final_metrics(cluster, env_vars, shared_run):
    with moto_server(cluster.logs, prefix=cluster.in_netns([])) as endpoint:
        make_bucket(endpoint, "runs", prefix=cluster.in_netns([]))
        uri = s3_uri(endpoint, "runs", "quickstart/c")
        job = cluster.submit("c-s3", entrypoint(uri), {**env_vars, **S3_ENV,
                                                      "MLFLOW_TRACKING_URI": f"sqlite:///{cluster.shared}/mlflow-c.db"})
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
        assert cluster.job_status("c-s3") == "SUCCEEDED"
        listing = cluster.python(  # read the bucket from inside the cluster's network namespace
            "import json, sys; from fedpgp_ray.storage import RunStorage; s = RunStorage(sys.argv[1]); "
            "print(json.dumps({'results': json.loads(s.read_text('results.json')), "
            "'clients': s.list('checkpoints/clients')}))", uri, env={**cluster.env, **S3_ENV})
    found = json.loads(listing)
    assert sorted(found["clients"], key=int) == [str(c) for c in range(10)]
    assert found["results"]["final"] == pytest.approx(shared_run["doc"]["final"], rel=1e-5, abs=1e-4)
    assert set(found["results"]["final"]) == set(FINAL)
    assert not (cluster.shared / "c").exists()  # nothing went to a local folder


def test_d_actor_killed_on_the_worker_mid_round_is_replaced_and_metrics_match(cluster, env_vars, shared_run):
    out = cluster.shared / "d"
    faults = json.dumps({"kill": [[1, 3]]})  # round 1: the driver kills the actor serving client 3, mid-fit
    job = cluster.submit("d-fault", entrypoint(str(out), "--set", "tracking.mlflow=false"),
                         {**env_vars, "FEDPGP_RAY_FAULTS": faults})
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    doc = json.loads((out / "results.json").read_text())
    m = doc["rounds"][1]["metrics"]
    assert m["actor_restarts"] == 1 and m["clients_reported"] == 10 and m["clients_failed"] == 0
    assert m["state_reinits"] == 0
    assert doc["final"] == pytest.approx(shared_run["doc"]["final"], rel=1e-5, abs=1e-4)
    for a, b in zip(doc["rounds"], shared_run["doc"]["rounds"]):
        for key in ("local", "base", "novel", "train_loss"):
            assert (key in a["metrics"]) == (key in b["metrics"])
            if key in a["metrics"]:
                assert a["metrics"][key] == pytest.approx(b["metrics"][key], rel=1e-5, abs=1e-4)
