"""MLflow tracking from the driver: one run per experiment, one batched write per round.

Only the driver writes (client actors return metrics in RoundReports; this module sees those
and nothing else), so it works the same with every runtime. It imports mlflow only once tracking
is on (`tracking.mlflow: true`). The MLflow Projects entry point is `fedpgp_ray.mlflow_project`.

Store (first that applies): $MLFLOW_TRACKING_URI, `tracking.uri`, on resume the store the run
was logged to, else the workspace's store (`fedpgp_ray.workspace`: `<CWD>/mlflow.db` for runs under
the current directory, `~/.fedpgp-ray/mlflow.db` for a URI output_dir), artifacts in `mlartifacts/`
beside the database.
Run: $MLFLOW_RUN_ID (how `mlflow run` hands its run over), on `--resume` the run saved in
`<output_dir>/mlflow_run.json`, else a new run in $MLFLOW_EXPERIMENT_ID / $MLFLOW_EXPERIMENT_NAME
or `tracking.experiment`. The store is checked at start-up: an unreachable server or an unusable
store raises `TrackingError` (one line) before any training. See docs/TRACKING.md.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shlex
import shutil
import socket
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

from fedpgp_ray.client_results import MAX_LISTED_CLIENTS, PARQUET_FILE
from fedpgp_ray.config import ExperimentConfig, config_to_dict, flatten
from fedpgp_ray.messages import one_line
from fedpgp_ray.storage import RunStorage, StorageError, is_uri
from fedpgp_ray.tracking_data import dataset_input, start_system_metrics
from fedpgp_ray.tracking_io import BackgroundWriter, check_sqlite_store, probe_settings
from fedpgp_ray.workspace import default_store_path, in_ray_job_package

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"        # in output_dir: run id, experiment id and store of the run
ARTIFACT_DIR = "mlartifacts"        # artifacts of experiments created in a SQLite store, beside the DB
PARAM_PREFIX = "cfg."               # config params never clash with `mlflow run -P` params
STEP_MARKER = "round_seconds"       # logged last for every round: its steps are the rounds logged
MAX_METRICS_PER_CALL = 1000         # MLflow's log_batch limits
MAX_PARAMS_PER_CALL = 100
MAX_PARAM_LENGTH = 6000
PROBE_TIMEOUT_S = 5.0
END_WAIT_S = 15.0                   # at the end of a run: how long queued writes may take to land
EXIT_WAIT_S = 3.0                   # at exit after a crash or Ctrl-C
STORE_LOCK_TIMEOUT_S = 120.0        # first use of a SQLite store by concurrent runs: wait at most this long

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
    """The store when none is given: the workspace's SQLite store (`fedpgp_ray.workspace`).
    Absolute SQLite URIs have four slashes."""
    return "sqlite:///" + str(default_store_path(output_dir))


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
    if uri.startswith("sqlite:///") and in_ray_job_package(uri[len("sqlite:///"):].partition("?")[0]):
        raise TrackingError(f"tracking store {uri} is inside Ray's temporary job directory, which is deleted "
                            f"with the job: name a lasting store (sqlite:////abs/path/mlflow.db or "
                            f"http://host:port) in MLFLOW_TRACKING_URI or tracking.uri")
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


def check_store(cfg: ExperimentConfig) -> None:
    """The default or named store of a new run answers and can be written (TrackingError, one line):
    checked before the run directory is touched, so --overwrite never loses a run to a store typo."""
    uri = resolve_tracking_uri(cfg)
    check_reachable(uri)
    try:
        check_sqlite_store(uri)
    except Exception as err:  # noqa: BLE001 - as start_tracker reports it
        raise TrackingError(f"MLflow tracking store {uri} cannot be used ({one_line(err)}); fix "
                            f"MLFLOW_TRACKING_URI / tracking.uri or set tracking.mlflow=false") from None


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast (TrackingError) if an http(s) tracking server does not answer within `timeout` s.

    MLflow's own client retries for minutes before giving up; this probe takes seconds.
    """
    if not uri.startswith(("http://", "https://")):
        return
    context = None
    if uri.startswith("https://"):  # the same TLS settings MLflow's client uses
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
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


def provenance_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """Where a run comes from: package version, config file, host, and the package's git commit
    (with `git_dirty`) when it runs from a checkout."""
    from fedpgp_ray import __version__

    tags = {"fedpgp_ray_version": __version__, "hostname": socket.gethostname()}
    if cfg.tracking.config_file:
        tags["config_file"] = cfg.tracking.config_file
    commit = git_commit()
    if commit:
        tags["git_commit"], tags["git_dirty"] = commit[0], str(commit[1]).lower()
    return tags


def _param_value(value: Any) -> str:
    text = "null" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:MAX_PARAM_LENGTH]


