"""Trained prompt classifiers as MLflow Models: logged and registered at the end of a run, loaded
with `mlflow.pyfunc.load_model`, served with `mlflow models serve`. See docs/SERVING.md.

A model holds the prompt tensors only (FedPGP: the global sigma plus the client's U, V; a few
kilobytes), the class names and a reference to the frozen backbone, never a copy of it:
  - a checkpoint shipped in the package (`fedpgp-tiny` + `fedpgp-world`) or an open_clip tag
    (`ViT-B-16` + `openai`): its name and tag, loaded from the installed package / open_clip;
  - a local checkpoint file: logged once per run as the run artifact `backbone/<file>`, and every
    model of the run records that artifact's URI.
Either way the model records the sha256 of the backbone's weights (`FrozenClip.weights_digest`)
and refuses to load onto other weights.

The classifier is the one evaluation uses: the algorithm's `logits` over the frozen CLIP's image
features of the backbone's own preprocessing, so a served client model scores its test sets
exactly as the run did.

Input: a DataFrame column `image` of base64-encoded PNG or JPEG files (JSON: `dataframe_split`,
`dataframe_records` or `inputs`); in Python also numpy arrays / PIL images through
`PromptClassifier.probabilities` (`model.unwrap_python_model().classifier`). Optional param
`classes`: a list of class names to classify into instead of the model's own (any labels, novel
ones included: the personalised prompt is applied to them). Output: one row per image with
`label`, `probability` and `probabilities` (in the order of the class list). A malformed request
(not a PNG/JPEG, an empty or repeated class list) raises an MlflowException with error code
INVALID_PARAMETER_VALUE, which the scoring server answers with HTTP 400 and the message.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array
from PIL import Image

from fedpgp_ray.algorithms import Algorithm, FrozenEncoders, Params, build_algorithm
from fedpgp_ray.clip.backbone import FrozenClip, load_clip
from fedpgp_ray.clip.features import TOKEN_DTYPE
from fedpgp_ray.config import AlgorithmConfig, ExperimentConfig, ModelConfig
from fedpgp_ray.serving_io import (CLASSES_PARAM, IMAGE_COLUMN, bad_request, check_classes, decode_image,  # noqa: F401
                                   encode_image, image_column, result_frame, to_pil)

log = logging.getLogger(__name__)

PROMPT_ARTIFACT = "prompt"                 # the model's artifacts: prompt tensors (.pt, plain tensors)
SPEC_ARTIFACT = "spec"                     # and the ClassifierSpec (.json)
BACKBONE_ARTIFACT_DIR = "backbone"         # run artifact folder of a local backbone checkpoint
MODEL_CODE = Path(__file__).with_name("serving_model.py")  # MLflow "model from code": no pickle
MAX_CUSTOM_CLASS_LISTS = 64  # distinct per-request class lists whose prompts stay cached


# -- the classifier ---------------------------------------------------------------------------------------
@dataclass
class ClassifierSpec:
    """Everything a classifier needs besides its prompt tensors (the model's `spec` artifact, JSON).

    backbone: name, pretrained (tag or null), precision, weights_digest, weights_uri (a local
        checkpoint's run artifact, else null).
    classnames: the classes it classifies into by default (the run's base classes).
    novel_classnames: the run's novel classes (classify into them with the `classes` param).
    client: the client id, or None for the global model.
    """
    algorithm: dict[str, Any]
    backbone: dict[str, Any]
    classnames: list[str]
    novel_classnames: list[str] = field(default_factory=list)
    client: int | None = None
    round: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClassifierSpec":
        return cls(**{k: data[k] for k in ("algorithm", "backbone", "classnames", "novel_classnames", "client",
                                           "round") if k in data})


_BACKBONES: dict[tuple[str, str | None, str, str], FrozenClip] = {}
_BACKBONES_LOCK = threading.Lock()


def load_backbone(backbone: dict[str, Any], device: str | torch.device | None = None) -> FrozenClip:
    """The frozen CLIP a spec references, shared by every classifier of this process (it never changes)."""
    pretrained = backbone.get("pretrained")
    if backbone.get("weights_uri"):  # a local checkpoint, logged once as a run artifact
        pretrained = mlflow.artifacts.download_artifacts(artifact_uri=backbone["weights_uri"])
    cfg = ModelConfig(name=backbone["name"], pretrained=pretrained, precision=backbone.get("precision", "fp32"))
    key = (cfg.name, cfg.pretrained, cfg.precision, str(device))
    with _BACKBONES_LOCK:
        if key not in _BACKBONES:
            clip = load_clip(cfg, device)
            expected = backbone.get("weights_digest")
            if expected and clip.weights_digest() != expected:
                raise MlflowException(
                    f"backbone {backbone['name']} / {backbone.get('pretrained') or backbone.get('weights_uri')} "
                    f"loaded here has other weights (sha256 {clip.weights_digest()[:16]}) than the model was "
                    f"trained on ({expected[:16]}): install the fedpgp-ray version (or open_clip weights) "
                    f"the run used")
            _BACKBONES[key] = clip
        return _BACKBONES[key]


class PromptClassifier:
    """A trained prompt classifier: exactly evaluation's `algorithm.logits` over CLIP image features.

    params: the merged global + personal prompt tensors the algorithm classifies with.
    """

    def __init__(self, spec: ClassifierSpec, params: Params, clip: FrozenClip) -> None:
        self.spec = spec
        self.algorithm: Algorithm = build_algorithm(AlgorithmConfig(**spec.algorithm))
        self.clip = clip
        self.encoders = FrozenEncoders(clip, self.algorithm.cfg.n_ctx)
        self.params = {k: v.to(clip.device) for k, v in params.items()}
        self.uses_tokens = bool(getattr(self.algorithm, "uses_patch_tokens", False))
        # Algorithm.logits is `scale * image features @ class features^T`: the class features of a
        # class list are then the same for every request and are computed once (same ops, same values).
        self.pooled = type(self.algorithm).logits is Algorithm.logits
        self._class_features: dict[tuple[str, ...], torch.Tensor] = {}
        self._custom: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()  # the scoring server may call predict from several threads

    @property
    def classnames(self) -> list[str]:
        return list(self.spec.classnames)

    def check_classes(self, classes: Sequence[str] | None) -> list[str]:
        """The class list to classify into: the model's own when None, else `classes` validated."""
        return check_classes(classes, self.spec.classnames)

    def preprocess(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """The backbone's input batch; each image is dropped once preprocessed (bounded memory)."""
        return torch.stack([self.clip.preprocess(to_pil(image, i)) for i, image in enumerate(images)])

    @torch.inference_mode()
    def probabilities(self, images: Sequence[Image.Image | np.ndarray] | torch.Tensor,
                      classes: Sequence[str] | None = None) -> tuple[list[str], torch.Tensor]:
        """(class names, probabilities [n_images, n_classes]) for RGB images (PIL or uint8 arrays HxWx3),
        or for a batch already preprocessed (`preprocess`)."""
        names = self.check_classes(classes)
        if len(images) == 0:
            return names, torch.zeros(0, len(names))
        batch = images if isinstance(images, torch.Tensor) else self.preprocess(images)
        with self._lock:
            self._bound_prompt_cache(names)
            extra = {}
            if self.uses_tokens:  # FedOTP: evaluation reads the tokens from the float16 feature cache
                features, tokens = self.clip.encode_image_tokens(batch)
                extra = {"patch_tokens": tokens.to(TOKEN_DTYPE).float()}
            else:
                features = self.clip.encode_images(batch)
            try:
                with self.clip.autocast():
                    if self.pooled:
                        logits = self.clip.logit_scale * features @ self._features_of(names).t()
                    else:
                        logits = self.algorithm.logits(self.encoders, self.params, features, names, **extra)
            except ValueError as err:  # a class name too long for the text encoder's context
                raise bad_request(f"'{CLASSES_PARAM}': {err}") from None
        return names, logits.float().softmax(dim=-1).cpu()

    def _features_of(self, names: list[str]) -> torch.Tensor:
        key = tuple(names)
        if key not in self._class_features:
            self._class_features[key] = self.algorithm.class_features(self.encoders, self.params, names)
        return self._class_features[key]

    def _bound_prompt_cache(self, names: list[str]) -> None:
        """Prompts and class features are cached per class list: start afresh after many per-request lists."""
        key = tuple(names)
        if key != tuple(self.spec.classnames) and key not in self._custom:
            if len(self._custom) >= MAX_CUSTOM_CLASS_LISTS:
                self.encoders = FrozenEncoders(self.clip, self.algorithm.cfg.n_ctx)
                self._class_features = {k: v for k, v in self._class_features.items()
                                        if k == tuple(self.spec.classnames)}
                self._custom.clear()
            self._custom.add(key)


# -- the MLflow pyfunc model ------------------------------------------------------------------------------
class PromptClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of PromptClassifier (built from the model's `prompt` and `spec` artifacts)."""

    def __init__(self, classifier: PromptClassifier | None = None) -> None:
        self.classifier = classifier

    def load_context(self, context: Any) -> None:
        spec = ClassifierSpec.from_dict(json.loads(Path(context.artifacts[SPEC_ARTIFACT]).read_text()))
        params = torch.load(context.artifacts[PROMPT_ARTIFACT], weights_only=True, map_location="cpu")
        self.classifier = PromptClassifier(spec, params, load_backbone(spec.backbone))

    # model_input annotated as a DataFrame: MLflow then takes the schema from the logged signature.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        column = image_column(model_input)
        classes = (params or {}).get(CLASSES_PARAM)
        if classes is not None and list(classes) == self.classifier.classnames:
            classes = None  # the signature's default: the model's own classes
        self.classifier.check_classes(classes)  # before any image is decoded
        # one image decoded at a time: memory holds one full-size image, not the request's
        preprocess = self.classifier.clip.preprocess
        batch = torch.stack([preprocess(decode_image(value, f"row {i} of column '{IMAGE_COLUMN}'"))
                             for i, value in enumerate(column)]) if column else []
        names, probs = self.classifier.probabilities(batch, classes)
        return result_frame(names, probs)


def signature(classnames: list[str]) -> ModelSignature:
    """Input column `image` (base64 PNG/JPEG), output label/probability/probabilities, param `classes`."""
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, IMAGE_COLUMN)]),
        outputs=Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.double, "probability"),
                        ColSpec(Array(DataType.double), "probabilities")]),
        params=ParamSchema([ParamSpec(CLASSES_PARAM, DataType.string, list(classnames), shape=(-1,))]))


