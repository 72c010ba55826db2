"""The quickstart on a real Ray cluster on this machine (see tests/two_node_cluster.py): a 0-CPU head and two
worker nodes, each with its own address (10.77.0.x) in a network namespace the test made and its own mount
namespace, token auth on.

(a) run directory on a path the worker node does not share -> the job FAILS before training with one
    clear line (node, path, fix);
(b) run directory on a path both nodes see -> SUCCEEDS with all 10 clients' states and the MLflow artifacts;
(c) s3:// run directory (moto on 127.0.0.1) -> SUCCEEDS with the same final metrics as (b);
(d) a client actor on the worker node killed mid-round -> replaced, final metrics equal (b)'s;
(e) each worker NODE killed in turn mid-round (its raylet's process group) -> the same job finishes with (b)'s
    final metrics; one node loss = one restart per lost actor, one attempt per client it was running; the
    server actor stays on the head;
(f) a worker node killed with no spare node -> the round fails in one line naming the missing resources and the
    fix after runtime.placement_timeout_s, the job and its MLflow run end FAILED; `--resume` once nodes are back
    finishes with (b)'s final metrics.

One cluster serves the module. Jobs run the quickstart (10 clients) shortened to 2 rounds of 1 epoch.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import pytest

from processes import stop_group
from s3_server import S3_ENV, make_bucket, moto_server, s3_uri
from two_node_cluster import HEAD_IP, TwoNodeCluster

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
    assert re.match(r"error: client actor on node 10\.77\.0\.[23] \(node id ", line), line
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


def wait_until(check, what: str, job, log: Path, timeout: float = 600, every: float = 0.1):
    """check()'s first truthy value, polled while the job runs."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert job.poll() is None, f"the job ended before {what}: {log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s: {log.read_text()[-4000:]}"
        time.sleep(every)
    return value


def client_states(out: Path, rnd: int) -> list[Path]:
    """The client states written in round `rnd` so far: one appears as each client's fit ends (mid-round)."""
    return list(out.glob(f"checkpoints/clients/*/round_{rnd}.pt"))


def restore_workers(cluster) -> None:
    """Bring every worker node back for the next test."""
    for index in range(cluster.num_workers):
        if index not in cluster.workers:
            cluster.start_worker(index)


def test_e_each_worker_node_lost_mid_round_in_turn_same_job_equal_metrics(cluster, env_vars, shared_run):
    out = cluster.shared / "e"
    # Fits of rounds 1 and 2 first sleep 1 s (training unchanged): each round lasts long enough that the
    # kill lands mid-fit. placement_timeout_s: the second loss leaves no spare node until the first is back.
    job, log = cluster.submit_background(
        "e-node-loss", entrypoint(str(out), "--set", "tracking.mlflow=false",
                                  "--set", "runtime.placement_timeout_s=300"),
        {**env_vars, "FEDPGP_RAY_FAULTS": json.dumps({"slow": [[1, 1.0], [2, 1.0]]})})
    try:
        placed = wait_until(lambda: (ips := cluster.actor_ips("ClientActor")) and len(ips) == 2 and ips,
                            "2 client actors", job, log, every=1)
        assert cluster.actor_ips("ServerActor") == [HEAD_IP]  # hard affinity: the driver's node
        first = max(range(2), key=lambda i: placed.count(cluster.worker_ip(i)))
        lost_first = placed.count(cluster.worker_ip(first))
        wait_until(lambda: client_states(out, 1), "round 1 mid-fit", job, log)
        killed = {1: cluster.kill_worker(first)}   # round 1: every actor of that node is lost
        wait_until(lambda: client_states(out, 2), "round 2 mid-fit", job, log)
        killed[2] = cluster.kill_worker(1 - first)  # round 2: the other node, which now holds both actors
        cluster.start_worker(first, wait=False)     # capacity comes back while the replacements wait for it
        assert job.wait(timeout=900) == 0, log.read_text()[-4000:]
        ended = time.monotonic()
    finally:
        if job.poll() is None:
            stop_group(job, 30)
        restore_workers(cluster)
    text = log.read_text()
    assert cluster.job_status("e-node-loss") == "SUCCEEDED"
    doc = json.loads((out / "results.json").read_text())
    one, two = doc["rounds"][1]["metrics"], doc["rounds"][2]["metrics"]
    # one node loss = one restart per actor on it, one attempt for the client each was running
    assert (one["actor_restarts"], one["client_retries"]) == (lost_first, lost_first), one
    assert (two["actor_restarts"], two["client_retries"]) == (2, 2), two
    for m in (one, two):
        assert m["clients_reported"] == 10 and m["clients_failed"] == 0 and m["state_reinits"] == 0
        assert m.get("eval_actor_restarts", 0) == 0
    assert doc["final"] == pytest.approx(shared_run["doc"]["final"], rel=1e-5, abs=1e-4)
    # warm replacements: features read from the shared cache, never encoded again
    ready = [line for line in text.splitlines() if "replacement client actor" in line]
    assert len(ready) == lost_first + 2 and all("read from the cache" in line for line in ready), ready
    assert "Traceback" not in text
    print(f"\n[e] round seconds {[r['metrics'].get('round_seconds') for r in doc['rounds']]} vs unfaulted "
          f"{[r['metrics'].get('round_seconds') for r in shared_run['doc']['rounds']]}; lost {lost_first} then 2 "
          f"actors; job ended {ended - killed[2]:.0f} s after the second kill", *ready, sep="\n")


def test_f_node_lost_without_spare_capacity_fails_in_one_line_then_resume(cluster, env_vars, shared_run):
    out = cluster.shared / "f"
    db = cluster.shared / "mlflow-f.db"
    cluster.stop_worker(1)  # one worker left: losing it leaves no node for the replacements
    env = {**env_vars, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    try:
        job, log = cluster.submit_background(
            "f-no-capacity", entrypoint(str(out), "--set", "runtime.placement_timeout_s=20"),
            {**env, "FEDPGP_RAY_FAULTS": json.dumps({"slow": [[1, 1.0]]})})
        wait_until(lambda: client_states(out, 1), "round 1 mid-fit", job, log)
        killed = cluster.kill_worker(0)
        code = job.wait(timeout=900)
        failed_after = time.monotonic() - killed
        text = log.read_text()
        assert code != 0 and cluster.job_status("f-no-capacity") == "FAILED", text[-4000:]
        errors = {line for line in text.splitlines() if line.startswith("error:")}
        assert len(errors) == 1, text[-4000:]
        (line,) = errors
        assert line.startswith("error: round 1: cannot place a replacement for client actor "), line
        assert "{'CPU': 1.0}" in line and "runtime.placement_timeout_s=20s" in line, line
        assert f"fedpgp-ray run --resume {out}" in line and "Add a node" in line, line
        assert "Traceback" not in text
        from mlflow import MlflowClient
        run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
        assert MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(run_id).info.status == "FAILED"
        print(f"\n[f] failed {failed_after:.0f} s after the node was killed:\n{line}")
    finally:
        restore_workers(cluster)
    resumed = cluster.submit("f-resume", ["python", "-m", "fedpgp_ray.run", "--resume", str(out), "--no-progress"],
                             env)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    doc = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2]
    assert doc["final"] == pytest.approx(shared_run["doc"]["final"], rel=1e-5, abs=1e-4)