def config_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The resolved config, flattened, as MLflow params: `cfg.train.rounds` -> "25"."""
    return {PARAM_PREFIX + k: _param_value(v) for k, v in flatten(config_to_dict(cfg)).items()}


def round_metrics(round_report: dict[str, Any] | Any) -> dict[str, float]:
    """A round's metrics as MLflow keys: aggregates as they are, per client under `client/<id>/<key>` for
    client ids below MAX_LISTED_CLIENTS (a bounded number of series; every client is in clients.parquet).

    Non-finite values (NaN: a metric without data) are left out. `round_seconds` comes last.
    """
    if not isinstance(round_report, dict):
        round_report = {"metrics": round_report.metrics, "clients": round_report.clients}
    out: dict[str, float] = {}
    for cid, metrics in sorted(round_report.get("clients", {}).items(), key=lambda item: int(item[0])):
        if int(cid) >= MAX_LISTED_CLIENTS:
            continue
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


def _read_saved(output_dir: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads(RunStorage(output_dir).read_text(RUN_FILE))
    except (OSError, ValueError, StorageError):
        return None


# -- the listener ---------------------------------------------------------------------------------------
class MlflowTracker:
    """Logs one experiment into one MLflow run, from the driver (a run.LISTENER_FACTORIES listener).

    on_round: one `log_batch` (split at 1000 metrics) with step=round, plus the server checkpoint
    every `tracking.checkpoint_every` rounds and at the last round. on_end: results JSON, tables,
    figures and final client states as artifacts, then the run is marked FINISHED. Rounds already
    in the run (resume) are never logged twice. Every write runs on a background thread
    (`tracking_io.BackgroundWriter`): a store that goes away mid-run never blocks a round; its writes
    are retried every few seconds and land once it is back, and what is still missing at the end is
    reported (`--resume` writes it later). Only start-up errors are fatal.
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
        self.storage = RunStorage(cfg.output_dir)  # the run directory: a path or a URI
        self.output_dir = self.storage.display()
        self.last_round = num_rounds(cfg)
        self.logged_steps = set(logged_steps)
        self.system_monitor: Any = None  # tracking.system_metrics: MLflow's SystemMetricsMonitor
        # Writes go through one background thread (fedpgp_ray.tracking_io): a store that goes away
        # mid-run never blocks a round; its points are retried and written once it is back.
        self.writer = BackgroundWriter(uri)
        self.seconds: dict[int, float] = {}    # time spent in on_round, per round
        self.end_seconds = 0.0
        self.finished = False

    # Listener protocol ------------------------------------------------------------------------------
    def on_round(self, report: Any, global_params: Any) -> None:
        began = time.perf_counter()
        if report.round in self.logged_steps:
            return
        self.queue_round(report.round, round_metrics(report))
        if report.round == self.last_round or (report.round > 0 and report.round % self.cfg.tracking.checkpoint_every == 0):
            try:
                data = self._server_checkpoint_bytes(report.round, global_params)
                self.writer.submit(lambda rnd=report.round: self._log_server_checkpoint(rnd, data))
            except StorageError as err:  # the run itself reports its storage; tracking never stops it
                log.warning("MLflow: could not read the round-%d checkpoint (%s)", report.round, err)
        self.logged_steps.add(report.round)
        self.seconds[report.round] = time.perf_counter() - began

    def on_end(self, results: dict[str, Any]) -> None:
        began = time.perf_counter()
        if not self.flush(END_WAIT_S):  # the store is still away: leave the rest to a later --resume
            self._report_unwritten()
            return
        self.writer.restore_settings()  # the store answers: MLflow's own retries for the uploads below
        with tempfile.TemporaryDirectory(prefix="fedpgp-mlflow-") as tmp:
            stage = Path(tmp)
            try:
                self._stage_artifacts(results, stage)
                self.client.log_artifacts(self.run_id, str(stage))
            except Exception as err:  # noqa: BLE001 - results are on disk already; never lose them to tracking
                log.warning("MLflow: could not log the final artifacts (%s); they are in %s",
                            one_line(err), self.output_dir)
        if self.cfg.tracking.log_models:  # the trained classifiers as registered MLflow Models
            from fedpgp_ray.model_registry import log_tracker_models

            what = (f"the personalised model, {self.cfg.federation.num_clients} client models and the global one"
                    if self.cfg.tracking.log_client_models else "one personalised model: the global prompt and "
                    "every trained client's factors")
            print(f"MLflow: logging and registering the classifiers as MLflow Models ({what})", file=sys.stderr,
                  flush=True)

            log_tracker_models(self, results)
        self.end_seconds = time.perf_counter() - began
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        overhead = [Metric("tracking_seconds", s, stamp, r) for r, s in sorted(self.seconds.items())]
        if self.seconds:  # rounds ran in this session (a resume of a finished run logs none twice)
            overhead.append(Metric("tracking_end_seconds", self.end_seconds, stamp, self.last_round))
        for begin in range(0, len(overhead), MAX_METRICS_PER_CALL):
            self._submit_metrics(overhead[begin:begin + MAX_METRICS_PER_CALL])
        if not self.flush(END_WAIT_S):
            self._report_unwritten()
            return
        self.stop_system_metrics()
        self.writer.stop()
        try:
            self.client.set_terminated(self.run_id, "FINISHED")
        except Exception as err:  # noqa: BLE001
            log.warning("MLflow: could not mark run %s finished (%s)", self.run_id, one_line(err))
        self.finished = True
        print(self.summary(), flush=True)

    def close(self) -> None:
        """Give MLflow its own retry settings back without finishing the run (it stopped with an
        error, and the process may go on: a notebook, a test session); the exit hook marks it FAILED."""
        self.stop_system_metrics()
        self.writer.restore_settings()

    def end(self, status: str) -> None:
        """End an unfinished run with `status` (FAILED, KILLED) now, bounded by EXIT_WAIT_S."""
        if self.finished:
            return
        self.finished = True
        self.writer.submit(lambda: self.client.set_terminated(self.run_id, status))
        with probe_settings():
            self.flush(EXIT_WAIT_S)

    def stop_system_metrics(self) -> None:
        if self.system_monitor is not None:
            self.system_monitor.finish()
            self.system_monitor = None

    # Writing ----------------------------------------------------------------------------------------
    def queue_round(self, rnd: int, metrics: dict[str, float]) -> None:
        """Queue one round's metrics at step=rnd, in chunks of at most 1000 (the marker in the last)."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        points = [Metric(key, value, stamp, rnd) for key, value in metrics.items()]
        for begin in range(0, len(points), MAX_METRICS_PER_CALL):
            self._submit_metrics(points[begin:begin + MAX_METRICS_PER_CALL])

    def _submit_metrics(self, chunk: list[Any]) -> None:
        self.writer.submit(lambda: self.client.log_batch(self.run_id, metrics=chunk), len(chunk))

    def flush(self, timeout: float = END_WAIT_S) -> bool:
        """Wait up to `timeout` s for the queued writes; True when all are written."""
        return self.writer.wait(timeout)

    def _report_unwritten(self) -> None:
        """The store stayed away to the end: say what is missing and how to write it later."""
        since = self.writer.failing_since
        log.warning("MLflow: %s unusable%s (%s): %d metric point(s) and the final artifacts are not written; "
                    "the results are in %s; once the store is back, `fedpgp-ray run --resume %s` writes them",
                    self.uri, f" for the last {time.time() - since:.0f} s" if since else "", self.writer.last_error,
                    self.writer.pending_points(), self.output_dir, self.output_dir)
        self.writer.restore_settings()
        self.finished = True  # nothing more to try at exit: the store is away

    def _server_checkpoint_bytes(self, rnd: int, global_params: Any) -> bytes:
        """The round's server checkpoint as it is now (read at once: pruning may remove it before
        the background writer gets to it), or sigma alone where the run keeps none."""
        rel = f"checkpoints/server/round_{rnd}.pt"
        if self.storage.exists(rel):
            return self.storage.read_bytes(rel)
        import io

        import torch

        buffer = io.BytesIO()
        torch.save({"round": rnd, "global_params": global_params}, buffer)
        return buffer.getvalue()

    def _log_server_checkpoint(self, rnd: int, data: bytes) -> None:
        """Upload one checkpoint (on the writer thread: a failure is retried, never dropped)."""
        with tempfile.TemporaryDirectory(prefix="fedpgp-mlflow-") as tmp:
            staged = Path(tmp) / f"round_{rnd}.pt"
            staged.write_bytes(data)
            self.client.log_artifact(self.run_id, str(staged), "checkpoints/server")

    def _stage_artifacts(self, results: dict[str, Any], stage: Path) -> None:
        """Lay out the end-of-run artifacts in `stage` (logged with one call)."""
        from fedpgp_ray import plots

        (stage / "results").mkdir()
        (stage / "results" / "results.json").write_text(json.dumps(results, indent=2))
        if results.get("dataset_manifest"):  # what loaded: classes, base/novel names, image counts, cache key
            (stage / "dataset_manifest.json").write_text(json.dumps(results["dataset_manifest"], indent=2))
        plots.write_results_tables(results, stage / "results")
        if self.storage.exists(PARQUET_FILE):  # every client of every round (results.json lists a few)
            (stage / "results" / PARQUET_FILE).write_bytes(self.storage.read_bytes(PARQUET_FILE))
        plots.write_figures(results, stage / "figures")
        from fedpgp_ray.checkpoint import CheckpointStore

        store = CheckpointStore(self.storage.child("checkpoints"))
        config = results.get("config", {})
        if config.get("privacy", {}).get("enabled") or config.get("secagg", {}).get("enabled"):
            return  # DP / SecAgg: a client's state file names its last training round; it stays in the run directory
        for cid in store.client_ids()[:MAX_LISTED_CLIENTS]:  # bounded: the run directory keeps them all
            newest = store.newest_client_file(cid)
            if newest:  # the newest state: the client's final personal adapters (and optimizer state)
                target = stage / "checkpoints" / "clients" / str(cid)
                target.mkdir(parents=True)
                (target / newest[0]).write_bytes(newest[1])

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
    name = f"{cfg.algorithm.name}-{run_dir_name(cfg.output_dir)}"
    return client.create_run(experiment_id, run_name=name, tags=tags), False


def run_dir_name(output_dir: str | Path) -> str:
    """The last part of output_dir for run names: for a URI without its query (credentials, endpoints)."""
    text = str(output_dir)
    if is_uri(text):
        text = urllib.parse.urlsplit(text).path
    return Path(text.rstrip("/")).name or "run"


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


def first_use_lock(uri: str) -> Any:
    """A file lock beside a SQLite store for its first use by a run: runs started at once into a fresh
    store otherwise race on MLflow's schema (`table latest_metrics already exists`) and on creating
    the experiment. Other stores (servers) serialise this themselves."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(f"{uri[len('sqlite:///'):].partition('?')[0]}.lock", timeout=STORE_LOCK_TIMEOUT_S)


