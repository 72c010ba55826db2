"""MLflow tracking from the driver: one run per experiment, one batched write per round.

Only the driver writes (client actors return metrics in RoundReports; this module sees those
and nothing else), so it works the same with every runtime. It is the only module of the
package that imports mlflow, and only once tracking is on (`tracking.mlflow: true`).

Store (first that applies): $MLFLOW_TRACKING_URI, `tracking.uri`, on resume the store the run
was logged to, else `sqlite:///<output_dir>/mlflow.db` with artifacts in `<output_dir>/mlartifacts`.
Run: $MLFLOW_RUN_ID (how `mlflow run` hands its run over), on `--resume` the run saved in
`<output_dir>/mlflow_run.json`, else a new run in $MLFLOW_EXPERIMENT_ID / $MLFLOW_EXPERIMENT_NAME
or `tracking.experiment`. The store is checked at start-up: an unreachable server or an unusable
store raises `TrackingError` (one line) before any training. See docs/TRACKING.md.

Also the MLflow Projects entry point: `python -m fedpgp_ray.tracking --config ... --rounds ...`
(mlflow_projects/fedpgp/MLproject) maps project parameters onto `fedpgp-ray run`.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import ssl
import urllib.error
import urllib.parse
import urllib.request
import weakref
from pathlib import Path
from typing import Any

import yaml

from fedpgp_ray.checkpoint import CheckpointStore, atomic_save
from fedpgp_ray.config import ExperimentConfig, config_to_dict, flatten

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"        # in output_dir: run id, experiment id and store of the run
DB_FILE = "mlflow.db"               # default store, in output_dir
ARTIFACT_DIR = "mlartifacts"        # artifacts of experiments created in a SQLite store, beside the DB
PARAM_PREFIX = "cfg."               # config params never clash with `mlflow run -P` params
STEP_MARKER = "round_seconds"       # logged last for every round: its steps are the rounds logged
MAX_METRICS_PER_CALL = 1000         # MLflow's log_batch limits
MAX_PARAMS_PER_CALL = 100
MAX_PARAM_LENGTH = 6000
PROBE_TIMEOUT_S = 5.0

# MLFLOW_RUN_ID -> output_dir of the experiment of this process that logs into it. A second
# experiment in the same process (`--algorithms a,b` under `mlflow run`) gets a child run.
_CLAIMED: dict[str, str] = {}
# Set by `fedpgp-ray compare` (`parent_run`): experiments started meanwhile become child runs of it.
_PARENT_RUNS: list[str] = []


@contextlib.contextmanager
def parent_run(run_id: str):
    """Within this block every new experiment run is a child run of `run_id` (`fedpgp-ray compare`)."""
    _PARENT_RUNS.append(run_id)
    try:
        yield
    finally:
        _PARENT_RUNS.pop()


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, unknown run, refused store)."""


# -- store and run resolution ------------------------------------------------------------------------
def default_tracking_uri(output_dir: str | Path) -> str:
    """`sqlite:////abs/output_dir/mlflow.db` (absolute SQLite URIs have four slashes)."""
    return "sqlite:///" + str((Path(output_dir) / DB_FILE).resolve())


