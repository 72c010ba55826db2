"""The Ray Serve application of `fedpgp-ray serve`: one frozen CLIP per replica, every client's prompt,
requests of several clients batched into one backbone pass, hot switch to a newly registered version.

Same HTTP interface as `mlflow models serve` (POST /invocations with MLflow's JSON formats, GET /ping,
/health, /version), so clients need no change; answers carry one more column, `prompt` (`personal` or
`global`), and the header `fedpgp-model` (`<name>/<version>` of the MLflow model that answered).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from fedpgp_ray import serving_io
from fedpgp_ray.personal_model import PersonalisedClassifier

log = logging.getLogger("ray.serve")


@dataclass
class Loaded:
    """A classifier and what it is: `models:/<name>/<version>` or a run directory."""
    classifier: PersonalisedClassifier
    label: str
    version: str | None = None


@dataclass
class Source:
    """What to serve: a registered model (`models:/name@alias`, `models:/name/latest`, `models:/name/3`, a
    model id or path) in `tracking_uri`, or a run directory's checkpoints."""
    model_uri: str | None = None
    tracking_uri: str | None = None
    run_dir: str | None = None

    def registered(self) -> tuple[str, str | None, bool] | None:
        """(name, alias or None, follow the newest version) of a models:/ URI naming a registered model."""
        if not self.model_uri or not self.model_uri.startswith("models:/"):
            return None
        rest = self.model_uri[len("models:/"):].strip("/")
        if "@" in rest:
            name, alias = rest.rsplit("@", 1)
            return name, alias, False
        if "/" in rest:
            name, suffix = rest.rsplit("/", 1)
            return (name, None, True) if suffix.lower() == "latest" else (name, None, False)
        return None  # a model id: fixed

    def version_now(self, client: Any) -> str | None:
        """The version the URI names now (None: a fixed model, nothing to follow)."""
        named = self.registered()
        if named is None:
            return None
        name, alias, newest = named
        if alias:
            return str(client.get_model_version_by_alias(name, alias).version)
        if newest:
            return str(max(int(v.version) for v in client.search_model_versions(f"name = '{name}'")))
        return None


def load(source: Source, version: str | None = None) -> Loaded:
    """The classifier `source` names (at `version` when given)."""
    if source.run_dir:
        from fedpgp_ray.personal_model import classifier_from_run_dir

        return Loaded(classifier_from_run_dir(source.run_dir), f"run {source.run_dir}")
    import mlflow

    from fedpgp_ray.personal_model import PersonalisedModel

    uri = source.model_uri
    named = source.registered()
    if version is not None and named is not None:
        uri = f"models:/{named[0]}/{version}"
    if source.tracking_uri:
        mlflow.set_tracking_uri(source.tracking_uri)
    model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    if not isinstance(model, PersonalisedModel):
        raise ValueError(f"{uri} is not a fedpgp-ray personalised model ({type(model).__name__}): serve the run's "
                         f"model (models:/<experiment>-<config>-<dataset>-<algorithm>@newest)")
    label = f"{named[0]}/{version}" if named is not None and version else uri.removeprefix("models:/")
    return Loaded(model.classifier, label, version)


def error_response(err: MlflowException) -> Response:
    message = (err.message.strip().splitlines() or [err.error_code])[0][:500]
    return Response(json.dumps({"error_code": err.error_code, "message": message}),
                    status_code=err.get_http_status_code(), media_type="application/json")


DRAIN_BYTES = 256 * 2**20  # an oversized body is read and dropped up to this, so the client sees the 413


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (TooLarge: 413) past `limit` bytes; the rest of an oversized body is
    read and dropped chunk by chunk (memory stays bounded) so that the client gets the answer."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif chunks:
            chunks = []  # over the limit: keep nothing more
        if size > DRAIN_BYTES:
            break
    if size > limit:
        raise TooLarge(size, limit)
    return b"".join(chunks)


class TooLarge(Exception):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the request body is over {size / 2**20:.1f} MiB, more than the {limit / 2**20:.0f} MiB "
                         f"allowed (fedpgp-ray serve --max-body-mb): send fewer or smaller images per request")


