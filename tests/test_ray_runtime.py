"""The Ray runtime: same metrics as in-process, failures survived, resume, GPU fallback, placement, jobs.

One local Ray instance (2 CPUs, 1 fake GPU) serves the module, with token authentication on
(the token comes from $RAY_AUTH_TOKEN, so no test writes ~/.ray/auth_token); the `ray job submit`
test below is the suite's one test of RAY_AUTH_MODE=disabled (token auth with jobs on a real
cluster: tests/test_cluster.py, tests/test_readme_cluster.py). The backbone is a seeded random tiny CLIP saved to a
file, so the driver and every actor process load identical weights.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

from conftest import RAY_SESSION_TOKEN
from processes import free_port

import pytest
import torch

import ray  # a required dependency: missing, the module fails (never a silent skip)

from fedpgp_ray.checkpoint import CheckpointStore  # noqa: E402
from fedpgp_ray.config import config_from_dict  # noqa: E402
from fedpgp_ray.federation import run_federation  # noqa: E402
from fedpgp_ray.run import feature_cache_dir, main as run_main, run_experiment  # noqa: E402
from fedpgp_ray.runtime.local import LocalRuntime  # noqa: E402
from fedpgp_ray.runtime.ray import FaultPlan, GpuFallbackWarning, PlacementError, RayRuntime  # noqa: E402
from fedpgp_ray.runtime.ray.placement import gpus_per_actor  # noqa: E402
from fedpgp_ray.strategy import RoundFailedError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("local", "base", "novel", "hm3", "hm2", "train_loss", "train_loss_ce", "train_loss_con")


@pytest.fixture(scope="module")
def ray_session():
    """A fresh local Ray instance: 2 CPUs and one fake GPU (CUDA itself is absent)."""
    patch = pytest.MonkeyPatch()
    # Token auth stays on: Ray's default for a new local instance (RAY_AUTH_MODE unset), which it turns
    # on in this process; the token comes from the environment, so Ray writes none to ~/.ray.
    patch.delenv("RAY_AUTH_MODE", raising=False)
    patch.setenv("RAY_AUTH_TOKEN", RAY_SESSION_TOKEN)
    patch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    patch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    patch.undo()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> str:
    """A seeded random fedpgp-tiny checkpoint: identical weights in every process."""
    import open_clip

    from fedpgp_ray.clip.backbone import register_project_models
    register_project_models()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = open_clip.create_model("fedpgp-tiny")
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def make_cfg(out: Path, weights: str, **runtime):
    data = {
        "seed": 0, "output_dir": str(out),
        "model": {"name": "fedpgp-tiny", "pretrained": weights},
        "data": {"dataset": "world", "shots": 4,
                 "world": {"num_classes": 40, "train_per_class": 8, "test_per_class": 6}},
        "train": {"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.002},
        "federation": {"num_clients": 5},
        "tracking": {"mlflow": False},
        "runtime": {"kind": "ray", "num_actors": 2, "num_cpus_per_actor": 1, "threads_per_worker": 1,
                    "placement_timeout_s": 20, **runtime},
    }
    return config_from_dict(data)


def run_ray(cfg, faults: FaultPlan | None = None) -> dict:
    store = CheckpointStore(Path(cfg.output_dir) / "checkpoints")
    with RayRuntime(cfg, store, feature_cache_dir(), faults=faults) as runtime:
        return run_federation(cfg, runtime, store)


def assert_same_metrics(a: dict, b: dict) -> None:
    assert [r["round"] for r in a["rounds"]] == [r["round"] for r in b["rounds"]]
    for ra, rb in zip(a["rounds"], b["rounds"]):
        for key in COMPARED:
            assert (key in ra["metrics"]) == (key in rb["metrics"]), key
            if key in ra["metrics"]:
                assert ra["metrics"][key] == pytest.approx(rb["metrics"][key], rel=1e-5, abs=1e-4), \
                    (ra["round"], key)
    assert a["final"] == pytest.approx(b["final"], rel=1e-5, abs=1e-4)


@pytest.fixture(scope="module")
def unfaulted(ray_session, tiny_weights, tmp_path_factory) -> dict:
    """The reference Ray run (2 actors, no faults)."""
    return run_ray(make_cfg(tmp_path_factory.mktemp("unfaulted"), tiny_weights))


def test_local_and_ray_runtimes_give_the_same_metrics(unfaulted, tiny_weights, tmp_path):
    cfg = make_cfg(tmp_path / "local", tiny_weights, kind="local")
    threads = torch.get_num_threads()
    try:
        with LocalRuntime(cfg, CheckpointStore(tmp_path / "local" / "checkpoints"), feature_cache_dir()) as rt:
            local = run_federation(cfg, rt, CheckpointStore(tmp_path / "local" / "checkpoints"))
    finally:
        torch.set_num_threads(threads)
    assert_same_metrics(local, unfaulted)
    trained = unfaulted["rounds"][1]["metrics"]
    assert trained["clients_reported"] == 5 and trained["clients_failed"] == 0
    assert trained["actor_restarts"] == 0 and trained["client_retries"] == 0


@pytest.mark.slow
def test_actor_killed_or_crashed_mid_round_is_replaced_and_metrics_match(unfaulted, tiny_weights, tmp_path):
    # round 1: the driver ray.kill()s the actor serving client 2 right after submitting it;
    # round 2: the actor process running client 1 exits (os._exit) mid-task.
    faults = FaultPlan(kill={(1, 2)}, exit={(2, 1)})
    doc = run_ray(make_cfg(tmp_path / "faulted", tiny_weights), faults)
    for rnd in (1, 2):
        m = doc["rounds"][rnd]["metrics"]
        assert m["actor_restarts"] == 1, rnd  # the failure is recorded as a metric
        assert m["client_retries"] >= 1
        assert m["clients_reported"] == 5 and m["clients_failed"] == 0  # re-queued, round completed
    assert_same_metrics(doc, unfaulted)  # replacement actors restored personal state from disk


@pytest.mark.slow
def test_hung_actor_is_timed_out_replaced_and_metrics_match(unfaulted, tiny_weights, tmp_path):
    # round 2: the actor running client 3 hangs (alive, never returns); after runtime.task_timeout_s
    # it is killed and replaced, client 3 re-queued; the round completes as if nothing happened.
    cfg = make_cfg(tmp_path / "hung", tiny_weights, task_timeout_s=60)
    doc = run_ray(cfg, FaultPlan(hang={(2, 3)}))
    m = doc["rounds"][2]["metrics"]
    assert m["tasks_timed_out"] == 1 and m["actor_restarts"] == 1 and m["client_retries"] == 1
    assert m["clients_reported"] == 5 and m["clients_failed"] == 0
    assert doc["rounds"][1]["metrics"]["tasks_timed_out"] == 0
    assert_same_metrics(doc, unfaulted)


@pytest.mark.slow
def test_client_that_keeps_failing_is_dropped_and_min_reporting_is_enforced(ray_session, tiny_weights, tmp_path):
    cfg = make_cfg(tmp_path / "dropped", tiny_weights, max_client_retries=2)
    store = CheckpointStore(tmp_path / "dropped" / "checkpoints")
    with RayRuntime(cfg, store, feature_cache_dir(), faults=FaultPlan(fail={3})) as runtime:
        doc = run_federation(cfg, runtime, store)
        for rnd in (1, 2):
            m = doc["rounds"][rnd]["metrics"]
            assert m["clients_sampled"] == 5 and m["clients_reported"] == 4 and m["clients_failed"] == 1
            assert m["client_retries"] == 2  # bounded: 1 attempt + max_client_retries retries
            assert "train_loss" in doc["rounds"][rnd]["clients"]["0"]
            assert "train_loss" not in doc["rounds"][rnd]["clients"].get("3", {})

        strict = make_cfg(tmp_path / "strict", tiny_weights, max_client_retries=0)
        strict.federation.min_reporting_clients = 5
        with pytest.raises(RoundFailedError, match="min_reporting_clients=5"):
            run_federation(strict, runtime, CheckpointStore(tmp_path / "strict" / "checkpoints"))


class DriverKilled(Exception):
    pass


class KillDriverAfter:
    def __init__(self, rnd: int) -> None:
        self.rnd = rnd

    def on_round(self, report, global_params) -> None:
        if report.round == self.rnd:
            raise DriverKilled(f"driver stopped after round {self.rnd}")


@pytest.mark.slow
def test_driver_killed_between_rounds_resumes_to_the_same_metrics(unfaulted, tiny_weights, tmp_path):
    # one actor here, two in the reference run: which actor serves a client never changes results
    cfg = make_cfg(tmp_path / "resumed", tiny_weights, num_actors=1)
    with pytest.raises(DriverKilled):
        run_experiment(cfg, progress=False, listeners=[KillDriverAfter(1)])
    assert not (tmp_path / "resumed" / "results.json").exists()
    assert (tmp_path / "resumed" / "checkpoints" / "server" / "round_1.pt").is_file()
    # a new driver: new actors with empty memory, personal state restored from the run directory
    assert run_main(["--resume", str(tmp_path / "resumed"), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert doc["runtime"] == "ray"
    assert_same_metrics(doc, unfaulted)


def test_actors_encode_each_image_once_and_a_second_run_encodes_none(ray_session, tiny_weights, tmp_path):
    """Each actor encodes only its own clients' shards; the test set's entry is encoded by one actor while
    the other waits and reads it; a second runtime on the same node cache encodes nothing."""
    cfg = make_cfg(tmp_path / "run", tiny_weights)
    cache = str(tmp_path / "cache")
    with RayRuntime(cfg, None, cache) as runtime:
        first = [info["encoded_images"] for info in runtime.actor_info]
        manifest = runtime.dataset_manifest()
    shards = {int(c): n["train"] for c, n in manifest["clients"].items()}
    own = [sum(n for c, n in shards.items() if c % 2 == slot) for slot in range(2)]  # clients 0,2,4 / 1,3
    test = manifest["images"]["test"]
    assert sum(first) == sum(own) + test  # every image once, on this node
    assert sorted(e - o for e, o in zip(first, own)) == [0, test]  # one actor took the test set
    assert len(manifest["feature_cache"]["entries"]) == 5 + 1  # 5 client shards + 1 test range
    with RayRuntime(cfg, None, cache) as runtime:
        assert [info["encoded_images"] for info in runtime.actor_info] == [0, 0]


def test_gpu_requested_but_cuda_absent_runs_on_cpu_with_one_warning(ray_session, tiny_weights, tmp_path):
    cfg = make_cfg(tmp_path / "gpu", tiny_weights, num_gpus_per_actor=0.5, placement_timeout_s=30)
    began = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime = RayRuntime(cfg, None, feature_cache_dir())
    try:
        fallbacks = [w for w in caught if issubclass(w.category, GpuFallbackWarning)]
        assert len(fallbacks) == 1, [str(w.message) for w in caught]
        # Ray scheduled each actor on the (fake) GPU, torch has no CUDA: the actors run on CPU
        assert [(i["device"], i["gpu_ids"]) for i in runtime.actor_info] == [("cpu", ["0"])] * 2
        results, failures = runtime.evaluate(0, [0, 1], runtime.initial_global_params())
        assert [r.client_id for r in results] == [0, 1] and not failures
    finally:
        runtime.close()
    assert time.monotonic() - began < 120


def test_cluster_without_gpu_requests_none_and_warns_once(monkeypatch, tiny_weights, tmp_path):
    """With no GPU in the cluster, GPU actors would stay pending forever: request none instead."""
    cfg = make_cfg(tmp_path, tiny_weights, num_gpus_per_actor=0.25)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.warns(GpuFallbackWarning, match="no GPU") as caught:
        assert gpus_per_actor(cfg) == 0.0
    assert len(caught) == 1
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    assert gpus_per_actor(cfg) == 0.25


@pytest.mark.parametrize("runtime", [{"num_cpus_per_actor": 2}, {"num_gpus_per_actor": 1}],
                         ids=["cpus", "gpus"])
def test_unplaceable_actors_fail_fast_with_a_clear_error(ray_session, tiny_weights, tmp_path, capsys, runtime):
    cfg = make_cfg(tmp_path / "big", tiny_weights, placement_timeout_s=2, **runtime)
    began = time.monotonic()
    with pytest.raises(PlacementError, match=r"cannot place 2 client actors .*runtime\.num_actors"):
        RayRuntime(cfg, None, feature_cache_dir())
    assert time.monotonic() - began < 30
    # through the entry point: a one-line error and exit code 2, not a hang or a traceback
    (tmp_path / "cfg.yaml").write_text(json.dumps({
        "output_dir": str(tmp_path / "cli"), "model": {"pretrained": tiny_weights},
        "tracking": {"mlflow": False},
        "runtime": {"kind": "ray", "num_actors": 2, "placement_timeout_s": 2, **runtime}}))
    assert run_main(["--config", str(tmp_path / "cfg.yaml"), "--no-progress"]) == 2
    assert "cannot place 2 client actors" in capsys.readouterr().err
    deadline = time.monotonic() + 10  # the placement group was removed: its CPUs are free again
    while ray.available_resources().get("CPU", 0) < 2:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)


def test_bad_input_in_a_client_actor_reaches_the_driver_as_itself(ray_session, tiny_weights, tmp_path, capsys):
    """A DataError or ConfigError raised while a client actor starts is not an ActorDiedError wrapped in a
    RuntimeError: it reaches the driver as its own type, and the CLI prints one `error:` line (exit 2)."""
    import dataclasses

    from fedpgp_ray.config import ConfigError
    from fedpgp_ray.data.base import DataError

    cfg = make_cfg(tmp_path / "root", tiny_weights)
    missing = tmp_path / "no-such-root"
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset="cifar10", root=str(missing)))
    with pytest.raises(DataError, match=r"data root not found: .*no-such-root"):
        RayRuntime(cfg, None, feature_cache_dir())
    cuda = make_cfg(tmp_path / "cuda", tiny_weights)
    cuda = dataclasses.replace(cuda, model=dataclasses.replace(cuda.model, device="cuda"))
    with pytest.raises(ConfigError, match=r"model.device is 'cuda' but this client actor has no GPU"):
        RayRuntime(cuda, None, feature_cache_dir())
    capsys.readouterr()
    (tmp_path / "cfg.yaml").write_text(json.dumps({
        "output_dir": str(tmp_path / "cli"), "model": {"pretrained": tiny_weights, "device": "cuda"},
        "tracking": {"mlflow": False},
        "runtime": {"kind": "ray", "num_actors": 2, "num_cpus_per_actor": 1, "placement_timeout_s": 20}}))
    assert run_main(["--config", str(tmp_path / "cfg.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        line for line in err.splitlines() if "no GPU" in line], err
    assert "no GPU" in err and "Traceback" not in err and "failed to start" not in err, err


def test_actors_without_a_given_cache_dir_use_their_own_nodes(ray_session, tiny_weights, tmp_path, monkeypatch):
    """cache_dir None (what a Ray run from the CLI passes): each actor resolves its node's cache, here the
    $FEDPGP_CACHE_DIR the node (this machine's Ray instance) was started with, not the driver's."""
    node_cache = os.environ["FEDPGP_CACHE_DIR"]  # what the Ray instance (and so its actors) inherited
    cfg = make_cfg(tmp_path / "run", tiny_weights)
    assert feature_cache_dir(cfg) is None
    local = dataclasses_replace_kind(cfg, "local")
    monkeypatch.setenv("FEDPGP_CACHE_DIR", str(tmp_path / "driver-only"))
    assert feature_cache_dir(local) == str(tmp_path / "driver-only")  # in-process: the driver's own
    with RayRuntime(cfg, None, feature_cache_dir(cfg)) as runtime:
        assert runtime.dataset_manifest()["feature_cache"]["directory"] == node_cache
    assert not (tmp_path / "driver-only").exists()


def dataclasses_replace_kind(cfg, kind: str):
    import dataclasses
    return dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, kind=kind))


# --------------------------------------------------------------------------------------------------
# `ray start` + `ray job submit` end to end
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_job_submit_runs_the_quickstart_on_a_started_cluster(tmp_path):
    bin_dir = Path(sys.executable).parent
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                             "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "runtime-env-agent-port", "metrics-export-port")}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # a private temp dir (short: it holds Unix sockets) keeps this cluster's address file away from
    # other Ray users of the machine, whose bare ray.init() would otherwise attach to it
    temp_dir = Path(f"/tmp/fpr-{os.getpid()}-{ports['port']}")
    head_log = tmp_path / "head.log"
    # --block: this process owns the head node; SIGTERM to it stops exactly this cluster
    # (`ray stop` would stop every Ray process of this user on the machine).
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}",
         *[f"--{name}={port}" for name, port in ports.items()]],
        env=env, cwd=tmp_path, start_new_session=True, stdout=head_log.open("w"), stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, head_log.read_text()[-3000:]
            try:
                client = JobSubmissionClient(address)
                client.list_jobs()
                break
            except Exception:
                assert time.monotonic() < deadline, head_log.read_text()[-3000:]
                time.sleep(1)
        out = tmp_path / "job-output"  # absolute: the job's working directory is a temporary copy
        runtime_env = {"env_vars": {"FEDPGP_CACHE_DIR": feature_cache_dir(), "RAY_AUTH_MODE": "disabled"}}
        job = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", address, "--submission-id", "fedpgp-quickstart",
             "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
             sys.executable, "-m", "fedpgp_ray.run", "--config", "configs/quickstart.yaml",
             "--set", f"output_dir={out}", "--set", "runtime.kind=ray", "--set", "train.rounds=1",
             "--set", "train.local_epochs=1", "--set", "tracking.mlflow=false",
             "--no-progress"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
        assert client.get_job_status("fedpgp-quickstart") == JobStatus.SUCCEEDED
        doc = json.loads((out / "results.json").read_text())
        assert doc["runtime"] == "ray"
        assert [r["round"] for r in doc["rounds"]] == [0, 1]
        assert doc["rounds"][1]["metrics"]["clients_reported"] == doc["config"]["federation"]["num_clients"]
        assert set(doc["final"]) == {"local", "base", "novel", "hm3", "hm2"}
        assert (out / "checkpoints" / "server" / "round_1.pt").is_file()
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        leftovers = _processes_using(temp_dir, wait_s=20)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not leftovers, f"processes of the test cluster still running: {leftovers}"


def _processes_using(temp_dir: Path, wait_s: float) -> list[str]:
    """Command lines of live processes that mention the cluster's temp dir (its raylet, GCS, workers)."""
    import psutil
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                cmd = " ".join(proc.info["cmdline"] or [])
            except psutil.Error:
                continue
            if str(temp_dir) in cmd and proc.pid != os.getpid():
                found.append(f"{proc.pid}: {cmd[:120]}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(1)


@pytest.mark.slow
def test_dp_on_ray_clips_on_the_client_actor_and_matches_in_process(ray_session, tiny_weights, tmp_path):
    """DP-FedAvg on Ray: the client actors clip, the server actor adds the (seeded) noise; the run equals
    the in-process DP run, epsilon included, and an actor's upload is already clipped when it leaves."""
    from fedpgp_ray import privacy
    from fedpgp_ray.config import config_to_dict

    def private(out: Path, kind: str):
        data = config_to_dict(make_cfg(out, tiny_weights, kind=kind))
        data["federation"]["client_fraction"] = 0.6
        data["privacy"] = {"enabled": True, "seeded": True, "noise_multiplier": 1.0, "clip_norm": 0.005}
        return config_from_dict(data)

    cfg = private(tmp_path / "ray", "ray")
    store = CheckpointStore(Path(cfg.output_dir) / "checkpoints")
    with RayRuntime(cfg, store, feature_cache_dir()) as runtime:
        on_ray = run_federation(cfg, runtime, store)
        glob = ray.get(runtime.server_actor.call.remote("global_params"))
        upload = ray.get(runtime.actors[runtime.slot_of(3)].fit.remote(3, 99, glob))
    assert set(upload.params) == {"sigma"}
    assert privacy.update_norm({"sigma": upload.params["sigma"].double() - glob["sigma"].double()}) <= 0.005 * (1 + 1e-5)
    local_cfg = private(tmp_path / "local", "local")
    threads = torch.get_num_threads()
    try:
        with LocalRuntime(local_cfg, None, feature_cache_dir()) as rt:
            in_process = run_federation(local_cfg, rt, None)
    finally:
        torch.set_num_threads(threads)
    assert_same_metrics(on_ray, in_process)
    for a, b in zip(on_ray["rounds"][1:], in_process["rounds"][1:]):
        assert a["metrics"]["clients_sampled"] == b["metrics"]["clients_sampled"]
        assert a["metrics"]["privacy/epsilon"] == b["metrics"]["privacy/epsilon"] == privacy.epsilon(0.6, 1.0, a["round"], 1e-5)
    assert on_ray["privacy"]["epsilon"] == in_process["privacy"]["epsilon"] > 0


def test_a_dead_server_actor_is_one_line_with_the_resume_hint(ray_session):
    """A killed server actor (or its node lost) ends the run in one line naming --resume, no traceback."""
    from fedpgp_ray.runtime.ray.server_proxy import ServerProxy
    from fedpgp_ray.strategy import RoundFailedError

    @ray.remote(num_cpus=0)
    class Server:
        def call(self, method: str, *args):
            return 7

    actor = Server.remote()
    proxy = ServerProxy(actor, lambda phase: {}, "/runs/x")
    assert proxy.start_round() == 7
    ray.kill(actor, no_restart=True)
    with pytest.raises(RoundFailedError) as err:
        proxy.start_round()
    line = str(err.value)
    assert "\n" not in line and line.startswith("the server actor died during start_round (")
    assert line.endswith("continue with `fedpgp-ray run --resume /runs/x`")