def example_input(size: int = 32) -> pd.DataFrame:
    """A one-image input example (a small colour gradient): documents the format in the MLmodel."""
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    image = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 128,
                                                                                          dtype=np.uint8)], -1)
    return pd.DataFrame({IMAGE_COLUMN: [encode_image(image)]})


# -- from a run's checkpoints -----------------------------------------------------------------------------
@dataclass
class RunPrompts:
    """The trained prompts of a run: final global params and each client's classifier params."""
    round: int
    global_params: Params
    clients: dict[int, Params]
    global_classifier: Params | None


def read_run_prompts(cfg: ExperimentConfig, width: int) -> RunPrompts:
    """From the run's checkpoints: the last server round's global params, and per client the merged
    params evaluation classifies with (its newest saved personal state, else its seeded initial one,
    as ClientWorker.state does). width: the text encoder's width (for never-trained clients)."""
    from fedpgp_ray.checkpoint import CheckpointStore
    from fedpgp_ray.client import PERSONAL_INIT, seeded_generator
    from fedpgp_ray.storage import RunStorage

    store = CheckpointStore(RunStorage(cfg.output_dir).child("checkpoints"))
    saved = store.latest_server()
    if saved is None:
        raise FileNotFoundError(f"no server checkpoint under {store.directory}: the run has not finished a round")
    algorithm = build_algorithm(cfg.algorithm)
    rnd, global_params = int(saved["round"]), dict(saved["global_params"])
    clients: dict[int, Params] = {}
    if algorithm.personal_keys:
        for cid in range(cfg.federation.num_clients):
            state = store.load_client(cid, rnd)
            personal = state["personal"] if state is not None else algorithm.init_personal(
                width, seeded_generator(cfg.seed, PERSONAL_INIT, cid))
            clients[cid] = {**global_params, **personal}
    return RunPrompts(rnd, global_params, clients, algorithm.global_classifier(global_params))