def _normalize_uri(uri: str) -> str:
    """Make a relative SQLite path absolute (against the CWD); refuse plain file stores up front."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path, _, query = uri[len("sqlite:///"):].partition("?")
        if path and path != ":memory:":
            if "_ray_pkg_" in os.getcwd():
                raise TrackingError(f"tracking URI {uri} is relative, and under `ray job submit` the working "
                                    f"directory is a temporary copy: pass an absolute URI "
                                    f"(sqlite:////abs/path/mlflow.db or http://host:port) in runtime_env")
            uri = "sqlite:///" + str(Path(path).resolve()) + (f"?{query}" if query else "")
    scheme = urllib.parse.urlparse(uri).scheme
    is_file = scheme in ("", "file") or len(scheme) == 1  # a bare path, file:, or a Windows drive
    if is_file and not uri.startswith("databricks") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise TrackingError(f"tracking URI {uri!r} is a file store, which MLflow 3 refuses: use "
                            f"sqlite:////abs/path/mlflow.db or an http:// tracking server")
    return uri


def resolve_tracking_uri(cfg: ExperimentConfig, saved: dict[str, Any] | None = None) -> str:
    """$MLFLOW_TRACKING_URI, else tracking.uri, else the saved run's store, else the SQLite default."""
    uri = (os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or (saved or {}).get("tracking_uri")
           or default_tracking_uri(cfg.output_dir))
    return _normalize_uri(uri)


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast (TrackingError) if an http(s) tracking server does not answer within `timeout` s.

    MLflow's own client retries for minutes before giving up; this probe takes seconds.
    """
    if not uri.startswith(("http://", "https://")):
        return
    context = None
    if uri.startswith("https://"):  # the same TLS settings MLflow's client uses
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            context = ssl._create_unverified_context()
        elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            context = ssl.create_default_context(cafile=os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"])
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout, context=context).close()
    except urllib.error.HTTPError:
        return  # it answered (an auth proxy, an old server without /health): reachable
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(f"MLflow tracking server {uri} cannot be reached ({reason}): start it, fix "
                            f"MLFLOW_TRACKING_URI / tracking.uri, or turn tracking off with "
                            f"--set tracking.mlflow=false") from None


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def git_commit(path: Path | None = None) -> tuple[str, bool] | None:
    """(commit, dirty) of the git checkout holding the package, or None (not a checkout, no git)."""
    here = str(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit, bool(status)) if commit else None


def _param_value(value: Any) -> str:
    text = "null" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:MAX_PARAM_LENGTH]


def config_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The resolved config, flattened, as MLflow params: `cfg.train.rounds` -> "25"."""
    return {PARAM_PREFIX + k: _param_value(v) for k, v in flatten(config_to_dict(cfg)).items()}


def round_metrics(round_report: dict[str, Any] | Any) -> dict[str, float]:
    """A round's metrics as MLflow keys: aggregates as they are, per client under `client/<id>/<key>`.

    Non-finite values (NaN: a metric without data) are left out. `round_seconds` comes last.
    """
    if not isinstance(round_report, dict):
        round_report = {"metrics": round_report.metrics, "clients": round_report.clients}
    out: dict[str, float] = {}
    for cid, metrics in sorted(round_report.get("clients", {}).items(), key=lambda item: int(item[0])):
        for key, value in metrics.items():
            out[f"client/{cid}/{key}"] = value
    marker = None
    for key, value in round_report.get("metrics", {}).items():
        if key == STEP_MARKER:
            marker = value
        else:
            out[key] = value
    if marker is not None:
        out[STEP_MARKER] = marker
    return {k: float(v) for k, v in out.items() if _finite(v)}


def _finite(value: Any) -> bool:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return False
    return value == value and value not in (float("inf"), float("-inf"))


