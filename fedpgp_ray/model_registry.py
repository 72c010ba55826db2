"""Logging and registering a run's classifiers at its end (MLflow 3 LoggedModels and the Model Registry).

Per run, by default ONE model: the personalised model (fedpgp_ray/personal_model.py: the global
prompt and every client's personal factors), registered as `<experiment>-<config>-<dataset>-<algorithm>`
so that tasks never share a registered name. With `tracking.log_client_models: true`, also one
model per client (`<that name>-client-<id>`) and the global one (`<that name>-global`): O(clients)
registry writes, for small federations.

Each model: a LoggedModel linked to the run, with that model's metrics only (the run's final
aggregates for the personalised and global models, the client's own for a client model), tags
(algorithm, round, dataset, config, clients, epsilon when DP), a description; each registered
version gets the aliases `newest` and `round-<N>` (moved from older versions). MLflow reserves the
alias name `latest`; `models:/<name>/latest` is its built-in name of the highest version, the same
version as `@newest` here.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shlex
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import torch

from fedpgp_ray import personal_model, serving
from fedpgp_ray.algorithms import FrozenEncoders
from fedpgp_ray.clip.backbone import load_clip
from fedpgp_ray.config import ExperimentConfig, ModelConfig
from fedpgp_ray.serving_io import CLIENT_PARAM

log = logging.getLogger(__name__)

BACKBONE_ARTIFACT_DIR = "backbone"     # run artifact folder of a local backbone checkpoint
NEWEST_ALIAS = "newest"                # moved to each newly registered version
ROUND_ALIAS = "round-{}"


def task_name(cfg: ExperimentConfig, experiment: str) -> str:
    """The registered-model prefix of a run's task: `<experiment>-<config>-<dataset>-<algorithm>`, with
    characters outside [A-Za-z0-9_.-] as '-' (config: the config file's stem, `custom` without one)."""
    config = Path(cfg.tracking.config_file).stem if cfg.tracking.config_file else "custom"
    return registered_name(experiment, f"{config}-{cfg.data.dataset}-{cfg.algorithm.name}")


def registered_name(experiment: str, model: str) -> str:
    """`<experiment>-<model>` with characters outside [A-Za-z0-9_.-] as '-'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{experiment}-{model}").strip("-")


def pip_requirements() -> list[str]:
    """What serving needs; fedpgp-ray itself is not on PyPI: serve with `--env-manager local`."""
    import open_clip
    import torchvision

    from fedpgp_ray import __version__

    return [f"fedpgp-ray=={__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"torchvision=={torchvision.__version__.split('+')[0]}", f"open_clip_torch=={open_clip.__version__}",
            f"mlflow=={mlflow.__version__}", "pandas", "pillow"]


def _final_metrics(results: dict[str, Any] | None, client_id: int | None) -> dict[str, float]:
    """The model's own metrics: the run's final aggregates, or one client's final figures."""
    results = results or {}
    values = results.get("final") if client_id is None else (results.get("final_clients") or {}).get(str(client_id))
    return {k: float(v) for k, v in (values or {}).items() if isinstance(v, (int, float)) and v == v}


def _tags(cfg: ExperimentConfig, rnd: int, results: dict[str, Any] | None, **extra: str) -> dict[str, str]:
    tags = {"algorithm": cfg.algorithm.name, "round": str(rnd), "dataset": cfg.data.dataset,
            "config": cfg.tracking.config_file or "custom", **extra}
    privacy = (results or {}).get("privacy")
    if privacy:
        tags["epsilon"] = "inf" if privacy.get("epsilon") is None else f"{privacy['epsilon']:.4g}"
        tags["delta"] = f"{privacy.get('delta', cfg.privacy.target_delta):g}"
    return tags


def log_run_models(cfg: ExperimentConfig, client: Any, run_id: str, tracking_uri: str,
                   results: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Log and register the run's models (see the module doc). Models already logged for this run and
    round (a resumed, finished run) are not logged again. Returns one dict per registered model
    (name, version, uri, bytes, seconds)."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    began = time.perf_counter()
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id).name
    prefix = task_name(cfg, experiment)
    clip = load_clip(cfg.model, "cpu")
    prompts = serving.read_run_prompts(cfg, FrozenEncoders(clip, cfg.algorithm.n_ctx).width)
    base, novel = serving.run_classnames(cfg, results)
    done = {m.name for m in client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND tags.round = '{prompts.round}'")}
    logged = []
    with _fluent_store(tracking_uri), _quiet_mlflow(), tempfile.TemporaryDirectory(prefix="fedpgp-") as tmp:
        weights_uri = _log_backbone_once(cfg.model, client, run_id, run.info.artifact_uri)
        backbone = serving.backbone_reference(cfg.model, clip, weights_uri)

        def log_one(name: str, registered: str, code: Path, artifacts: dict[str, str], sig: Any,
                    tags: dict[str, str], metrics: dict[str, float], description: str,
                    example: Any = None) -> None:
            model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id, tags=tags)
            # run_id=None: given a run, Model.log would copy every run metric of the step onto the model
            # (one query per metric name: O(clients)); the model gets its own metrics and output link below.
            info = Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=None,
                             model_id=model.model_id, python_model=str(code), artifacts=artifacts, signature=sig,
                             input_example=serving.example_input() if example is None else example,
                             pip_requirements=pip_requirements())
            client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=prompts.round)])
            _log_model_metrics(client, run_id, model.model_id, metrics, prompts.round)
            version = _register(client, info.model_uri, registered, tags, description, prompts.round)
            logged.append({"name": version.name, "version": version.version, "uri": info.model_uri,
                           "bytes": _model_bytes(client, info.model_id)})

        if "personal" not in done:
            folder = Path(tmp) / "personal"
            folder.mkdir()
            layout = personal_model.write_factors(folder / personal_model.PERSONAL_FILE,
                                                  (prompts.personal(c) for c in range(prompts.num_clients)),
                                                  prompts.num_clients, prompts.personal_keys)
            spec = serving.ClassifierSpec(asdict(cfg.algorithm), backbone, base, novel, None, prompts.round, layout)
            (folder / "spec.json").write_text(json.dumps(asdict(spec), indent=1))
            torch.save({k: v.detach().cpu().contiguous() for k, v in prompts.global_params.items()},
                       folder / "global.pt")
            what = (f"the global prompt and the personal factors of {prompts.num_clients} clients"
                    if prompts.num_clients else "the global prompt (the algorithm has no personal parameters)")
            log_one("personal", prefix, personal_model.MODEL_CODE,
                    {personal_model.SPEC_ARTIFACT: str(folder / "spec.json"),
                     personal_model.GLOBAL_ARTIFACT: str(folder / "global.pt"),
                     personal_model.PERSONAL_ARTIFACT: str(folder / personal_model.PERSONAL_FILE)},
                    personal_model.signature(base),
                    _tags(cfg, prompts.round, results, clients=str(prompts.num_clients)),
                    _final_metrics(results, None),
                    f"{cfg.algorithm.name} on {cfg.data.dataset} ({cfg.tracking.config_file or 'custom config'}), "
                    f"round {prompts.round}: {what}. Request params: client_id (none: the global prompt), "
                    f"classes (any class names). Backbone {cfg.model.name} referenced, not copied.",
                    # without a global classifier (Local) a request must name a client: so must the example
                    None if prompts.global_classifier is not None or not prompts.num_clients else
                    (serving.example_input(), {CLIENT_PARAM: 0}))
        if cfg.tracking.log_client_models:  # opt-in: one registered model per client, O(clients) writes
            wanted = {f"client-{cid}": cid for cid in range(prompts.num_clients)}
            if prompts.global_classifier is not None:
                wanted["global"] = None
            for name, cid in wanted.items():
                if name in done:
                    continue
                params = prompts.global_classifier if cid is None else prompts.client_params(cid)
                spec = serving.ClassifierSpec(asdict(cfg.algorithm), backbone, base, novel, cid, prompts.round)
                (Path(tmp) / name).mkdir()
                prompt_file, spec_file = Path(tmp) / name / "prompt.pt", Path(tmp) / name / "spec.json"
                torch.save({k: v.detach().cpu().contiguous() for k, v in params.items()}, prompt_file)
                spec_file.write_text(json.dumps(asdict(spec), indent=1))
                who = "the global prompt alone" if cid is None else f"client {cid}'s personalised prompt"
                log_one(name, f"{prefix}-{name}", serving.MODEL_CODE,
                        {serving.PROMPT_ARTIFACT: str(prompt_file), serving.SPEC_ARTIFACT: str(spec_file)},
                        serving.signature(base),
                        _tags(cfg, prompts.round, results, client="global" if cid is None else str(cid)),
                        _final_metrics(results, cid),
                        f"{cfg.algorithm.name} on {cfg.data.dataset}, round {prompts.round}: {who}.")
    seconds = time.perf_counter() - began
    for item in logged:
        item["seconds"] = seconds
    if logged:
        log.info("MLflow: logged %d models in %.1f s", len(logged), seconds)
    return logged