def start_tracker(cfg: ExperimentConfig, resume: bool = False) -> MlflowTracker:
    """Resolve store and run, check them, log params / tags / config, and return the listener.

    Raises TrackingError (one line) when the store or the run cannot be used: before any training.
    """
    out = RunStorage(cfg.output_dir)
    saved = _read_saved(cfg.output_dir) if resume else None
    uri = resolve_tracking_uri(cfg, saved)
    check_reachable(uri)
    try:
        check_sqlite_store(uri)
        from mlflow import MlflowClient

        with probe_settings():  # a server answering errors fails now, not after MLflow's minutes of retries
            with first_use_lock(uri):
                client = MlflowClient(tracking_uri=uri)
                run, reused = _open_run(client, cfg, resume, saved, uri)
            run_id = run.info.run_id
            logged = {m.step for m in client.get_metric_history(run_id, STEP_MARKER)} if reused else set()
            _log_params_and_tags(client, run, cfg)
            client.log_text(run_id, yaml.safe_dump(config_to_dict(cfg), sort_keys=False), "config/config.yaml")
            if not reused:  # the data as an MLflow dataset input (name, source, digest of the task)
                client.log_inputs(run_id, datasets=[dataset_input(cfg)])
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
    except TrackingError:
        raise
    except Exception as err:  # noqa: BLE001 - any store failure at start-up is a user-facing error
        raise TrackingError(f"MLflow tracking store {uri} cannot be used ({one_line(err)}); fix "
                            f"MLFLOW_TRACKING_URI / tracking.uri or set tracking.mlflow=false") from err
    out.write_text(RUN_FILE, json.dumps({"run_id": run_id, "experiment_id": run.info.experiment_id,
                                        "tracking_uri": uri}, indent=2) + "\n")
    tracker = MlflowTracker(cfg, client, run, uri, logged)
    if cfg.tracking.system_metrics:  # opt-in: MLflow's monitor of CPU, memory, disk, network
        tracker.system_monitor = start_system_metrics(run_id, uri, resume=reused)
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
            "output_dir": str(cfg.output_dir), **provenance_tags(cfg)}
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
    from fedpgp_ray.checkpoint import CheckpointStore

    try:
        saved = CheckpointStore(tracker.storage.child("checkpoints")).latest_server()
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


def end_unfinished(status: str) -> None:
    """Write what is queued and end every unfinished run with `status` (FAILED after an error, KILLED
    after Ctrl-C or SIGTERM), within EXIT_WAIT_S per run; an unreachable store is left as it is
    (`--resume` writes the rest), the process never lingers."""
    for tracker in list(_unfinished):
        tracker.end(status)


@atexit.register
def _fail_unfinished() -> None:
    """At exit after an error or a crash: the runs that never reached on_end end FAILED."""
    end_unfinished("FAILED")


def mlflow_listeners(cfg: ExperimentConfig, resume: bool) -> list[MlflowTracker]:
    """run.LISTENER_FACTORIES entry: an MlflowTracker when tracking.mlflow is on, else nothing."""
    return [start_tracker(cfg, resume)] if cfg.tracking.mlflow else []
