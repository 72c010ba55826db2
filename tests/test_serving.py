"""Trained classifiers as MLflow Models: logged and registered by a real quickstart run, loaded with
`mlflow.pyfunc.load_model`, served by `mlflow models serve` on 127.0.0.1, and `fedpgp-ray predict`.

The reference everywhere is the run's own evaluation path, rebuilt from public pieces: the
checkpointed prompts, the feature cache's image features, and `algorithm.logits`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from processes import free_port, stop_group

from fedpgp_ray import model_registry, serving
from fedpgp_ray.algorithms import ALGORITHMS, FrozenEncoders, build_algorithm
from fedpgp_ray.checkpoint import CheckpointStore
from fedpgp_ray.clip.backbone import WEIGHTS_DIR, load_clip
from fedpgp_ray.clip.features import ImageFeatureCache
from fedpgp_ray.config import AlgorithmConfig, ModelConfig, load_config
from fedpgp_ray.data.partition import partition_dataset
from fedpgp_ray.data.registry import build_dataset
from fedpgp_ray.predict import main as predict_main
from fedpgp_ray.run import main as run_main

@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_classifies_exactly_as_its_evaluation_logits(name):
    """PromptClassifier (with its per-class-list feature cache) equals softmax(algorithm.logits)."""
    cfg = AlgorithmConfig(name=name, n_ctx=4)
    clip = load_clip(ModelConfig(pretrained=None), "cpu")
    algorithm, encoders = build_algorithm(cfg), FrozenEncoders(clip, cfg.n_ctx)
    generator = torch.Generator().manual_seed(0)
    global_params = algorithm.init_global(encoders.width, generator)
    params = {**global_params, **algorithm.init_personal(encoders.width, generator)}
    names = ["red striped circle", "blue square", "green dotted star"]
    spec = serving.ClassifierSpec(asdict(cfg), {"name": "fedpgp-tiny", "pretrained": None}, names)
    classifier = serving.PromptClassifier(spec, params, clip)
    images = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(3)]
    batch = torch.stack([clip.preprocess(Image.fromarray(image)) for image in images])
    with torch.inference_mode():
        if classifier.uses_tokens:  # evaluation reads float16 patch tokens from the feature cache
            features, tokens = clip.encode_image_tokens(batch)
            extra = {"patch_tokens": tokens.half().float()}
        else:
            features, extra = clip.encode_images(batch), {}
        expected = algorithm.logits(encoders, params, features, names, **extra).softmax(-1)
    for _ in range(2):  # the second call uses the cached class features
        got_names, probs = classifier.probabilities(images)
        assert got_names == names and torch.allclose(probs, expected, atol=1e-6)
    assert classifier.probabilities(images, names[:2])[1].shape == (3, 2)
    # the global model: the global params alone (FedPGP: sigma, with U V = 0 exactly)
    alone = algorithm.global_classifier(global_params)
    assert (alone is None) == (name in ("local", "fedotp"))
    if name == "fedpgp":
        with torch.inference_mode():
            sigma_only = encoders.text.encode(global_params["sigma"], encoders.prompts(names))
            assert torch.equal(algorithm.class_features(encoders, alone, names), sigma_only)


EXPERIMENT = "serving-test"
TASK = f"{EXPERIMENT}-quickstart-world-fedpgp"   # registered names carry experiment, config, dataset, algorithm
CLIENTS = 4


def _run(out: Path, uri: str, extra: list[str] = ()) -> None:
    sets = ["train.rounds=2", "train.local_epochs=1", "runtime.kind=local", f"federation.num_clients={CLIENTS}",
            "data.world.test_per_class=8",
            "evaluation.every=1", f"output_dir={out}", f"tracking.uri={uri}", f"tracking.experiment={EXPERIMENT}",
            *extra]
    assert run_main([arg for s in sets for arg in ("--set", s)] + ["--no-progress"]) == 0


@pytest.fixture(scope="module")
def finished(tmp_path_factory, monkeypatch_module) -> SimpleNamespace:
    """A 2-round quickstart run (4 clients, shipped tiny CLIP) that logged and registered its models."""
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root}/mlflow.db"
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    _run(root / "run", uri, ["tracking.log_client_models=true"])
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", uri)  # where models:/ URIs resolve, in this module
    cfg = load_config(root / "run" / "config.yaml", [f"output_dir={root / 'run'}"])
    dataset = build_dataset(cfg.data, cfg.seed)
    partition = partition_dataset(dataset, cfg.data, CLIENTS, cfg.seed)
    results = json.loads((root / "run" / "results.json").read_text())
    return SimpleNamespace(root=root, uri=uri, cfg=cfg, dataset=dataset, partition=partition, results=results,
                           client=MlflowClient(uri))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _model_uri(run: SimpleNamespace, name: str) -> str:
    versions = run.client.search_model_versions(f"name = '{TASK}-{name}'")
    assert len(versions) == 1, [v.version for v in versions]
    return f"models:/{versions[0].name}/{versions[0].version}"


def _load(run: SimpleNamespace, name: str):
    return mlflow.pyfunc.load_model(_model_uri(run, name))


def _frame(run: SimpleNamespace, indices) -> pd.DataFrame:
    return pd.DataFrame({"image": [serving.encode_image(run.dataset.test.load(int(i))) for i in indices]})


class InProcess:
    """The run's evaluation path from public pieces: checkpointed prompts, cached features, logits."""

    def __init__(self, run: SimpleNamespace) -> None:
        cfg = run.cfg
        self.run = run
        self.clip = load_clip(cfg.model, "cpu")
        self.encoders = FrozenEncoders(self.clip, cfg.algorithm.n_ctx)
        self.algorithm = build_algorithm(cfg.algorithm)
        self.store = CheckpointStore(Path(cfg.output_dir) / "checkpoints")
        saved = self.store.latest_server()
        self.round, self.global_params = saved["round"], saved["global_params"]
        cache = ImageFeatureCache(self.clip, None, cfg.evaluation.batch_size)
        self.features = cache.features(run.dataset.name, "test", run.dataset.test, np.arange(len(run.dataset.test)))

    def params(self, client_id: int | None):
        if client_id is None:
            return self.algorithm.global_classifier(self.global_params)
        return {**self.global_params, **self.store.load_client(client_id, self.round)["personal"]}

    @torch.inference_mode()
    def probabilities(self, client_id: int | None, indices, names: list[str]) -> torch.Tensor:
        logits = self.algorithm.logits(self.encoders, self.params(client_id), self.features[indices], names)
        return logits.softmax(-1)