def _read_saved(output_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((output_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


# -- the listener ---------------------------------------------------------------------------------------
class MlflowTracker:
    """Logs one experiment into one MLflow run, from the driver (a run.LISTENER_FACTORIES listener).

    on_round: one `log_batch` (split at 1000 metrics) with step=round, plus the server checkpoint
    every `tracking.checkpoint_every` rounds and at the last round. on_end: results JSON, tables,
    figures and final client states as artifacts, then the run is marked FINISHED. Rounds already
    in the run (resume) are never logged twice. A write that fails mid-run is kept and retried at
    the next round (training never stops for tracking); only start-up errors are fatal.
    """

    def __init__(self, cfg: ExperimentConfig, client: Any, run: Any, uri: str, logged_steps: set[int]) -> None:
        from fedpgp_ray.federation import num_rounds

        self.cfg = cfg
        self.client = client
        self.run_id: str = run.info.run_id
        self.run_name: str = run.info.run_name
        self.experiment_id: str = run.info.experiment_id
        self.artifact_uri: str = run.info.artifact_uri
        self.uri = uri
        self.output_dir = Path(cfg.output_dir)
        self.last_round = num_rounds(cfg)
        self.logged_steps = set(logged_steps)
        self.pending: list[list[Any]] = []     # metric chunks not yet written
        self.seconds: dict[int, float] = {}    # time spent in on_round, per round
        self.end_seconds = 0.0
        self.finished = False

    # Listener protocol ------------------------------------------------------------------------------
    def on_round(self, report: Any, global_params: Any) -> None:
        began = time.perf_counter()
        if report.round in self.logged_steps:
            return
        self.queue_round(report.round, round_metrics(report))
        self.flush()
        if report.round == self.last_round or (report.round > 0 and report.round % self.cfg.tracking.checkpoint_every == 0):
            self._log_server_checkpoint(report.round, global_params)
        self.logged_steps.add(report.round)
        self.seconds[report.round] = time.perf_counter() - began

    def on_end(self, results: dict[str, Any]) -> None:
        began = time.perf_counter()
        self.flush()
        with tempfile.TemporaryDirectory(prefix="fedpgp-mlflow-") as tmp:
            stage = Path(tmp)
            try:
                self._stage_artifacts(results, stage)
                self.client.log_artifacts(self.run_id, str(stage))
            except Exception as err:  # noqa: BLE001 - results are on disk already; never lose them to tracking
                log.warning("MLflow: could not log the final artifacts (%s); they are in %s",
                            _one_line(err), self.output_dir)
        self.end_seconds = time.perf_counter() - began
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        overhead = [Metric("tracking_seconds", s, stamp, r) for r, s in sorted(self.seconds.items())]
        if self.seconds:  # rounds ran in this session (a resume of a finished run logs none twice)
            overhead.append(Metric("tracking_end_seconds", self.end_seconds, stamp, self.last_round))
        for begin in range(0, len(overhead), MAX_METRICS_PER_CALL):
            self.pending.append(overhead[begin:begin + MAX_METRICS_PER_CALL])
        self.flush()
        if self.pending:
            log.warning("MLflow: %d metric points could not be written to %s",
                        sum(len(c) for c in self.pending), self.uri)
        try:
            self.client.set_terminated(self.run_id, "FINISHED")
        except Exception as err:  # noqa: BLE001
            log.warning("MLflow: could not mark run %s finished (%s)", self.run_id, _one_line(err))
        self.finished = True
        print(self.summary(), flush=True)

    # Writing ----------------------------------------------------------------------------------------
    def queue_round(self, rnd: int, metrics: dict[str, float]) -> None:
        """Queue one round's metrics at step=rnd, in chunks of at most 1000 (the marker in the last)."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        points = [Metric(key, value, stamp, rnd) for key, value in metrics.items()]
        for begin in range(0, len(points), MAX_METRICS_PER_CALL):
            self.pending.append(points[begin:begin + MAX_METRICS_PER_CALL])

    def flush(self) -> None:
        """Write the queued chunks in order; on an error keep the rest for the next flush."""
        while self.pending:
            try:
                self.client.log_batch(self.run_id, metrics=self.pending[0])
            except Exception as err:  # noqa: BLE001 - a store hiccup must not stop training
                log.warning("MLflow: logging to %s failed (%s); %d batch(es) kept for retry",
                            self.uri, _one_line(err), len(self.pending))
                return
            self.pending.pop(0)

    def _log_server_checkpoint(self, rnd: int, global_params: Any) -> None:
        path = self.output_dir / "checkpoints" / "server" / f"round_{rnd}.pt"
        try:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path), "checkpoints/server")
                return
            with tempfile.TemporaryDirectory(prefix="fedpgp-mlflow-") as tmp:  # server elsewhere: save sigma
                fallback = Path(tmp) / path.name
                atomic_save({"round": rnd, "global_params": global_params}, fallback)
                self.client.log_artifact(self.run_id, str(fallback), "checkpoints/server")
        except Exception as err:  # noqa: BLE001
            log.warning("MLflow: could not log the round-%d checkpoint (%s)", rnd, _one_line(err))

    def _stage_artifacts(self, results: dict[str, Any], stage: Path) -> None:
        """Lay out the end-of-run artifacts in `stage` (logged with one call)."""
        from fedpgp_ray import plots

        (stage / "results").mkdir()
        (stage / "results" / "results.json").write_text(json.dumps(results, indent=2))
        plots.write_results_tables(results, stage / "results")
        plots.write_figures(results, stage / "figures")
        clients = self.output_dir / "checkpoints" / "clients"
        for folder in sorted(clients.iterdir() if clients.is_dir() else [], key=lambda p: p.name):
            files = sorted(folder.glob("round_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
            if files:  # the newest state: the client's final personal adapters (and optimizer state)
                target = stage / "checkpoints" / "clients" / folder.name
                target.mkdir(parents=True)
                shutil.copy2(files[-1], target / files[-1].name)

    # Reporting --------------------------------------------------------------------------------------
    def ui_command(self) -> str:
        """The command that opens this store in the MLflow UI (SQLite), or the run's URL (server)."""
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        here = Path(sys.executable).parent / "mlflow"
        on_path = shutil.which("mlflow")
        exe = "mlflow" if on_path and Path(on_path).resolve() == here.resolve() or not here.exists() else str(here)
        if exe != "mlflow" and here.is_relative_to(Path.cwd()):
            exe = str(here.relative_to(Path.cwd()))
        return f"{exe} ui --backend-store-uri {shlex.quote(self.uri)}"

    def summary(self) -> str:
        rounds = len(self.seconds)
        mean = sum(self.seconds.values()) / rounds if rounds else 0.0
        lines = [f"MLflow: run {self.run_name} ({self.run_id}), experiment id {self.experiment_id}",
                 f"  store:     {self.uri}",
                 f"  artifacts: {self.artifact_uri}",
                 f"  tracking overhead: {mean:.3f} s/round over {rounds} round(s), {self.end_seconds:.2f} s at the end"]
        if self.uri.startswith(("http://", "https://")):
            lines.append(f"  open:      {self.ui_command()}")
        else:
            lines.append(f"  open:      {self.ui_command()}   # then http://127.0.0.1:5000"
                         f"/#/experiments/{self.experiment_id}/runs/{self.run_id}")
        return "\n".join(lines)


# -- start-up --------------------------------------------------------------------------------------------
def _experiment_id(client: Any, cfg: ExperimentConfig, uri: str) -> str:
    """$MLFLOW_EXPERIMENT_ID, else the experiment named $MLFLOW_EXPERIMENT_NAME or tracking.experiment
    (created if missing; in a SQLite store its artifacts go beside the database)."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return client.get_experiment(os.environ["MLFLOW_EXPERIMENT_ID"]).experiment_id
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.tracking.experiment
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage != "active":
            raise TrackingError(f"MLflow experiment {name!r} is deleted in {uri}: restore it "
                                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) "
                                f"or set tracking.experiment to another name")
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:////"):
        db = Path(uri[len("sqlite:///"):].partition("?")[0])
        location = (db.parent / ARTIFACT_DIR).as_uri()
    return client.create_experiment(name, artifact_location=location)


def _open_run(client: Any, cfg: ExperimentConfig, resume: bool, saved: dict[str, Any] | None, uri: str
              ) -> tuple[Any, bool]:
    """(run, reused): the run to log into and whether it existed before this start."""
    out = str(Path(cfg.output_dir))
    env_run = os.environ.get("MLFLOW_RUN_ID")
    if _PARENT_RUNS:  # `fedpgp-ray compare`: a child of the comparison's run, named <algorithm>-<seed dir>
        parent = _get_run(client, _PARENT_RUNS[-1], uri, "the comparison's parent run")
        return client.create_run(parent.info.experiment_id, run_name=f"{Path(out).parent.name}-{Path(out).name}",
                                 tags={"mlflow.parentRunId": parent.info.run_id}), False
    if env_run and _CLAIMED.setdefault(env_run, out) == out:
        return _get_run(client, env_run, uri, "MLFLOW_RUN_ID"), True
    if resume and saved and saved.get("run_id") and not env_run:
        origin = f"saved in {Path(out) / RUN_FILE}, logged to {saved.get('tracking_uri')}"
        return _get_run(client, saved["run_id"], uri, origin), True
    tags = {}
    if env_run:  # a further experiment of this process under `mlflow run`: a child of its run
        parent = _get_run(client, env_run, uri, "MLFLOW_RUN_ID")
        experiment_id, tags["mlflow.parentRunId"] = parent.info.experiment_id, env_run
    else:
        experiment_id = _experiment_id(client, cfg, uri)
    name = f"{cfg.algorithm.name}-{Path(out).name}"
    return client.create_run(experiment_id, run_name=name, tags=tags), False


def _get_run(client: Any, run_id: str, uri: str, origin: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage != "active":
        raise TrackingError(f"MLflow run {run_id} ({origin}) is not in the store {uri}: point "
                            f"MLFLOW_TRACKING_URI at the store it was created in, or start a new run")
    return run


def start_tracker(cfg: ExperimentConfig, resume: bool = False) -> MlflowTracker:
    """Resolve store and run, check them, log params / tags / config, and return the listener.

    Raises TrackingError (one line) when the store or the run cannot be used: before any training.
    """
    out = Path(cfg.output_dir)
    saved = _read_saved(out) if resume else None
    uri = resolve_tracking_uri(cfg, saved)
    check_reachable(uri)
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        run, reused = _open_run(client, cfg, resume, saved, uri)
        run_id = run.info.run_id
        logged = {m.step for m in client.get_metric_history(run_id, STEP_MARKER)} if reused else set()
        _log_params_and_tags(client, run, cfg)
        client.log_text(run_id, yaml.safe_dump(config_to_dict(cfg), sort_keys=False), "config/config.yaml")
        if run.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
    except TrackingError:
        raise
    except Exception as err:  # noqa: BLE001 - any store failure at start-up is a user-facing error
        raise TrackingError(f"MLflow tracking store {uri} cannot be used ({_one_line(err)}); fix "
                            f"MLFLOW_TRACKING_URI / tracking.uri or set tracking.mlflow=false") from err
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps({"run_id": run_id, "experiment_id": run.info.experiment_id,
                                            "tracking_uri": uri}, indent=2) + "\n")
    tracker = MlflowTracker(cfg, client, run, uri, logged)
    for earlier in list(_unfinished):  # an earlier, crashed tracker of this run in this process
        if earlier.run_id == tracker.run_id:
            earlier.finished = True
    if resume:
        _backfill(tracker)
    _unfinished.add(tracker)
    return tracker


def _log_params_and_tags(client: Any, run: Any, cfg: ExperimentConfig) -> None:
    """Config params (only keys not in the run yet; a resume that changes a value records it as a
    `resume.<key>` tag, MLflow params being immutable) and the descriptive tags."""
    from mlflow.entities import Param, RunTag

    existing = run.data.params
    params = config_params(cfg)
    tags = {"algorithm": cfg.algorithm.name, "dataset": cfg.data.dataset, "runtime": cfg.runtime.kind,
            "output_dir": str(cfg.output_dir)}
    commit = git_commit()
    if commit:
        tags["git_commit"], tags["git_dirty"] = commit[0], str(commit[1]).lower()
    for key, value in params.items():
        if key in existing and existing[key] != value:
            tags[f"resume.{key}"] = value
            log.warning("MLflow: %s changed on resume (%s -> %s); recorded as tag resume.%s",
                        key, existing[key], value, key)
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    tag_list = [RunTag(k, v) for k, v in tags.items()]
    param_chunks = [new[i:i + MAX_PARAMS_PER_CALL] for i in range(0, len(new), MAX_PARAMS_PER_CALL)]
    tag_chunks = [tag_list[i:i + MAX_PARAMS_PER_CALL] for i in range(0, len(tag_list), MAX_PARAMS_PER_CALL)]
    for i in range(max(len(param_chunks), len(tag_chunks))):
        client.log_batch(run.info.run_id, params=param_chunks[i] if i < len(param_chunks) else [],
                         tags=tag_chunks[i] if i < len(tag_chunks) else [])


def _backfill(tracker: MlflowTracker) -> None:
    """On resume, log the checkpointed rounds the run lacks (a crash between checkpoint and log)."""
    try:
        saved = CheckpointStore(tracker.output_dir / "checkpoints").latest_server()
    except ValueError as err:
        log.warning("MLflow: cannot read the server checkpoint to backfill metrics (%s)", err)
        return
    for report in (saved or {}).get("history", []):
        if report["round"] not in tracker.logged_steps:
            tracker.queue_round(report["round"], round_metrics(report))
            tracker.logged_steps.add(report["round"])
    tracker.flush()


# Runs started by this process that never reached on_end are marked FAILED at exit.
_unfinished: "weakref.WeakSet[MlflowTracker]" = weakref.WeakSet()


@atexit.register
def _fail_unfinished() -> None:
    for tracker in list(_unfinished):
        if not tracker.finished:
            try:
                tracker.flush()
                tracker.client.set_terminated(tracker.run_id, "FAILED")
            except Exception:  # noqa: BLE001 - best effort at interpreter exit
                pass


def mlflow_listeners(cfg: ExperimentConfig, resume: bool) -> list[MlflowTracker]:
    """run.LISTENER_FACTORIES entry: an MlflowTracker when tracking.mlflow is on, else nothing."""
    return [start_tracker(cfg, resume)] if cfg.tracking.mlflow else []


# -- MLflow Projects entry point ------------------------------------------------------------------------
def project_argv(config: str = "", rounds: str = "", algorithm: str = "", seed: str = "",
                 overrides: str = "", output_dir: str = "") -> list[str]:
    """MLproject parameters -> `fedpgp-ray run` arguments; an empty value keeps the config's value.

    algorithm: one name, or several comma-separated (run one after another: `--algorithms`).
    overrides: shell-style list of key.path=value, e.g. "train.lr=0.01 federation.num_clients=4".
    """
    argv = ["--config", config] if config else []
    sets = [f"train.rounds={rounds}"] * bool(rounds) + [f"seed={seed}"] * bool(seed)
    sets += [f"output_dir={output_dir}"] * bool(output_dir)
    if "," in algorithm:
        argv += ["--algorithms", algorithm]
    elif algorithm:
        sets.append(f"algorithm.name={algorithm}")
    sets += shlex.split(overrides)
    return argv + [arg for item in sets for arg in ("--set", item)]


def passthrough_argv(pairs: list[str]) -> list[str]:
    """`--name value` pairs from an MLproject command -> the command's arguments.

    Empty and "false" values are dropped (the command's default applies), "true" becomes a bare
    flag, and `--overrides "k=v k2=v2"` becomes `--set k=v --set k2=v2`.
    """
    if len(pairs) % 2 or not all(flag.startswith("--") for flag in pairs[::2]):
        raise SystemExit(f"error: expected --name value pairs, got {pairs}")
    out, sets = [], []
    for flag, value in zip(pairs[::2], pairs[1::2]):
        if flag == "--overrides":
            sets += shlex.split(value)
        elif value not in ("", "false"):
            out += [flag] if value == "true" else [flag, value]
    return out + [arg for item in sets for arg in ("--set", item)]


def _log_bench_json(path: Path) -> None:
    """Under `mlflow run` (MLFLOW_RUN_ID set), attach the benchmark's JSON to the handed-over run."""
    if not (os.environ.get("MLFLOW_RUN_ID") and path.is_file()):
        return
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI")).log_artifact(
        os.environ["MLFLOW_RUN_ID"], str(path), "bench")


def project_main(argv: list[str] | None = None) -> int:
    """`python -m fedpgp_ray.tracking [run|compare|bench] --name value ...` (the MLproject commands).

    run (entry point main): config / rounds / algorithm / seed / overrides / output-dir, mapped
    by `project_argv`. compare, bench: `--name value` passed through (`passthrough_argv`); bench's
    JSON is logged to the MLflow run that `mlflow run` handed over.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "run"
    if command == "compare":
        from fedpgp_ray.compare import main as compare_main

        return compare_main(passthrough_argv(argv))
    if command == "bench":
        from fedpgp_ray.bench import main as bench_main

        args = passthrough_argv(argv)
        with tempfile.TemporaryDirectory(prefix="fedpgp-bench-") as tmp:
            if "--json" not in args:
                args += ["--json", str(Path(tmp) / "bench.json")]
            code = bench_main(args)
            if code == 0:
                _log_bench_json(Path(args[args.index("--json") + 1]))
        return code
    if command != "run":
        print(f"error: unknown command {command!r}: choose run, compare or bench", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m fedpgp_ray.tracking",
                                     description="MLflow Projects entry point (mlflow_projects/fedpgp): "
                                                 "runs `fedpgp-ray run`; empty values keep the config's")
    for name in ("config", "rounds", "algorithm", "seed", "overrides", "output-dir"):
        parser.add_argument(f"--{name}", default="")
    args = parser.parse_args(argv)
    from fedpgp_ray.run import main

    return main(project_argv(args.config, args.rounds, args.algorithm, args.seed, args.overrides, args.output_dir))


if __name__ == "__main__":
    sys.exit(project_main())
