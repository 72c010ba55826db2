"""One personalised model per run: the global prompt and every client's personal factors in one MLflow
model, a request naming its client (see docs/SERVING.md).

Format (the model's artifacts):
  spec.json      ClassifierSpec: algorithm, backbone reference, base/novel class names, round, and
                 `personal`: {"file", "clients": N, "dtype": "float32", "keys": [[name, shape], ...]}
  global.pt      the global prompt tensors (plain tensors, weights_only)
  personal.f32   every client's personal tensors as one float32 matrix [N, R], client c in row c
                 (byte offset c * R * 4), each row the keys of `personal.keys` flattened in order.
                 Memory-mapped on load: a client's row is read when a request first names it, so
                 100,000 clients (FedPGP on the tiny CLIP: 2.5 KiB each) cost nothing until asked.

A request's classifier is the run's evaluation classifier of that client (global prompt + its factors;
FedPGP: sigma + U_c V_c); without a client it is the global prompt alone (`algorithm.global_classifier`).
"""
from __future__ import annotations

import collections
import json
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

from fedpgp_ray.algorithms import Algorithm, FrozenEncoders, Params, build_algorithm
from fedpgp_ray.clip.backbone import FrozenClip
from fedpgp_ray.clip.features import TOKEN_DTYPE
from fedpgp_ray.config import AlgorithmConfig
from fedpgp_ray.serving import ClassifierSpec, load_backbone
from fedpgp_ray.serving_io import (CLASSES_PARAM, CLIENT_PARAM, IMAGE_COLUMN, bad_request, check_classes,
                                   decode_image, image_column, result_frame)

SPEC_ARTIFACT, GLOBAL_ARTIFACT, PERSONAL_ARTIFACT = "spec", "global", "personal"
PERSONAL_FILE = "personal.f32"
MODEL_CODE = Path(__file__).with_name("personal_model_code.py")  # MLflow "model from code": no pickle
PERSONAL, GLOBAL = "personal", "global"                           # which prompt answered
MAX_CACHED_FLOATS = 2**24        # class features cached per (client, class list): 64 MiB at most
MAX_CUSTOM_CLASS_LISTS = 64      # distinct request class lists whose prompt tokens stay cached


def unknown_client(message: str) -> MlflowException:
    """An error answered with HTTP 404 and `message`."""
    return MlflowException(message, error_code=RESOURCE_DOES_NOT_EXIST)


# -- the factor file --------------------------------------------------------------------------------------
def write_factors(path: Path, personal: Iterable[Params], clients: int, keys: Sequence[str]) -> dict[str, Any]:
    """Write `clients` clients' personal tensors (in client order) as one float32 matrix; returns the
    layout recorded in spec.json. Streams: one client in memory at a time."""
    layout: dict[str, Any] = {"file": PERSONAL_FILE, "clients": clients, "dtype": "float32", "keys": []}
    matrix = None
    count = 0
    for cid, params in enumerate(personal):
        if matrix is None:
            layout["keys"] = [[k, list(params[k].shape)] for k in keys]
            record = sum(int(np.prod(shape)) for _, shape in layout["keys"])
            matrix = np.memmap(path, dtype=np.float32, mode="w+", shape=(clients, record))
        matrix[cid] = torch.cat([params[k].detach().float().reshape(-1).cpu() for k in keys]).numpy()
        count += 1
    if count != clients:
        raise ValueError(f"wrote {count} clients' factors, expected {clients}")
    if matrix is None:
        path.write_bytes(b"")
    else:
        matrix.flush()
        del matrix
    return layout


class PersonalFactors:
    """Every client's personal tensors, memory-mapped: `get(c)` reads client c's row."""

    def __init__(self, path: str | Path, layout: dict[str, Any]) -> None:
        self.clients = int(layout["clients"])
        self.keys = [(name, tuple(shape)) for name, shape in layout["keys"]]
        record = sum(int(np.prod(shape)) for _, shape in self.keys)
        self.matrix = (np.memmap(path, dtype=np.float32, mode="r", shape=(self.clients, record))
                       if self.clients and record else None)

    def __contains__(self, client_id: int) -> bool:
        return 0 <= client_id < self.clients

    def get(self, client_id: int) -> Params:
        row = torch.from_numpy(np.array(self.matrix[client_id]))
        out, start = {}, 0
        for name, shape in self.keys:
            size = int(np.prod(shape))
            out[name] = row[start:start + size].reshape(shape)
            start += size
        return out