def _names(run: SimpleNamespace, classes) -> list[str]:
    return [run.partition.classnames[c] for c in classes]


@pytest.mark.slow
def test_opt_in_registers_one_small_model_per_client_and_a_global_one(finished):
    registered = {m.name for m in finished.client.search_registered_models()}
    assert registered == {f"{TASK}-client-{c}" for c in range(CLIENTS)} | {f"{TASK}-global", TASK}
    run_id = json.loads((finished.root / "run" / "mlflow_run.json").read_text())["run_id"]
    for c in [*range(CLIENTS), None]:
        name = "global" if c is None else f"client-{c}"
        version = finished.client.get_model_version(f"{TASK}-{name}", "1")
        assert version.tags == {"algorithm": "fedpgp", "round": "2", "dataset": "world", "config": "quickstart.yaml",
                                "client": "global" if c is None else str(c)}
        assert version.run_id == run_id
        model = finished.client.get_logged_model(version.source.removeprefix("models:/"))
        files = {}
        root = Path(model.artifact_location.removeprefix("file://"))
        for path in root.rglob("*"):
            if path.is_file():
                files[str(path.relative_to(root))] = path.stat().st_size
        # the prompt tensors, spec, code file, MLmodel, environment and examples; no backbone copy
        assert {"MLmodel", "serving_model.py", "artifacts/prompt.pt", "artifacts/spec.json",
                "input_example.json"} <= set(files)
        assert sum(files.values()) < 32 * 1024, files
        spec = json.loads((root / "artifacts" / "spec.json").read_text())
        assert spec["backbone"]["pretrained"] == "fedpgp-world" and spec["backbone"]["weights_uri"] is None
        assert spec["classnames"] == finished.results["dataset_manifest"]["base_classes"]
    # the run's store holds the models; a second call for the same run and round logs nothing
    cfg = finished.cfg
    assert model_registry.log_run_models(cfg, finished.client, run_id, finished.uri, finished.results) == []
    assert len(finished.client.search_model_versions(f"name = '{TASK}-client-0'")) == 1