def run_classnames(cfg: ExperimentConfig, results: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """(base, novel) class names of a run: from its results' dataset manifest, else from the dataset."""
    manifest = (results or {}).get("dataset_manifest") or {}
    if manifest.get("base_classes"):
        return list(manifest["base_classes"]), list(manifest.get("novel_classes") or [])
    from fedpgp_ray.data.partition import partition_dataset
    from fedpgp_ray.data.registry import build_dataset

    partition = partition_dataset(build_dataset(cfg.data, cfg.seed), cfg.data, cfg.federation.num_clients, cfg.seed)
    novel = partition.novel if partition.novel is not None and partition.novel_kind == "classes" else None
    return ([partition.classnames[c] for c in partition.train_classes],
            [partition.classnames[c] for c in novel.classes] if novel else [])


def backbone_reference(cfg: ModelConfig, clip: FrozenClip, weights_uri: str | None) -> dict[str, Any]:
    """How a model finds its backbone: name + tag (shipped or open_clip), or a logged checkpoint's URI."""
    return {"name": cfg.name, "pretrained": None if weights_uri else cfg.pretrained, "precision": cfg.precision,
            "weights_uri": weights_uri, "weights_digest": clip.weights_digest()}


def is_local_checkpoint(cfg: ModelConfig) -> bool:
    """model.pretrained is a file of the user's (not a shipped checkpoint, not an open_clip tag)."""
    from fedpgp_ray.clip.backbone import shipped_weights

    return bool(cfg.pretrained) and f"{cfg.name}/{cfg.pretrained}" not in shipped_weights() and Path(
        cfg.pretrained).expanduser().is_file()


def classifier_from_run(run_dir: str, client_id: int | None) -> PromptClassifier:
    """The classifier of client `client_id` (None: the global model) of the run in `run_dir`, built
    from its config, checkpoints and results, without MLflow (`fedpgp-ray predict --run`)."""
    import json

    import yaml

    from fedpgp_ray.config import config_from_dict
    from fedpgp_ray.storage import RunStorage

    storage = RunStorage(run_dir)
    if not storage.exists("config.yaml"):
        raise FileNotFoundError(f"{storage.display()} has no config.yaml: pass the output_dir of a run")
    cfg = config_from_dict(yaml.safe_load(storage.read_text("config.yaml")), [f"output_dir={run_dir}"])
    results = json.loads(storage.read_text("results.json")) if storage.exists("results.json") else None
    clip = load_clip(cfg.model, "cpu" if cfg.model.device == "auto" and not torch.cuda.is_available() else None)
    width = FrozenEncoders(clip, cfg.algorithm.n_ctx).width
    prompts = read_run_prompts(cfg, width)
    base, novel = run_classnames(cfg, results)
    if client_id is None:
        params = prompts.global_classifier
        if params is None:
            raise ValueError(f"algorithm {cfg.algorithm.name} has no global classifier (its classifier needs "
                             f"personal parameters): pass --client ID")
    else:
        if client_id not in prompts.clients:
            known = f"0..{cfg.federation.num_clients - 1}" if prompts.clients else "none (no personal parameters)"
            raise ValueError(f"--client {client_id}: the run's clients are {known}"
                             + ("" if prompts.clients else "; leave --client out for the global model"))
        params = prompts.clients[client_id]
    spec = ClassifierSpec(asdict(cfg.algorithm), backbone_reference(cfg.model, clip, None), base, novel,
                          client_id, prompts.round)
    return PromptClassifier(spec, params, clip)


# -- logging and registering at the end of a run -----------------------------------------------------------
def registered_name(experiment: str, model: str) -> str:
    """Registry name of a run's model: `<experiment>-<model>` with characters outside [A-Za-z0-9_.-] as '-'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{experiment}-{model}").strip("-")


def pip_requirements() -> list[str]:
    """What serving needs; fedpgp-ray itself is not on PyPI: serve with `--env-manager local`."""
    import open_clip
    import torchvision

    from fedpgp_ray import __version__

    return [f"fedpgp-ray=={__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"torchvision=={torchvision.__version__.split('+')[0]}", f"open_clip_torch=={open_clip.__version__}",
            f"mlflow=={mlflow.__version__}", "pandas", "pillow"]


def log_run_models(cfg: ExperimentConfig, client: Any, run_id: str, tracking_uri: str,
                   results: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Log and register the run's classifiers: `client-<id>` (global + its personal params) for each
    client of an algorithm with personal parameters, and `global` (global params alone) when the
    algorithm defines one. Registered as `<experiment>-client-<id>` / `<experiment>-global`, version
    tags algorithm, round, client, dataset. Models already logged for this run and round (a resumed,
    finished run) are not logged again. Returns one dict per model (name, version, uri, bytes).
    """
    from mlflow.models import Model

    began = time.perf_counter()
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id).name
    clip = load_clip(cfg.model, "cpu")
    prompts = read_run_prompts(cfg, FrozenEncoders(clip, cfg.algorithm.n_ctx).width)
    base, novel = run_classnames(cfg, results)
    wanted = {f"client-{cid}": (cid, params) for cid, params in prompts.clients.items()}
    if prompts.global_classifier is not None:
        wanted["global"] = (None, prompts.global_classifier)
    done = {m.name for m in client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND tags.round = '{prompts.round}'")}
    wanted = {name: item for name, item in wanted.items() if name not in done}
    logged = []
    with _fluent_store(tracking_uri), _quiet_mlflow(), tempfile.TemporaryDirectory(prefix="fedpgp-") as tmp:
        weights_uri = _log_backbone_once(cfg.model, client, run_id, run.info.artifact_uri)
        backbone = backbone_reference(cfg.model, clip, weights_uri)
        for name, (cid, params) in wanted.items():
            spec = ClassifierSpec(asdict(cfg.algorithm), backbone, base, novel, cid, prompts.round)
            (Path(tmp) / name).mkdir()
            prompt_file, spec_file = Path(tmp) / name / "prompt.pt", Path(tmp) / name / "spec.json"
            torch.save({k: v.detach().cpu().contiguous() for k, v in params.items()}, prompt_file)
            spec_file.write_text(json.dumps(asdict(spec), indent=1))
            tags = {"algorithm": cfg.algorithm.name, "round": str(prompts.round), "dataset": cfg.data.dataset,
                    "client": "global" if cid is None else str(cid)}
            # Created here, in the run's experiment (Model.log alone would put it in the current one).
            model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id, tags=tags)
            info = Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id,
                             model_id=model.model_id, python_model=str(MODEL_CODE),
                             artifacts={PROMPT_ARTIFACT: str(prompt_file), SPEC_ARTIFACT: str(spec_file)},
                             signature=signature(base), input_example=example_input(),
                             pip_requirements=pip_requirements(), step=prompts.round)
            with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints two lines per registration
                version = mlflow.register_model(info.model_uri, registered_name(experiment, name), tags=tags)
            logged.append({"name": version.name, "version": version.version, "uri": info.model_uri,
                           "bytes": _model_bytes(client, info.model_id)})
    if logged:
        log.info("MLflow: logged %d models in %.1f s", len(logged), time.perf_counter() - began)
    return logged