# -- the classifier ---------------------------------------------------------------------------------------
class PersonalisedClassifier:
    """Classifies for any client of a run, and with the global prompt: exactly each one's evaluation
    `algorithm.logits`. `classify` takes a batch of images of several requests (several clients) and
    runs the backbone once over all of them."""

    def __init__(self, spec: ClassifierSpec, global_params: Params, factors: PersonalFactors,
                 clip: FrozenClip) -> None:
        self.spec = spec
        self.algorithm: Algorithm = build_algorithm(AlgorithmConfig(**spec.algorithm))
        self.clip = clip
        self.encoders = FrozenEncoders(clip, self.algorithm.cfg.n_ctx)
        self.global_params = {k: v.to(clip.device) for k, v in global_params.items()}
        self.global_classifier = self.algorithm.global_classifier(self.global_params)
        self.factors = factors
        self.uses_tokens = bool(getattr(self.algorithm, "uses_patch_tokens", False))
        self.pooled = type(self.algorithm).logits is Algorithm.logits
        self._features: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
        self._cached_floats = 0
        self._custom: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()

    @property
    def classnames(self) -> list[str]:
        return list(self.spec.classnames)

    @property
    def clients(self) -> int:
        return self.factors.clients

    def check_request(self, client_id: Any, classes: Sequence[str] | None) -> tuple[int | None, list[str]]:
        """(client id or None, class names) of a request, validated: bad values raise 400, an unknown client 404."""
        names = check_classes(classes, self.spec.classnames)
        if client_id is None:
            if self.global_classifier is None:
                raise bad_request(f"algorithm {self.algorithm.name} has no global classifier (its classifier needs "
                                  f"personal parameters): name a client with params {{\"{CLIENT_PARAM}\": ID}}, "
                                  f"0..{self.clients - 1}")
            return None, names
        if isinstance(client_id, bool) or not isinstance(client_id, (int, np.integer)):
            raise bad_request(f"'{CLIENT_PARAM}' must be an integer client id, got {str(client_id)[:40]!r}")
        client_id = int(client_id)
        if client_id not in self.factors:
            known = f"0..{self.clients - 1}" if self.clients else "none (the algorithm has no personal parameters)"
            raise unknown_client(f"client {client_id} is not in this model (its clients: {known}); leave "
                                 f"'{CLIENT_PARAM}' out for the global prompt")
        return client_id, names

    def params_of(self, client_id: int | None) -> tuple[Params, str]:
        if client_id is None:
            return self.global_classifier, GLOBAL
        personal = {k: v.to(self.clip.device) for k, v in self.factors.get(client_id).items()}
        return {**self.global_params, **personal}, PERSONAL

    @torch.inference_mode()
    def classify(self, batch: torch.Tensor, requests: Sequence[tuple[int, int | None, list[str]]],
                 per_request_errors: bool = False) -> list[Any]:
        """For preprocessed images `batch` of several requests, each (image count, client id or None, class
        names) as check_request returned them: [(names, probabilities, prompt)] per request, in order.
        per_request_errors: a request's own bad input (a class name too long for the text encoder) is
        returned in its place as an MlflowException instead of failing the others."""
        with self._lock:
            features, extra = self.encode(batch)
            return self.classify_features(features, extra, requests, per_request_errors)

    def encode(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(image features, extra inputs of the algorithm's logits) of a preprocessed batch: one backbone pass."""
        if self.uses_tokens:  # FedOTP: evaluation reads the tokens from the float16 feature cache
            features, tokens = self.clip.encode_image_tokens(batch)
            return features, {"patch_tokens": tokens.to(TOKEN_DTYPE).float()}
        return self.clip.encode_images(batch), {}

    @torch.inference_mode()
    def classify_features(self, features: torch.Tensor, extra: dict[str, torch.Tensor],
                          requests: Sequence[tuple[int, int | None, list[str]]],
                          per_request_errors: bool = False) -> list[Any]:
        """`classify` from the backbone's output (`encode`)."""
        out, start = [], 0
        for count, client_id, names in requests:
            params, prompt = self.params_of(client_id)
            part = features[start:start + count]
            mine = {k: v[start:start + count] for k, v in extra.items()}
            self._bound_prompt_cache(names)
            try:
                with self.clip.autocast():
                    if self.pooled:
                        logits = self.clip.logit_scale * part @ self._class_features(client_id, params, names).t()
                    else:
                        logits = self.algorithm.logits(self.encoders, params, part, names, **mine)
            except ValueError as err:  # a class name too long for the text encoder's context
                start += count
                if not per_request_errors:
                    raise bad_request(f"'{CLASSES_PARAM}': {err}") from None
                out.append(bad_request(f"'{CLASSES_PARAM}': {err}"))
                continue
            out.append((names, logits.float().softmax(dim=-1).cpu(), prompt))
            start += count
        return out

    def _class_features(self, client_id: int | None, params: Params, names: list[str]) -> torch.Tensor:
        """Class features per (client, class list), least recently used dropped past MAX_CACHED_FLOATS."""
        key = (client_id, tuple(names))
        if key in self._features:
            self._features.move_to_end(key)
            return self._features[key]
        value = self.algorithm.class_features(self.encoders, params, names)
        self._features[key] = value
        self._cached_floats += value.numel()
        while self._cached_floats > MAX_CACHED_FLOATS and len(self._features) > 1:
            _, dropped = self._features.popitem(last=False)
            self._cached_floats -= dropped.numel()
        return value

    def _bound_prompt_cache(self, names: list[str]) -> None:
        """Prompt tokens are cached per class list: start afresh after many per-request lists."""
        key = tuple(names)
        if key != tuple(self.spec.classnames) and key not in self._custom:
            if len(self._custom) >= MAX_CUSTOM_CLASS_LISTS:
                self.encoders = FrozenEncoders(self.clip, self.algorithm.cfg.n_ctx)
                self._features.clear()
                self._cached_floats = 0
                self._custom.clear()
            self._custom.add(key)


def load_classifier(spec_file: str | Path, global_file: str | Path, personal_file: str | Path,
                    device: str | torch.device | None = None) -> PersonalisedClassifier:
    spec = ClassifierSpec.from_dict(json.loads(Path(spec_file).read_text()))
    global_params = torch.load(global_file, weights_only=True, map_location="cpu")
    factors = PersonalFactors(personal_file, spec.personal or {"clients": 0, "keys": []})
    return PersonalisedClassifier(spec, global_params, factors, load_backbone(spec.backbone, device))


class RunFactors:
    """A run directory's personal factors, read from its checkpoints when a client is first asked for."""

    def __init__(self, prompts: Any) -> None:
        self.prompts = prompts
        self.clients = prompts.num_clients

    def __contains__(self, client_id: int) -> bool:
        return 0 <= client_id < self.clients

    def get(self, client_id: int) -> Params:
        return self.prompts.personal(client_id)


def classifier_from_run_dir(run_dir: str) -> PersonalisedClassifier:
    """The personalised classifier of a run directory (config, checkpoints, results), without MLflow."""
    from fedpgp_ray.serving import backbone_reference, read_run_config, read_run_prompts, run_classnames

    cfg, results = read_run_config(run_dir)
    clip = load_backbone_for(cfg)
    prompts = read_run_prompts(cfg, FrozenEncoders(clip, cfg.algorithm.n_ctx).width)
    base, novel = run_classnames(cfg, results)
    spec = ClassifierSpec(asdict(cfg.algorithm), backbone_reference(cfg.model, clip, None), base, novel, None,
                          prompts.round)
    return PersonalisedClassifier(spec, prompts.global_params, RunFactors(prompts), clip)


def load_backbone_for(cfg: Any) -> FrozenClip:
    from fedpgp_ray.clip.backbone import load_clip

    return load_clip(cfg.model, "cpu" if cfg.model.device == "auto" and not torch.cuda.is_available() else None)


# -- the MLflow pyfunc model ------------------------------------------------------------------------------
class PersonalisedModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of PersonalisedClassifier. Params: `client_id` (none: the global prompt), `classes`."""

    def __init__(self, classifier: PersonalisedClassifier | None = None) -> None:
        self.classifier = classifier

    def load_context(self, context: Any) -> None:
        art = context.artifacts
        self.classifier = load_classifier(art[SPEC_ARTIFACT], art[GLOBAL_ARTIFACT], art[PERSONAL_ARTIFACT])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        column = image_column(model_input)
        params = params or {}
        classes = params.get(CLASSES_PARAM)
        if classes is not None and list(classes) == self.classifier.classnames:
            classes = None  # the signature's default: the model's own classes
        client_id, names = self.classifier.check_request(params.get(CLIENT_PARAM), classes)
        if not column:
            return result_frame(names, torch.zeros(0, len(names)))
        preprocess = self.classifier.clip.preprocess  # one image decoded at a time: bounded memory
        batch = torch.stack([preprocess(decode_image(value, f"row {i} of column '{IMAGE_COLUMN}'"))
                             for i, value in enumerate(column)])
        [(names, probs, prompt)] = self.classifier.classify(batch, [(len(column), client_id, names)])
        return result_frame(names, probs, prompt)


def signature(classnames: list[str]) -> ModelSignature:
    """Input column `image`; output label, probability, probabilities, prompt; params classes, client_id."""
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, IMAGE_COLUMN)]),
        outputs=Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.double, "probability"),
                        ColSpec(Array(DataType.double), "probabilities"), ColSpec(DataType.string, "prompt")]),
        params=ParamSchema([ParamSpec(CLASSES_PARAM, DataType.string, list(classnames), shape=(-1,)),
                            ParamSpec(CLIENT_PARAM, DataType.long, None)]))