@pytest.mark.slow
def test_run_registers_one_personalised_model_with_aliases_tags_and_only_its_metrics(finished):
    model = finished.client.get_registered_model(TASK)
    assert {k: str(v) for k, v in model.aliases.items()} == {"newest": "1", "round-2": "1"}
    assert "fedpgp on world" in model.description
    version = finished.client.get_model_version(TASK, "1")
    assert version.tags == {"algorithm": "fedpgp", "round": "2", "dataset": "world", "config": "quickstart.yaml",
                            "clients": str(CLIENTS)}
    assert f"personal factors of {CLIENTS} clients" in version.description
    logged = finished.client.get_logged_model(version.source.removeprefix("models:/"))
    assert {m.key.removeprefix("final/"): m.value for m in logged.metrics} == pytest.approx(finished.results["final"])
    assert all(m.key.startswith("final/") for m in logged.metrics)  # no client/...
    root = Path(logged.artifact_location.removeprefix("file://"))
    spec = json.loads((root / "artifacts" / "spec.json").read_text())
    assert spec["personal"]["clients"] == CLIENTS and [k for k, _ in spec["personal"]["keys"]] == ["U", "V"]
    record = sum(int(np.prod(shape)) for _, shape in spec["personal"]["keys"])
    assert (root / "artifacts" / "personal.f32").stat().st_size == CLIENTS * record * 4  # one row per client
    # client 2's row is its checkpointed U, V
    saved = CheckpointStore(Path(finished.cfg.output_dir) / "checkpoints").load_client(2, 2)["personal"]
    row = np.fromfile(root / "artifacts" / "personal.f32", dtype=np.float32).reshape(CLIENTS, record)[2]
    assert np.array_equal(row, torch.cat([saved["U"].reshape(-1), saved["V"].reshape(-1)]).numpy())


@pytest.mark.slow
def test_personalised_model_answers_as_each_clients_own_model_and_the_global_one(finished):
    personal = mlflow.pyfunc.load_model(f"models:/{TASK}@newest")
    frame = _frame(finished, finished.partition.clients[0].local.indices[:3])
    for client_id in [*range(CLIENTS), None]:
        params = {} if client_id is None else {"client_id": client_id}
        got = personal.predict(frame, params=params)
        expected = _load(finished, "global" if client_id is None else f"client-{client_id}").predict(frame)
        assert list(got["label"]) == list(expected["label"])
        assert np.allclose(np.stack(got["probabilities"]), np.stack(expected["probabilities"]), atol=1e-6)
        assert set(got["prompt"]) == {"global" if client_id is None else "personal"}
    novel = _names(finished, finished.partition.novel.classes)[:4]
    got = personal.predict(frame, params={"client_id": 1, "classes": novel})
    assert set(got["label"]) <= set(novel) and len(got["probabilities"][0]) == 4
    with pytest.raises(mlflow.exceptions.MlflowException, match="client 4 is not in this model") as err:
        personal.predict(frame, params={"client_id": CLIENTS})
    assert err.value.get_http_status_code() == 404


@pytest.mark.slow
def test_pyfunc_predictions_equal_the_in_process_classifier(finished):
    reference = InProcess(finished)
    base = _names(finished, finished.partition.train_classes)
    for client_id in (1, None):
        model = _load(finished, "global" if client_id is None else f"client-{client_id}")
        indices = finished.partition.base.indices[::7]
        served = model.predict(_frame(finished, indices))
        expected = reference.probabilities(client_id, torch.as_tensor(indices), base)
        got = torch.tensor(np.stack(served["probabilities"].to_numpy()))
        assert torch.equal(got.argmax(1), expected.argmax(1))
        assert (got - expected.double()).abs().max() < 1e-5
        assert list(served["label"]) == [base[i] for i in expected.argmax(1).tolist()]
        assert np.allclose(served["probability"], expected.max(1).values.numpy(), atol=1e-5)
    # personalisation: client 1's classifier is not the global one
    client_probs = _load(finished, "client-1").predict(_frame(finished, indices))["probabilities"]
    global_probs = _load(finished, "global").predict(_frame(finished, indices))["probabilities"]
    assert not np.allclose(np.stack(client_probs), np.stack(global_probs), atol=1e-3)