@contextlib.contextmanager
def _fluent_store(uri: str):
    """MLflow's fluent calls (Model.log, register_model) use `uri` within; the process's settings,
    $MLFLOW_TRACKING_URI included, are restored after (MLflow's own helper would unset that variable)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


@contextlib.contextmanager
def _quiet_mlflow():
    """No progress bars and no per-model INFO lines while logging a run's models (warnings still show)."""
    logger = logging.getLogger("mlflow.pyfunc")
    level, bar = logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    logger.setLevel(logging.WARNING)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def _log_backbone_once(cfg: ModelConfig, client: Any, run_id: str, artifact_uri: str) -> str | None:
    """A local checkpoint file: log it once as the run artifact backbone/<file>; return its URI."""
    if not is_local_checkpoint(cfg):
        return None
    path = Path(cfg.pretrained).expanduser()
    if path.name not in {Path(a.path).name for a in client.list_artifacts(run_id, BACKBONE_ARTIFACT_DIR)}:
        client.log_artifact(run_id, str(path), BACKBONE_ARTIFACT_DIR)
    return f"{artifact_uri.rstrip('/')}/{BACKBONE_ARTIFACT_DIR}/{path.name}"


def _model_bytes(client: Any, model_id: str, path: str | None = None) -> int:
    """Total size of a logged model's files."""
    return sum(_model_bytes(client, model_id, item.path) if item.is_dir else (item.file_size or 0)
               for item in client.list_logged_model_artifacts(model_id, path))


