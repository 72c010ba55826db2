"""`fedpgp-ray serve`: a real Ray Serve application on 127.0.0.1 serving a run's personalised model.

One run (4 clients, tracking on) and one server for the module: answers equal the MLflow model's for
mixed clients batched together, bad input is 4xx and the server stays up, and a newly registered
round (a resumed run) is switched to under concurrent load with zero errors.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from processes import free_port, stop_group

from fedpgp_ray import serving_io
from fedpgp_ray.run import main as run_main

pytestmark = pytest.mark.slow

EXPERIMENT = "serve-test"
TASK = f"{EXPERIMENT}-quickstart-world-fedpgp"
CLIENTS = 4


def _run_args(out: Path, uri: str, rounds: int) -> list[str]:
    sets = [f"train.rounds={rounds}", "train.local_epochs=1", "runtime.kind=local", f"federation.num_clients={CLIENTS}",
            "data.world.test_per_class=4", "evaluation.every=1", f"output_dir={out}", f"tracking.uri={uri}",
            f"tracking.experiment={EXPERIMENT}"]
    return [arg for s in sets for arg in ("--set", s)] + ["--no-progress"]


def post(port: int, payload: dict | bytes, timeout: float = 120) -> tuple[int, dict, str | None]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), response.headers.get("fedpgp-model")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}"), None


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{root}/mlflow.db"
    saved_env = os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert run_main(_run_args(root / "run", uri, 1)) == 0
    port = free_port()
    log = (root / "serve.log").open("w")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    server = subprocess.Popen([sys.executable, "-m", "fedpgp_ray.serve", "--model", f"models:/{TASK}@newest",
                               "--tracking-uri", uri, "--port", str(port), "--poll-s", "1", "--max-body-mb", "4"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # Serve start-up is slow on a loaded machine
        while True:
            assert server.poll() is None, (root / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, "fedpgp-ray serve did not answer within 300 s"
                time.sleep(1)
        rng = np.random.default_rng(0)
        images = [_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(6)]
        yield SimpleNamespace(root=root, uri=uri, port=port, server=server, images=images)
    finally:
        if server.poll() is None:  # Ctrl-C: the command stops its application and its local Ray
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
        stop_group(server)
        log.close()
        if saved_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def _reference(served, version: str, images: list[str], client_id: int | None) -> pd.DataFrame:
    with mlflow.tracking._tracking_service.utils._use_tracking_uri(served.uri):
        model = mlflow.pyfunc.load_model(f"models:/{TASK}/{version}")
    return model.predict(pd.DataFrame({"image": images}), params={} if client_id is None else {"client_id": client_id})


def test_mixed_clients_batched_together_answer_as_the_mlflow_model(served):
    im = served.images
    requests = [(0, im[0:2]), (1, im[1:3]), (None, im[2:4]), (2, im[3:5]), (3, im[4:6]), (1, im[:1]),
                (None, im[:3]), (0, im[5:6])]
    payloads = [{"dataframe_split": {"columns": ["image"], "data": [[image] for image in images]},
                 **({"params": {"client_id": cid}} if cid is not None else {})} for cid, images in requests]
    with ThreadPoolExecutor(8) as pool:  # at once: the replica batches requests of several clients
        answers = list(pool.map(lambda p: post(served.port, p), payloads))
    for (cid, images), (status, body, model) in zip(requests, answers):
        assert status == 200 and model == f"{TASK}/1", body
        expected = _reference(served, "1", images, cid)
        rows = body["predictions"]
        assert [r["label"] for r in rows] == list(expected["label"])
        assert np.allclose([r["probabilities"] for r in rows], np.stack(expected["probabilities"]), atol=1e-5)
        assert {r["prompt"] for r in rows} == {"global" if cid is None else "personal"}
    # MLflow's other JSON forms, and custom classes
    status, body, _ = post(served.port, {"dataframe_records": [{"image": served.images[0]}],
                                         "params": {"client_id": 2, "classes": ["red circle", "blue square"]}})
    assert status == 200 and body["predictions"][0]["label"] in ("red circle", "blue square")
    status, body, _ = post(served.port, {"inputs": {"image": served.images[:2]}, "params": {"client_id": 1}})
    assert status == 200 and len(body["predictions"]) == 2


def test_bad_input_is_4xx_and_the_server_stays_up(served):
    image = served.images[0]

    def frame(params: dict | None = None, images: list[str] | None = None) -> dict:
        return {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images or [image]]},
                **({"params": params} if params else {})}

    bomb = io.BytesIO()
    Image.new("L", (5000, 5000)).save(bomb, format="PNG")  # 25 M pixels in about 25 KB
    cases = [
        (b"{not json", 400, "valid JSON"),
        (b"x" * (5 * 2**20), 413, "more than the 4 MiB allowed"),
        (frame({"classes": [f"class {i}" for i in range(10_000)]}), 400, "10000 names, more than the 1000"),
        (frame(images=[base64.b64encode(b"GIF89a not an image").decode()]), 400, "not a readable PNG or JPEG"),
        (frame(images=[base64.b64encode(bomb.getvalue()).decode()]), 400, "5000 x 5000 pixels"),
        (frame({"client_id": CLIENTS}), 404, f"client {CLIENTS} is not in this model"),
        (frame({"client_id": "three"}), 400, "must be an integer client id"),
    ]
    for payload, status, message in cases:
        got, body, _ = post(served.port, payload)
        assert got == status and message in body.get("message", ""), (got, body)
    urllib.request.urlopen(f"http://127.0.0.1:{served.port}/ping", timeout=10).close()
    assert post(served.port, frame({"client_id": 1}))[0] == 200


def test_a_newly_registered_round_is_switched_to_under_load_with_zero_errors(served):
    payload = lambda cid: {"dataframe_split": {"columns": ["image"], "data": [[served.images[cid]]]},  # noqa: E731
                           "params": {"client_id": cid}}
    seen: list[tuple[int, str | None]] = []
    errors: list[tuple[int, dict]] = []
    switched_at: list[float] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        i = 0
        while not stop.is_set():
            status, body, model = post(served.port, payload((worker + i) % CLIENTS))
            i += 1
            if status != 200:
                errors.append((status, body))
            else:
                seen.append((status, model))
                if model == f"{TASK}/2" and not switched_at:
                    switched_at.append(time.monotonic())

    threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        # a further round of the same run: registered as version 2, `@newest` moves to it
        assert run_main(["--resume", str(served.root / "run"), "--set", "train.rounds=2", "--no-progress"]) == 0
        deadline = time.monotonic() + 120
        while not switched_at and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)  # and keep the load on a little after the switch
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=150)
    versions = [model for _, model in seen]
    print(f"hot update: {len(seen) + len(errors)} requests, {len(errors)} errors, "
          f"{versions.count(f'{TASK}/1')} answered by v1, {versions.count(f'{TASK}/2')} by v2")
    assert errors == []
    assert f"{TASK}/1" in versions and f"{TASK}/2" in versions
    # after the switch, v1 never answers again, and v2 answers with the round-2 prompts
    assert f"{TASK}/1" not in versions[versions.index(f"{TASK}/2") + 4 * 2:]
    status, body, model = post(served.port, payload(1))
    expected = _reference(served, "2", [served.images[1]], 1)
    assert model == f"{TASK}/2" and np.allclose(body["predictions"][0]["probabilities"],
                                                expected["probabilities"][0], atol=1e-5)
    assert not np.allclose(expected["probabilities"][0], _reference(served, "1", [served.images[1]], 1)
                           ["probabilities"][0], atol=1e-5)
    client = mlflow.MlflowClient(served.uri)
    aliases = client.get_registered_model(TASK).aliases
    assert {k: str(v) for k, v in aliases.items()} == {"newest": "2", "round-1": "1", "round-2": "2"}


def test_serve_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    from fedpgp_ray.serve import main as serve_main

    for argv, message in [
        (["--run", str(tmp_path)], "no config.yaml"),
        (["--run", str(tmp_path), "--min-replicas", "2"], "both --min-replicas and --max-replicas"),
        (["--run", str(tmp_path), "--replicas", "0"], "--replicas 0"),
        (["--model", "models:/nope@newest", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"], "no MLflow store there"),
    ]:
        assert serve_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert serving_io.MAX_CLASSES == 1000