@pytest.mark.slow
def test_served_client_model_scores_the_runs_local_base_novel_accuracy(finished):
    """Local / Base / Novel of client 2 through the pyfunc model equal the run's own figures."""
    client_id = 2
    model = _load(finished, f"client-{client_id}")
    part = finished.partition
    sets = {"local": part.clients[client_id].local, "base": part.base, "novel": part.novel}
    for key, eval_set in sets.items():
        names = _names(finished, eval_set.classes)
        served = model.predict(_frame(finished, eval_set.indices), params={"classes": names})
        truth = [finished.partition.classnames[y] for y in finished.dataset.test.labels[eval_set.indices]]
        accuracy = 100.0 * float(np.mean(np.asarray(served["label"]) == np.asarray(truth)))
        assert accuracy == pytest.approx(finished.results["final_clients"][str(client_id)][key], abs=1e-4), key


@pytest.mark.slow
def test_numpy_images_and_novel_class_names_in_python(finished):
    model = _load(finished, "client-0")
    classifier = model.unwrap_python_model().classifier
    indices = finished.partition.novel.indices[:6]
    arrays = [np.asarray(finished.dataset.test.load(int(i))) for i in indices]
    novel = _names(finished, finished.partition.novel.classes)
    names, probs = classifier.probabilities(arrays, novel)
    served = model.predict(_frame(finished, indices), params={"classes": novel})
    assert names == novel and probs.shape == (6, len(novel))
    assert np.allclose(np.stack(served["probabilities"]), probs.numpy(), atol=1e-6)
    expected = InProcess(finished).probabilities(0, torch.as_tensor(indices), novel)
    assert torch.equal(probs.argmax(1), expected.argmax(1))
    with pytest.raises(mlflow.exceptions.MlflowException, match="empty list"):
        model.predict(_frame(finished, indices[:1]), params={"classes": []})
    with pytest.raises(mlflow.exceptions.MlflowException, match="uint8 array"):
        classifier.probabilities([np.zeros((4, 4, 3), dtype=np.float32)])