def log_tracker_models(tracker: Any, results: dict[str, Any]) -> list[dict[str, Any]]:
    """MlflowTracker.on_end hook: log_run_models and print how to use them; never raises (the run's
    results and checkpoints are on disk, and `fedpgp-ray predict --run` works without the models)."""
    try:
        models = log_run_models(tracker.cfg, tracker.client, tracker.run_id, tracker.uri, results)
    except Exception as err:  # noqa: BLE001 - a model-logging failure must not fail a finished run
        text = str(err).strip().splitlines()
        log.warning("MLflow: could not log the run's models (%s: %s); `fedpgp-ray predict --run %s` still "
                    "classifies with them", type(err).__name__, text[0][:300] if text else "", tracker.output_dir)
        return []
    if models:
        print(models_summary(models, tracker.uri), flush=True)
    return models


def models_summary(models: list[dict[str, Any]], tracking_uri: str) -> str:
    """What was registered, its size, and the commands that predict with and serve the first model."""
    import shlex

    first = models[0]
    uri = f"models:/{first['name']}/{first['version']}"
    names = ", ".join(f"{m['name']} v{m['version']}" for m in models)
    per_model = sum(m["bytes"] for m in models) / len(models) / 1024
    store = shlex.quote(tracking_uri)
    return "\n".join([
        f"MLflow models: {len(models)} registered ({per_model:.1f} KiB each on average, backbone referenced): {names}",
        f"  predict: fedpgp-ray predict --model {uri} --tracking-uri {store} IMAGE...",
        f"  serve:   MLFLOW_TRACKING_URI={store} mlflow models serve -m {uri} --env-manager local "
        f"-h 127.0.0.1 -p 5001"])