MODEL_METRIC_PREFIX = "final/"  # a logged model's metrics: final/local, final/hm3, ...


def _log_model_metrics(client: Any, run_id: str, model_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    # Points linked to a model also land in the run's history: under their own keys they never repeat
    # the run's per-round series at the last step.
    points = [Metric(f"{MODEL_METRIC_PREFIX}{k}", v, stamp, step, model_id=model_id) for k, v in metrics.items()]
    if points:
        client.log_batch(run_id, metrics=points)


def _register(client: Any, model_uri: str, name: str, tags: dict[str, str], description: str, rnd: int) -> Any:
    """Register a logged model as a new version of `name`; move the aliases `newest` and `round-<rnd>` to it."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="fedpgp-ray: " + description.split(":")[0])
    with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints two lines per registration
        version = mlflow.register_model(model_uri, name, tags=tags)
    client.update_model_version(name, version.version, description=description)
    for alias in (NEWEST_ALIAS, ROUND_ALIAS.format(rnd)):
        client.set_registered_model_alias(name, alias, version.version)
    return version


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
    if not serving.is_local_checkpoint(cfg):
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
    """What was registered, in how long, and the commands that predict with and serve the run's model."""
    first = models[0]
    uri = f"models:/{first['name']}@{NEWEST_ALIAS}"
    store = shlex.quote(tracking_uri)
    lines = [f"MLflow models: {first['name']} v{first['version']} ({first['bytes'] / 1024:.1f} KiB, backbone "
             f"referenced; aliases @{NEWEST_ALIAS}, @{ROUND_ALIAS.format('N')}), registered in "
             f"{first['seconds']:.1f} s"]
    if len(models) > 1:
        lines.append(f"  and {len(models) - 1} more: " + ", ".join(f"{m['name']} v{m['version']}" for m in models[1:4])
                     + (" ..." if len(models) > 4 else ""))
    lines += [f"  predict: fedpgp-ray predict --model {uri} --tracking-uri {store} [--client ID] IMAGE...",
              f"  serve:   fedpgp-ray serve --model {uri} --tracking-uri {store}   "
              f"# requests: params {{\"client_id\": ID}}"]
    return "\n".join(lines)