def _post(port: int, payload: dict | str) -> tuple[int, dict]:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.mark.slow
def test_mlflow_models_serve_answers_images_custom_classes_and_refuses_bad_requests(finished, tmp_path):
    port = free_port()
    # as in an activated environment: the scoring server runs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": finished.uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log_file = (tmp_path / "serve.log").open("w")
    mlflow_exe = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen([mlflow_exe, "models", "serve", "-m", _model_uri(finished, "client-3"),
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, "mlflow models serve did not answer within 180 s"
                time.sleep(1)
        indices = finished.partition.clients[3].local.indices[:4]
        frame = _frame(finished, indices)
        expected = _load(finished, "client-3").predict(frame)
        status, answer = _post(port, {"dataframe_split": frame.to_dict(orient="split")})
        assert status == 200, answer
        rows = answer["predictions"]
        assert [r["label"] for r in rows] == list(expected["label"])
        assert np.allclose([r["probabilities"] for r in rows], np.stack(expected["probabilities"]), atol=1e-6)

        novel = _names(finished, finished.partition.novel.classes)[:5]
        status, answer = _post(port, {"dataframe_records": frame.to_dict(orient="records"),
                                      "params": {"classes": novel}})
        assert status == 200, answer
        assert all(r["label"] in novel and len(r["probabilities"]) == 5 for r in answer["predictions"])
        assert all(abs(sum(r["probabilities"]) - 1) < 1e-5 for r in answer["predictions"])

        status, answer = _post(port, {"dataframe_split": {"columns": ["image"], "data": [["aGVsbG8gd29ybGQ="]]}})
        assert status == 400 and "not a readable PNG or JPEG image" in answer["message"], answer
        status, answer = _post(port, {"dataframe_split": {"columns": ["image"], "data": [["%%% not base64"]]}})
        assert status == 400 and "is not base64" in answer["message"], answer
        status, answer = _post(port, {"dataframe_split": frame.to_dict(orient="split"), "params": {"classes": []}})
        assert status == 400 and "empty list" in answer["message"], answer
        status, answer = _post(port, {"dataframe_split": frame.to_dict(orient="split"),
                                      "params": {"classes": ["red circle", "red circle"]}})
        assert status == 400 and "more than once" in answer["message"], answer
        status, answer = _post(port, "{not json")
        assert 400 <= status < 500, answer
    finally:
        stop_group(server)
        log_file.close()


@pytest.mark.slow
def test_predict_cli_with_a_registered_model_and_with_a_run_dir(finished, tmp_path, capsys, monkeypatch):
    indices = finished.partition.clients[1].local.indices[:2]
    files = []
    for k, i in enumerate(indices):
        files.append(str(tmp_path / f"img{k}.png"))
        finished.dataset.test.load(int(i)).save(files[-1])
    expected = _load(finished, "client-1").predict(_frame(finished, indices))

    assert predict_main(["--model", _model_uri(finished, "client-1"), "--tracking-uri", finished.uri,
                         "--top", "1", *files]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ", 1)[1].rsplit(" (", 1)[0] for line in lines] == list(expected["label"])
    assert predict_main(["--run", str(finished.root / "run"), "--client", "1", "--top", "1", *files]) == 0
    assert capsys.readouterr().out.strip().splitlines() == lines  # the same classifier, without MLflow

    novel = _names(finished, finished.partition.novel.classes)[:3]
    assert predict_main(["--run", str(finished.root / "run"), "--client", "1", "--classes", ",".join(novel),
                         files[0]]) == 0
    shown = capsys.readouterr().out
    assert all(name in shown for name in novel)

    # the run's personalised model: --client picks the prompt, the same answers as client 1's own model
    assert predict_main(["--model", f"models:/{TASK}@newest", "--tracking-uri", finished.uri, "--client", "1",
                         "--top", "1", *files]) == 0
    assert capsys.readouterr().out.strip().splitlines() == lines

    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    for argv, message in [
        (["--run", str(finished.root / "run"), files[0], str(bad)], f"image file {bad} is not a readable PNG"),
        (["--run", str(finished.root / "run"), "--classes", " , ", files[0]], "--classes is empty"),
        (["--run", str(finished.root / "run"), "--client", "9", files[0]], "--client 9"),
        (["--model", "models:/nope/1", "--tracking-uri", finished.uri, files[0]], "nope"),
        (["--run", str(tmp_path), files[0]], "config.yaml"),
        (["--model", f"models:/{TASK}@newest", "--client", "4", files[0]], "client 4 is not in this model"),
    ]:
        assert predict_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # no store given: refused before loading anything
    assert predict_main(["--model", "models:/nope/1", files[0]]) == 2
    assert "--tracking-uri" in capsys.readouterr().err


@pytest.mark.slow
def test_local_backbone_checkpoint_is_logged_once_and_referenced(tmp_path, monkeypatch):
    """A user checkpoint file: one run artifact backbone/<file>, every model references it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    weights = tmp_path / "my-clip.pt"
    shutil.copy(WEIGHTS_DIR / "fedpgp-world.pt", weights)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _run(tmp_path / "run", uri, [f"model.pretrained={weights}", "train.rounds=1", "tracking.log_client_models=true",
                                 "federation.num_clients=2", "data.world.num_classes=8", "data.world.test_per_class=4"])
    client = MlflowClient(uri)
    run_id = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"]
    assert [a.path for a in client.list_artifacts(run_id, "backbone")] == ["backbone/my-clip.pt"]
    copies = [p for p in tmp_path.rglob("*.pt") if p.stat().st_size > 1024 * 1024]
    assert sorted(p.name for p in copies) == ["my-clip.pt", "my-clip.pt"]  # the original and the run artifact
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"models:/{TASK}-client-1/1")
    spec = model.unwrap_python_model().classifier.spec
    assert spec.backbone["weights_uri"].endswith("/backbone/my-clip.pt") and spec.backbone["pretrained"] is None
    assert len(model.predict(serving.example_input())) == 1


@pytest.mark.slow
def test_log_models_switch_off_registers_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _run(tmp_path / "run", uri, ["tracking.log_models=false", "train.rounds=1", "federation.num_clients=2",
                                 "data.world.num_classes=8", "data.world.test_per_class=4"])
    assert MlflowClient(uri).search_registered_models() == []