def parse_request(body: bytes, content_type: str | None) -> tuple[list[Any], dict[str, Any]]:
    """(image column, params) of an /invocations body in any of MLflow's JSON formats."""
    from mlflow.pyfunc.scoring_server import _split_data_and_params, infer_and_parse_data

    if (content_type or "application/json").split(";")[0].strip() != "application/json":
        raise serving_io.bad_request(f"content type {content_type!r}: send application/json")
    try:
        text = body.decode("utf-8")
        data, params = _split_data_and_params(text)
        frame = infer_and_parse_data(data)
    except UnicodeDecodeError:
        raise serving_io.bad_request("the body is not UTF-8 JSON") from None
    except MlflowException as err:
        raise serving_io.bad_request((err.message.strip().splitlines() or ["bad request"])[0][:300]) from None
    if isinstance(frame, dict):
        import pandas as pd

        frame = pd.DataFrame(frame)
    if params is not None and not isinstance(params, dict):
        raise serving_io.bad_request("'params' must be a JSON object")
    return serving_io.image_column(frame), params or {}


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
class PromptServer:
    """One replica: one backbone, one personalised model; a poller switches to newly registered versions."""

    def __init__(self, source: Source, max_body_bytes: int, poll_s: float, max_batch_size: int,
                 batch_wait_s: float, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.source = source
        self.max_body_bytes = max_body_bytes
        self.client = None
        version = None
        if source.registered() is not None:
            from mlflow import MlflowClient

            self.client = MlflowClient(source.tracking_uri)
            version = source.version_now(self.client)
        self.current = load(source, version)
        self.classify.set_max_batch_size(max_batch_size)
        self.classify.set_batch_wait_timeout_s(batch_wait_s)
        self.switches = 0
        self._stop = threading.Event()
        if version is not None and poll_s > 0:
            threading.Thread(target=self._follow, args=(poll_s,), daemon=True, name="fedpgp-follow").start()

    def _follow(self, poll_s: float) -> None:
        """Hot update: load the version the alias names now, then swap (requests in flight keep the old)."""
        while not self._stop.wait(poll_s):
            try:
                version = self.source.version_now(self.client)
                if version is not None and version != self.current.version:
                    began = time.perf_counter()
                    self.current = load(self.source, version)
                    self.switches += 1
                    log.info("fedpgp-ray serve: now serving %s (loaded in %.1f s)", self.current.label,
                             time.perf_counter() - began)
            except Exception as err:  # noqa: BLE001 - keep serving the loaded version; retry next poll
                log.warning("fedpgp-ray serve: cannot follow %s (%s); still serving %s", self.source.model_uri,
                            str(err).splitlines()[0][:200] if str(err) else type(err).__name__, self.current.label)

    def __del__(self) -> None:
        self._stop.set()

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if request.method == "GET" and path.endswith(("/ping", "/health")):
            return Response("\n", media_type="application/json")
        if request.method == "GET" and path.endswith("/version"):
            return Response(json.dumps({"model": self.current.label, "clients": self.current.classifier.clients,
                                        "replica_pid": os.getpid(), "switches": self.switches}),
                            media_type="application/json")
        if request.method != "POST" or not path.endswith("/invocations"):
            return Response(json.dumps({"error_code": "ENDPOINT_NOT_FOUND", "message": "POST /invocations"}),
                            status_code=404, media_type="application/json")
        try:
            body = await read_body(request, self.max_body_bytes)
        except TooLarge as err:
            return Response(json.dumps({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": str(err)}),
                            status_code=413, media_type="application/json")
        loaded = self.current  # this request's version, whatever a switch does meanwhile
        try:
            batch, client_id, names = await asyncio.to_thread(self._prepare, loaded, body,
                                                              request.headers.get("content-type"))
            if batch is None:
                probs, prompt = torch.zeros(0, len(names)), "global" if client_id is None else "personal"
            else:
                result = await self.classify((loaded, batch, client_id, names))
                if isinstance(result, MlflowException):
                    raise result
                names, probs, prompt = result
        except MlflowException as err:
            return error_response(err)
        frame = serving_io.result_frame(names, probs, prompt)
        return Response(json.dumps({"predictions": frame.to_dict(orient="records")}),
                        media_type="application/json", headers={"fedpgp-model": loaded.label})

    @staticmethod
    def _prepare(loaded: Loaded, body: bytes, content_type: str | None
                 ) -> tuple[torch.Tensor | None, int | None, list[str]]:
        """Validate a request and preprocess its images (one decoded at a time), before it joins a batch."""
        column, params = parse_request(body, content_type)
        classifier = loaded.classifier
        classes = params.get(serving_io.CLASSES_PARAM)
        client_id, names = classifier.check_request(params.get(serving_io.CLIENT_PARAM), classes)
        if not column:
            return None, client_id, names
        preprocess = classifier.clip.preprocess
        batch = torch.stack([preprocess(serving_io.decode_image(value, f"row {i} of column 'image'"))
                             for i, value in enumerate(column)])
        return batch, client_id, names

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def classify(self, items: list[tuple[Loaded, torch.Tensor, int | None, list[str]]]) -> list[Any]:
        """Requests of any clients: one backbone pass per model version over all their images."""
        return await asyncio.to_thread(classify_items, items)


def classify_items(items: list[tuple[Loaded, torch.Tensor, int | None, list[str]]]) -> list[Any]:
    """Per item, (names, probabilities, prompt) or the MlflowException that item alone caused."""
    results: list[Any] = [None] * len(items)
    by_model: dict[int, list[int]] = {}
    for i, (loaded, *_rest) in enumerate(items):
        by_model.setdefault(id(loaded), []).append(i)
    for indices in by_model.values():
        classifier = items[indices[0]][0].classifier
        batch = torch.cat([items[i][1] for i in indices])
        requests = [(len(items[i][1]), items[i][2], items[i][3]) for i in indices]
        for i, result in zip(indices, classifier.classify(batch, requests, per_request_errors=True)):
            results[i] = result
    return results
