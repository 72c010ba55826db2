"""Trained prompt classifiers: the classifier core (spec, backbone, evaluation logits), a run's prompts
read from its checkpoints, and the one-client MLflow model (`tracking.log_client_models`). The run's
personalised model is fedpgp_ray/personal_model.py, logging and registration fedpgp_ray/model_registry.py,
request I/O and limits fedpgp_ray/serving_io.py. See docs/SERVING.md.

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

import json
import threading
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

PROMPT_ARTIFACT = "prompt"                 # the model's artifacts: prompt tensors (.pt, plain tensors)
SPEC_ARTIFACT = "spec"                     # and the ClassifierSpec (.json)
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
    personal: a personalised model's factor layout (fedpgp_ray/personal_model.py), else None.
    """
    algorithm: dict[str, Any]
    backbone: dict[str, Any]
    classnames: list[str]
    novel_classnames: list[str] = field(default_factory=list)
    client: int | None = None
    round: int = 0
    personal: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClassifierSpec":
        return cls(**{k: data[k] for k in ("algorithm", "backbone", "classnames", "novel_classnames", "client",
                                           "round", "personal") if k in data})


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
    """The trained prompts of a run: the final global params, and each client's personal params read
    on demand (`personal(cid)`): a run may have 100,000 clients."""
    round: int
    global_params: Params
    global_classifier: Params | None
    num_clients: int                  # clients with personal params (0: the algorithm has none)
    personal_keys: tuple[str, ...]
    _personal: Any = field(repr=False, default=None)

    def personal(self, client_id: int) -> Params:
        """Client `client_id`'s personal params: its newest saved state, else its seeded initial one."""
        return self._personal(client_id)

    def client_params(self, client_id: int) -> Params:
        """The merged params client `client_id`'s classifier classifies with."""
        return {**self.global_params, **self.personal(client_id)}


def read_run_prompts(cfg: ExperimentConfig, width: int) -> RunPrompts:
    """From the run's checkpoints: the last server round's global params, and per client the personal
    params evaluation classifies with (its newest saved personal state, else its seeded initial one,
    as ClientWorker.state does), read when asked. width: the text encoder's width (never-trained clients)."""
    from fedpgp_ray.checkpoint import CheckpointStore
    from fedpgp_ray.client import PERSONAL_INIT, seeded_generator
    from fedpgp_ray.storage import RunStorage

    store = CheckpointStore(RunStorage(cfg.output_dir).child("checkpoints"))
    saved = store.latest_server()
    if saved is None:
        raise FileNotFoundError(f"no server checkpoint under {store.directory}: the run has not finished a round")
    algorithm = build_algorithm(cfg.algorithm)
    rnd, global_params = int(saved["round"]), dict(saved["global_params"])
    saved_clients: set[int] | None = None

    def personal(cid: int) -> Params:
        nonlocal saved_clients
        if saved_clients is None:  # one listing: clients that never trained have no folder to look into
            saved_clients = set(store.client_ids())
        state = store.load_client(cid, rnd) if cid in saved_clients else None
        return state["personal"] if state is not None else algorithm.init_personal(
            width, seeded_generator(cfg.seed, PERSONAL_INIT, cid))

    clients = cfg.federation.num_clients if algorithm.personal_keys else 0
    return RunPrompts(rnd, global_params, algorithm.global_classifier(global_params), clients,
                      tuple(algorithm.personal_keys), personal)


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


def read_run_config(run_dir: str) -> tuple[ExperimentConfig, dict[str, Any] | None]:
    """(config, results or None) of the run in `run_dir`."""
    from fedpgp_ray.config import config_from_dict
    from fedpgp_ray.rundir import read_saved_config
    from fedpgp_ray.storage import RunStorage

    storage = RunStorage(run_dir)
    if not storage.exists("config.yaml"):
        raise FileNotFoundError(f"{storage.display()} has no config.yaml: pass the output_dir of a run")
    cfg = config_from_dict(read_saved_config(storage), [f"output_dir={run_dir}"])
    results = json.loads(storage.read_text("results.json")) if storage.exists("results.json") else None
    return cfg, results


def classifier_from_run(run_dir: str, client_id: int | None) -> PromptClassifier:
    """The classifier of client `client_id` (None: the global model) of the run in `run_dir`, built
    from its config, checkpoints and results, without MLflow (`fedpgp-ray predict --run`)."""
    cfg, results = read_run_config(run_dir)
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
        if not 0 <= client_id < prompts.num_clients:
            known = f"0..{prompts.num_clients - 1}" if prompts.num_clients else "none (no personal parameters)"
            raise ValueError(f"--client {client_id}: the run's clients are {known}"
                             + ("" if prompts.num_clients else "; leave --client out for the global model"))
        params = prompts.client_params(client_id)
    spec = ClassifierSpec(asdict(cfg.algorithm), backbone_reference(cfg.model, clip, None), base, novel,
                          client_id, prompts.round)
    return PromptClassifier(spec, params, clip)
