"""Run storage (fedpgp_ray.storage) on a local path and on s3:// (a moto server on 127.0.0.1):
atomic writes, listing, checkpoints, the start-up marker, lost client states, `--no-progress` lines."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from conftest import TINY
from s3_server import S3_ENV, OutageProxy, make_bucket, moto_server, s3_uri
from fedpgp_ray.checkpoint import CheckpointStore, UnreadableCheckpoint
from fedpgp_ray.config import config_from_dict
from fedpgp_ray.run import main as run_main, run_experiment
from fedpgp_ray.storage import RunStorage, StorageError, is_uri, join_location


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        make_bucket(endpoint, "runs")
        yield endpoint


@pytest.fixture
def s3_env(monkeypatch):
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> RunStorage:
    if request.param == "local":
        return RunStorage(tmp_path / "run")
    endpoint = request.getfixturevalue("s3_endpoint")
    request.getfixturevalue("s3_env")
    return RunStorage(s3_uri(endpoint, "runs", f"t/{request.node.originalname}"))


def test_locations_and_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert RunStorage("runs/x").uri == str(tmp_path / "runs" / "x")  # a path is made absolute
    assert is_uri("s3://b/p") and is_uri("file:///tmp/x") and not is_uri("/tmp/x") and not is_uri("runs/x")
    uri = "s3://b/run?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_location(uri, "fedpgp") == "s3://b/run/fedpgp?endpoint_override=127.0.0.1:9000&scheme=http"
    assert RunStorage(uri).display("a.pt") == "s3://b/run/a.pt"  # messages leave the options out
    assert RunStorage(uri).local_path() is None and RunStorage(f"file://{tmp_path}/x").local_path() == tmp_path / "x"
    clone = pickle.loads(pickle.dumps(RunStorage(uri)))  # actors get the location, not a client
    assert clone.uri == uri and clone._fs is None
    cfg = config_from_dict({**TINY, "output_dir": uri})
    assert cfg.output_dir == uri  # URIs are not turned into paths


def test_files_round_trip(storage):
    assert not storage.exists("a/b.bin") and storage.list("a") == []
    storage.write_bytes("a/b.bin", b"one")
    storage.write_bytes("a/b.bin", b"two")  # replaced whole
    storage.write_text("a/c.txt", "text")
    assert storage.read_bytes("a/b.bin") == b"two" and storage.read_text("a/c.txt") == "text"
    assert storage.list("a") == ["b.bin", "c.txt"]  # no temporary files left behind
    assert storage.child("a").list() == ["b.bin", "c.txt"]
    storage.delete("a/b.bin")
    storage.delete("a/b.bin")  # already gone: fine
    assert storage.list("a") == ["c.txt"]
    with pytest.raises(FileNotFoundError, match="b.bin does not exist"):
        storage.read_bytes("a/b.bin")
    storage.save_torch("t.pt", {"x": torch.arange(3)})
    assert torch.equal(storage.load_torch("t.pt")["x"], torch.arange(3))


def test_checkpoint_store_prunes_and_falls_back(storage):
    store = CheckpointStore(storage.child("checkpoints"))
    for rnd in range(1, 5):
        store.save_client(7, rnd, {"personal": {"u": torch.full((2,), float(rnd))}})
        store.save_server(rnd, {"global_params": {}, "history": [
            {"round": r, "clients": {"7": {"train_loss": 1.0}}} for r in range(1, rnd + 1)]})
    assert store.storage.list("clients/7") == ["round_3.pt", "round_4.pt"]  # keep=2
    assert store.load_client(7, 3)["round"] == 3 and store.load_client(7, 2) is None
    assert store.client_ids() == [7] and store.newest_client_file(7)[0] == "round_4.pt"
    assert store.trained_before(7, 2) and not store.trained_before(8, 5) and not store.trained_before(7, 1)
    storage.write_bytes("checkpoints/server/round_4.pt", b"truncated")  # the newest is unreadable
    assert store.latest_server()["round"] == 3
    storage.write_bytes("checkpoints/server/round_3.pt", b"truncated")
    with pytest.raises(UnreadableCheckpoint, match="no earlier round"):
        store.latest_server()


def test_marker_proves_a_process_reads_the_drivers_storage(storage, tmp_path):
    store = CheckpointStore(storage.child("checkpoints"))
    token = store.write_marker()
    store.check_marker(token, "client actor on node X")  # same storage: fine
    elsewhere = CheckpointStore(tmp_path / "other-node" / "checkpoints")  # what an unshared node sees
    with pytest.raises(StorageError, match=r"client actor on node X: the run storage marker .* does not exist "
                                           r"there: the nodes do not share the run directory: .*s3://"):
        elsewhere.check_marker(token, "client actor on node X")
    elsewhere.write_marker()  # an older run's marker is not this run's
    with pytest.raises(StorageError, match="holds another run's token"):
        elsewhere.check_marker(token, "client actor on node X")


def test_unusable_storage_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match=r"cannot write .*file/sub/a.bin .*writable") as err:
        RunStorage(blocker / "sub").write_bytes("a.bin", b"x")
    assert "\n" not in str(err.value)


def _cfg(out: str, **runtime) -> object:
    return config_from_dict({**TINY, "output_dir": out, "runtime": {"kind": "local", **runtime}})


class StopAfter:
    def __init__(self, rnd: int) -> None:
        self.rnd = rnd

    def on_round(self, report, global_params) -> None:
        if report.round == self.rnd:
            raise KeyboardInterrupt  # the driver dies after this round


def test_lost_client_state_is_an_error_unless_reinit_is_allowed(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_cfg(str(out)), progress=False, listeners=[StopAfter(1)])
    shutil.rmtree(out / "checkpoints" / "clients" / "3")  # e.g. written on another node's disk
    assert run_main(["--resume", str(out), "--no-progress"]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err.startswith("error: client 3 trained before round 2 but its personal state is not in ")
    assert "runtime.allow_state_reinit=true" in err
    assert not (out / "results.json").exists()
    assert run_main(["--resume", str(out), "--no-progress", "--set", "runtime.allow_state_reinit=true"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["rounds"][2]["metrics"]["state_reinits"] == 1.0  # counted, not silent
    assert doc["rounds"][1]["metrics"]["state_reinits"] == 0.0


def test_run_into_s3_uri_and_plain_progress_lines(s3_endpoint, s3_env, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = s3_uri(s3_endpoint, "runs", "quick/fedpgp")
    assert run_main(["--set", f"output_dir={uri}", "--set", "runtime.kind=local", "--no-progress",
                     *[item for kv in _tiny_sets() for item in ("--set", kv)]]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if " round " in line]
    assert [line.split(":")[0] for line in lines] == ["fedpgp round 0/2", "fedpgp round 1/2", "fedpgp round 2/2"]
    assert "loss" in lines[1] and "local" in lines[2] and lines[2].endswith(" s")
    storage = RunStorage(uri)
    doc = json.loads(storage.read_text("results.json"))
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2]
    assert storage.list("checkpoints/clients") == [str(c) for c in range(5)]
    assert storage.exists("config.yaml") and storage.exists("checkpoints/server/round_2.pt")
    assert not any(p.name.startswith("s3:") for p in tmp_path.iterdir())  # nothing landed in a local "s3:" folder
    assert f"results: s3://runs/quick/fedpgp/results.json" in out


def _tiny_sets() -> list[str]:
    return ["model.pretrained=null", "data.shots=4", "data.world.num_classes=40", "data.world.train_per_class=8",
            "data.world.test_per_class=6", "train.rounds=2", "train.local_epochs=1", "federation.num_clients=5",
            "tracking.mlflow=false", "evaluation.every=2"]


def test_missing_bucket_is_one_line(s3_endpoint, s3_env):
    missing = RunStorage(s3_uri(s3_endpoint, "no-such-bucket", "x"))
    with pytest.raises(StorageError, match=r"cannot write s3://no-such-bucket/x/a.bin \(.*bucket and credentials") as err:
        missing.write_bytes("a.bin", b"x")
    assert "\n" not in str(err.value)


def test_an_object_store_outage_is_retried_within_the_bound_then_one_line(s3_endpoint, s3_env, monkeypatch,
                                                                         caplog):
    """The endpoint refuses connections for a while (a TCP forwarder taken down: moto keeps its buckets)."""
    import threading

    proxy = OutageProxy(s3_endpoint)
    proxy.up()
    storage = RunStorage(s3_uri(proxy.endpoint, "runs", "outage"))
    storage.write_text("a.txt", "1")
    monkeypatch.setenv("FEDPGP_STORAGE_RETRY_S", "60")
    proxy.down()
    back = threading.Timer(4, proxy.up)
    back.start()
    storage.write_text("b.txt", "2")  # retried until the endpoint is back
    back.join()
    assert storage.list() == ["a.txt", "b.txt"]
    monkeypatch.setenv("FEDPGP_STORAGE_RETRY_S", "2")
    proxy.down()
    with pytest.raises(StorageError) as caught:
        storage.write_text("c.txt", "3")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("cannot write s3://runs/outage/c.txt")
    assert "FEDPGP_STORAGE_RETRY_S=2" in message and "--resume <output_dir>" in message
    # the bound is per outage of the store: the failure path's next call (another RunStorage on the same
    # store, as the checkpoint listing is) gives up at once instead of waiting it again
    caplog.clear()
    with pytest.raises(StorageError, match=r"^cannot list .*FEDPGP_STORAGE_RETRY_S=2"):
        RunStorage(s3_uri(proxy.endpoint, "runs", "outage/checkpoints")).list()
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]
    proxy.up()
    assert storage.read_text("b.txt") == "2"
    proxy.down()
