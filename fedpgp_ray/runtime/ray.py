"""Ray runtime: a pool of client actors (one frozen CLIP each, many logical clients) and a server actor.

Layout (config `runtime.kind: ray`):

* `runtime.num_actors` client actors, each a `ClientWorker` built once (frozen CLIP, partition,
  cached image features). Each actor is created inside a placement group with explicit
  `num_cpus` and a fractional `num_gpus`; start-up fails with `PlacementError` instead of
  hanging when the bundles cannot be placed within `runtime.placement_timeout_s`.
* Clients are sticky: client `cid` is always served by actor slot `cid % num_actors`, so its
  personal parameters and optimizer state stay in that actor's memory between rounds. The
  worker also writes them to the run's `CheckpointStore` after every turn; a replacement actor
  (same slot, empty memory) restores them from there on first use.
* A server actor hosts `fedpgp_ray.server.Server` (global parameters, sample-weighted
  aggregation, atomic per-round checkpoints); the driver talks to it through `ServerProxy`,
  which has the Server's methods.
* Every fit/evaluate phase puts the global parameters into the object store once (`ray.put`)
  and passes the reference as a top-level task argument (nested references are not resolved).
* Dispatch is a small `ray.wait` loop (not `ray.util.ActorPool`, whose dead-actor handling
  differs between Ray 2.55 and 2.60). When an actor dies (`RayActorError`) it is replaced in its
  slot, the client it was running is charged one attempt, its other queued clients are re-queued
  for free; a client that fails more than `runtime.max_client_retries` times is dropped from the
  phase and reported as a `ClientFailure` (the strategy counts it as `clients_failed` and
  enforces `federation.min_reporting_clients`). An actor whose running task exceeds
  `runtime.task_timeout_s` (default: max(600 s, 10 x the slowest task so far); `task_timeout`) is
  treated as hung: killed, then handled like a dead one. Actor replacements, retries and timeouts are
  added to the round metrics (`actor_restarts`, `client_retries`, `tasks_timed_out`, `eval_*` for the
  evaluation phase).

Ray itself: an already initialised Ray is reused; else `runtime.address` or `RAY_ADDRESS` is
attached to (never with num_cpus/num_gpus); else a running `ray start` cluster on this machine;
else a local instance sized for the pool is started, and only that one is shut down by `close()`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from fedpgp_ray.algorithms import Params
from fedpgp_ray.checkpoint import CheckpointStore
from fedpgp_ray.client import ClientWorker, EvalResult, FitResult
from fedpgp_ray.config import ConfigError, ExperimentConfig
from fedpgp_ray.runtime.base import RoundProgress, Runtime, status, worker_threads
from fedpgp_ray.server import Server
from fedpgp_ray.storage import StorageError
from fedpgp_ray.strategy import ClientFailure, FedAvgStrategy

log = logging.getLogger(__name__)

PIPELINE_DEPTH = 2  # tasks in flight per actor: one running, one queued behind it (hides dispatch latency)
FAULTS_ENV = "FEDPGP_RAY_FAULTS"


class PlacementError(ConfigError):
    """The client actors' resources cannot be placed on the Ray cluster (in time)."""


class GpuFallbackWarning(RuntimeWarning):
    """GPUs were requested for client actors but they run on CPU."""


@dataclass
class FaultPlan:
    """Injected faults, for tests and failure drills (default: none). Also read as JSON from
    $FEDPGP_RAY_FAULTS, e.g. '{"exit": [[1, 3]], "fail": [5]}'.

    kill: (round, client) pairs: right after first submitting that client's fit, the driver
        `ray.kill`s the actor serving it (mid-round, with the task in flight); once per pair.
    exit: (round, client) pairs: the actor process exits (`os._exit(1)`) when it starts that
        client's fit, on the first attempt only.
    fail: clients whose fit raises on every attempt.
    hang: (round, client) pairs: the actor hangs (sleeps, alive) in that client's fit, on the first
        attempt only; `runtime.task_timeout_s` ends it.
    """
    kill: set[tuple[int, int]] = field(default_factory=set)
    exit: set[tuple[int, int]] = field(default_factory=set)
    fail: set[int] = field(default_factory=set)
    hang: set[tuple[int, int]] = field(default_factory=set)

    @classmethod
    def from_json(cls, text: str | None) -> "FaultPlan":
        data = json.loads(text) if text else {}
        return cls(kill={tuple(p) for p in data.get("kill", [])}, exit={tuple(p) for p in data.get("exit", [])},
                   fail=set(data.get("fail", [])), hang={tuple(p) for p in data.get("hang", [])})


MIN_TASK_TIMEOUT_S = 600.0   # automatic task timeout: never below this (first tasks have no measurement yet)
TASK_TIMEOUT_FACTOR = 10.0   # ... and 10 x the slowest task completed so far in the run


def task_timeout(configured: float | None, slowest_task_s: float) -> float:
    """Seconds a client task may run before its actor is treated as hung (`runtime.task_timeout_s`).

    Automatic (configured None): max(600 s, 10 x the slowest completed task of the run). A fit task is
    one client's local epochs on cached features (seconds on CPU for the quickstart, minutes for a
    ViT-B/16 on CPU); 10x the slowest leaves room for stragglers (a loaded node, GC, a slow disk)
    without waiting forever, and 600 s covers the first tasks, before any has been measured.
    """
    if configured is not None:
        return configured
    return max(MIN_TASK_TIMEOUT_S, TASK_TIMEOUT_FACTOR * slowest_task_s)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_memory() -> dict[str, float]:
    """This process: pid, peak and current RSS, and PSS (shared pages such as torch's libraries
    split among the processes mapping them; sums of PSS over processes do not double count), MiB."""
    out = {"pid": os.getpid(), "peak_rss_mb": peak_rss_mb()}
    try:
        import psutil
        info = psutil.Process().memory_full_info()
        out.update(rss_mb=info.rss / 2**20, pss_mb=getattr(info, "pss", float("nan")) / 2**20)
    except Exception:  # psutil missing or /proc/<pid>/smaps unreadable
        out.update(rss_mb=float("nan"), pss_mb=float("nan"))
    return out


# ---------------------------------------------------------------------------------------------------
# Actors
# ---------------------------------------------------------------------------------------------------
class ClientActor:
    """One frozen CLIP serving many logical clients (a `ClientWorker` inside a Ray actor).

    threads: torch intra-op threads (so actors sharing a node do not oversubscribe its cores).
    gpu_fraction: the actor's `num_gpus`; its CUDA memory is capped to that share.
    """

    def __init__(self, cfg: ExperimentConfig, store: CheckpointStore | None, cache_dir: str | None,
                 threads: int, gpu_fraction: float, marker: str | None = None) -> None:
        # First prove this node reads the run storage the driver wrote to; if not, build nothing and
        # let prepare() (the driver's first call) raise the one-line StorageError.
        self.start_error: Exception | None = _storage_error(store, marker, "client actor")
        if self.start_error is not None:
            return
        try:
            self._build(cfg, store, cache_dir, threads, gpu_fraction)
        except Exception as err:
            # Bad input (a missing data.root, model.device 'cuda' on a CPU actor...): an exception in
            # __init__ reaches the driver as ActorDiedError with only its text, so keep it and let
            # prepare() raise it; it then arrives as itself (one `error:` line from the CLI).
            from fedpgp_ray.run import user_errors  # lazily: run.py imports the runtimes lazily too
            if not isinstance(err, user_errors()):
                raise
            self.start_error = err

    def _build(self, cfg: ExperimentConfig, store: CheckpointStore | None, cache_dir: str | None,
               threads: int, gpu_fraction: float) -> None:
        gpu_ids = ray.get_gpu_ids()
        self.fallback = ""
        if not gpu_ids:
            # Ray >= 2.56 leaves CUDA_VISIBLE_DEVICES unset in num_gpus=0 actors (every GPU visible):
            # hide them before torch initialises CUDA, so a CPU actor never touches a GPU.
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
            device = torch.device("cpu")
            if cfg.model.device == "cuda":
                raise ConfigError("model.device is 'cuda' but this client actor has no GPU: set "
                                  "runtime.num_gpus_per_actor > 0 or model.device: auto")
        elif cfg.model.device != "cpu" and torch.cuda.is_available():
            # Ray narrows CUDA_VISIBLE_DEVICES to the assigned GPU, unless told not to
            # (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES): find the id among the visible devices.
            visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
            gpu = str(gpu_ids[0])
            index = visible.index(gpu) if gpu in visible else (0 if visible else int(gpu))
            device = torch.device("cuda", index)
            torch.cuda.set_per_process_memory_fraction(min(max(gpu_fraction, 0.01), 1.0), device)
        else:
            device = torch.device("cpu")
            if cfg.model.device != "cpu":
                self.fallback = (f"Ray assigned GPU {gpu_ids} but torch.cuda.is_available() is False "
                                 f"in the actor")
        torch.set_num_threads(max(int(threads), 1))
        self.gpu_ids = [str(g) for g in gpu_ids]
        self.threads = torch.get_num_threads()
        if cache_dir is None:  # the driver left it to this node: its own $FEDPGP_CACHE_DIR, else its home
            from fedpgp_ray.clip.features import default_cache_dir
            cache_dir = str(default_cache_dir())
        self.worker = ClientWorker(cfg, device=device, store=store, cache_dir=cache_dir)

    def prepare(self, client_ids: list[int] | None = None) -> dict[str, Any]:
        """Load (or encode) the image features of the clients this actor serves (default: all) and of the
        test set; returns where and how this actor runs, and the dataset manifest."""
        if self.start_error is not None:
            raise self.start_error
        rows = self.worker.prepare(client_ids)
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "device": str(self.worker.device), "gpu_ids": self.gpu_ids, "threads": self.threads,
                "fallback": self.fallback, "feature_rows": rows, "encoded_images": self.worker.encoded_images,
                "manifest": self.worker.dataset_manifest()}

    def global_params(self) -> Params:
        return self.worker.global_params()

    def fit(self, client_id: int, rnd: int, global_params: Params, fault: str | None = None) -> FitResult:
        """Train one client. fault: injected failure ("exit": the process dies, "fail": raise)."""
        if fault == "exit":
            os._exit(1)  # a crashed worker process, mid-round
        if fault == "fail":
            raise RuntimeError(f"injected failure of client {client_id} (FaultPlan.fail)")
        if fault == "hang":
            time.sleep(10**6)  # alive but stuck (a deadlock, a hung filesystem): only a timeout ends it
        if self.start_error is not None:
            raise self.start_error
        return self.worker.fit(client_id, rnd, global_params)

    def evaluate(self, client_id: int, rnd: int, global_params: Params, fault: str | None = None) -> EvalResult:
        if self.start_error is not None:
            raise self.start_error
        return self.worker.evaluate(client_id, rnd, global_params)

    def ping(self, payload: Any = None) -> int:
        """A no-op task (measures Ray's per-task overhead)."""
        return 0

    def memory(self) -> dict[str, float]:
        return process_memory()

    def cpu_seconds(self) -> float:
        """CPU time (user + system, all threads) this actor process has used so far."""
        return time.process_time()


class ServerActor:
    """Hosts `fedpgp_ray.server.Server`; the driver reaches it through `ServerProxy`.

    The actor is started with the client actors (its process start overlaps theirs); `start`
    then creates (or, for a new run on the same runtime, replaces) the Server inside it.
    """

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.server: Server | None = None

    def start(self, strategy: FedAvgStrategy, initial: Params, store: CheckpointStore | None,
              resume: bool, marker: str | None = None) -> int:
        error = _storage_error(store, marker, "server actor")
        if error is not None:
            raise error
        self.server = Server.resume_or_start(strategy, initial, store, resume)
        return self.server.start_round()

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.server, method)(*args)

    def memory(self) -> dict[str, float]:
        return process_memory()

    def cpu_seconds(self) -> float:
        return time.process_time()


def _storage_error(store: CheckpointStore | None, marker: str | None, role: str) -> StorageError | None:
    """None if this process reads the driver's storage marker (or there is nothing to check), else
    the one-line error naming this node, the path and the fix."""
    if store is None or marker is None:
        return None
    ctx = ray.get_runtime_context()
    where = f"{role} on node {ray.util.get_node_ip_address()} (node id {ctx.get_node_id()[:12]})"
    try:
        store.check_marker(marker, where)
    except StorageError as err:
        return err
    return None


RemoteClientActor = ray.remote(max_restarts=0, max_task_retries=0)(ClientActor)
RemoteServerActor = ray.remote(max_restarts=0, max_task_retries=0)(ServerActor)


def _unwrap(err: RayTaskError) -> BaseException:
    """The user exception inside a RayTaskError (so RoundFailedError reaches run.py as itself)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


class ServerProxy:
    """The driver's handle on the server actor, with `Server`'s methods.

    aggregate_train / aggregate_evaluate also report the runtime's fault counters of that
    phase (actor restarts, client retries), so they land in the round's metrics.
    """

    def __init__(self, actor, runtime: "RayRuntime") -> None:
        self.actor = actor
        self.runtime = runtime

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return ray.get(self.actor.call.remote(method, *args))
        except RayTaskError as err:
            raise _unwrap(err) from None

    def global_params(self) -> Params:
        return self._call("global_params")

    def start_round(self) -> int:
        return self._call("start_round")

    def get_history(self) -> list[dict[str, Any]]:
        return self._call("get_history")

    def aggregate_train(self, rnd: int, results: list[FitResult], failures: list[ClientFailure]) -> dict[str, float]:
        metrics = self._call("aggregate_train", rnd, results, failures)
        return {**metrics, **self.runtime.phase_metrics("fit")}

    def aggregate_evaluate(self, rnd: int, results: list[EvalResult]) -> dict[str, float]:
        metrics = self._call("aggregate_evaluate", rnd, results)
        return {**metrics, **self.runtime.phase_metrics("evaluate")}

    def finish_round(self, rnd: int, report: dict[str, Any]) -> None:
        self._call("finish_round", rnd, report)


# ---------------------------------------------------------------------------------------------------
# The runtime
# ---------------------------------------------------------------------------------------------------
@dataclass
class _Task:
    client_id: int
    slot: int
    seq: int
    submitted: float = 0.0  # time.monotonic() at submission


class RayRuntime(Runtime):
    """Clients on a pool of Ray actors; the server in a Ray actor (see the module docstring).

    cache_dir: the image-feature cache every actor uses; None: each actor uses its own node's
    (`features.default_cache_dir()` resolved on that node: its $FEDPGP_CACHE_DIR, else its home).
    faults: injected failures (tests, drills); default from $FEDPGP_RAY_FAULTS, else none.
    """

    def __init__(self, cfg: ExperimentConfig, store: CheckpointStore | None, cache_dir: str | None,
                 faults: FaultPlan | None = None) -> None:
        self.cfg = cfg
        self.rc = cfg.runtime
        self.store = store
        self.cache_dir = cache_dir
        self.faults = faults if faults is not None else FaultPlan.from_json(os.environ.get(FAULTS_ENV))
        self.num_actors = self.rc.num_actors
        self.threads = worker_threads(self.rc)
        self.actors: list[Any] = []
        self.actor_info: list[dict[str, Any]] = []
        self.server_actor = None
        self.pg = None
        self._counters: dict[str, dict[str, float]] = {}
        self._seq = 0
        self._fired: set[tuple[int, int]] = set()  # injected kills already done
        self._slowest_task_s = 0.0  # the slowest client task completed in this run (automatic task timeout)
        self.marker: str | None = None
        self.owns_ray = self._connect()
        try:
            self._check_output_dir()
            # Every actor proves at start-up that it reads this marker (shared storage or a URI).
            self.marker = store.write_marker() if store is not None else None
            self.gpus = self._gpus_per_actor()
            self._place()
            self._start_actors()
        except BaseException:
            self.close()
            raise

    # -- start-up ---------------------------------------------------------------------------------
    def _connect(self) -> bool:
        """Attach to (or start) Ray; True when this runtime started the instance it uses."""
        if ray.is_initialized():
            return False
        address = self.rc.address or os.environ.get("RAY_ADDRESS") or None
        if address:
            status(f"Ray: attaching to the cluster at {address}")
            ray.init(address=address)  # attaching: never pass num_cpus/num_gpus
            return False
        need = math.ceil(self.num_actors * self.rc.num_cpus_per_actor)
        status(f"Ray: starting a local instance ({max(os.cpu_count() or 1, need)} CPUs; a few seconds)")
        try:
            # Starts a local instance, unless `ray start` left a cluster address on this machine,
            # in which case Ray refuses num_cpus and we attach to that cluster instead.
            ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False)
            return True
        except ValueError as err:
            if "num_cpus" not in str(err):
                raise
            ray.init()
            return False

    def _check_output_dir(self) -> None:
        path = self.store.directory if self.store is not None else ""
        if "_ray_pkg_" in path or "runtime_resources" in path:
            warnings.warn(f"checkpoints go to {path}, inside Ray's temporary job directory (deleted after the "
                          f"job): set output_dir to an absolute path (--set output_dir=/abs/dir)", RuntimeWarning,
                          stacklevel=3)
        if self.store is None:
            log.warning("no checkpoint store: a replaced client actor cannot restore its clients' personal state")

    def _gpus_per_actor(self) -> float:
        """Requested GPU share per actor; 0 (one warning) when the cluster has no GPU: Ray would
        leave GPU actors pending forever."""
        want = self.rc.num_gpus_per_actor if self.cfg.model.device != "cpu" else 0.0
        have = ray.cluster_resources().get("GPU", 0)
        if want > 0 and have <= 0:
            if self.cfg.model.device == "cuda":
                raise ConfigError("model.device is 'cuda' but the Ray cluster has no GPU: use model.device: auto "
                                  "(CPU fallback) or add GPU nodes")
            warnings.warn(f"runtime.num_gpus_per_actor={want} but the Ray cluster has no GPU: client actors run "
                          f"on CPU", GpuFallbackWarning, stacklevel=3)
            return 0.0
        return want

    def _bundle(self) -> dict[str, float]:
        bundle = {"CPU": float(self.rc.num_cpus_per_actor)}
        if self.gpus > 0:
            bundle["GPU"] = float(self.gpus)
        return bundle

    def _place(self) -> None:
        bundle = self._bundle()
        status(f"Ray: placing {self.num_actors} client actors ({bundle} each)")
        self.pg = placement_group([dict(bundle) for _ in range(self.num_actors)], strategy="PACK")
        if not self.pg.wait(timeout_seconds=self.rc.placement_timeout_s):
            total = {k: v * self.num_actors for k, v in bundle.items()}
            have = {k: ray.cluster_resources().get(k, 0) for k in bundle}
            free = {k: ray.available_resources().get(k, 0) for k in bundle}
            remove_placement_group(self.pg)
            self.pg = None
            raise PlacementError(
                f"cannot place {self.num_actors} client actors with {bundle} each (total {total}) within "
                f"runtime.placement_timeout_s={self.rc.placement_timeout_s:g}s: the Ray cluster has {have} "
                f"({free} free). Lower runtime.num_actors, runtime.num_cpus_per_actor or "
                f"runtime.num_gpus_per_actor, add nodes, free resources held by other jobs, or raise "
                f"runtime.placement_timeout_s if the cluster is busy or autoscaling")

    def _spawn(self, slot: int):
        opts = dict(num_cpus=self.rc.num_cpus_per_actor, num_gpus=self.gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self.pg, placement_group_bundle_index=slot))
        return RemoteClientActor.options(**opts).remote(self.cfg, self.store, self.cache_dir, self.threads,
                                                         self.gpus, self.marker)

    def _start_actors(self) -> None:
        began = time.perf_counter()
        status(f"Ray: starting {self.num_actors} client actors and the server actor; each client actor loads "
               f"the backbone and reads (or encodes, once) its clients' image features")
        self.actors = [self._spawn(i) for i in range(self.num_actors)]
        self._spawn_server()
        try:
            # Each actor reads or encodes its own clients' images; actors on one node share the test
            # set's cache entries, each entry encoded by one of them while the others wait and read it.
            first, *rest = ray.get([a.prepare.remote(self.clients_of(slot)) for slot, a in enumerate(self.actors)])
        except RayActorError as err:
            raise RuntimeError(f"a client actor failed to start: {err}") from None
        except RayTaskError as err:
            raise _unwrap(err) from None
        self.actor_info = [first, *rest]
        fallen = [i for i, info in enumerate(self.actor_info) if info["fallback"]]
        if fallen:
            warnings.warn(f"{len(fallen)} of {self.num_actors} client actors hold a GPU share but run on CPU: "
                          f"{self.actor_info[fallen[0]]['fallback']}", GpuFallbackWarning, stacklevel=3)
        log.info("ray runtime: %d client actors %s", self.num_actors,
                 [(i["device"], i["gpu_ids"], i["threads"]) for i in self.actor_info])
        status(f"Ray: {self.num_actors} client actors ready in {time.perf_counter() - began:.1f} s "
               f"({', '.join(sorted({i['device'] for i in self.actor_info}))})")

    # -- Runtime interface ------------------------------------------------------------------------
    def slot_of(self, client_id: int) -> int:
        """Sticky assignment: the actor slot that serves (and remembers) a client."""
        return client_id % self.num_actors

    def clients_of(self, slot: int) -> list[int]:
        """The clients actor `slot` serves (see slot_of)."""
        return [c for c in range(self.cfg.federation.num_clients) if self.slot_of(c) == slot]

    def dataset_manifest(self) -> dict[str, Any] | None:
        """What the actors loaded (actor 0's manifest) and the feature-cache entries every actor used."""
        if not self.actor_info:
            return None
        manifest = dict(self.actor_info[0]["manifest"])
        keys = {k for info in self.actor_info for k in info["manifest"]["feature_cache"]["entries"]}
        manifest["feature_cache"] = {**manifest["feature_cache"], "entries": sorted(keys)}
        return manifest

    def initial_global_params(self) -> Params:
        return ray.get(self.actors[0].global_params.remote())

    def make_server(self, strategy: FedAvgStrategy, store: CheckpointStore | None, resume: bool) -> ServerProxy:
        """The run's Server, (re)started inside the server actor (spawned with the client actors, next
        to the driver, which reads its checkpoints; no CPU reservation: aggregation is a weighted sum
        of a few tensors). If the server actor itself dies the run fails; `--resume` continues it."""
        if self.server_actor is None:
            self._spawn_server()
        try:
            ray.get(self.server_actor.start.remote(strategy, self.initial_global_params(), store, resume,
                                                   self._marker_for(store)))
        except RayTaskError as err:
            raise _unwrap(err) from None
        return ServerProxy(self.server_actor, self)

    def _marker_for(self, store: CheckpointStore | None) -> str | None:
        """The start-up marker, if `store` is the run storage it was written to."""
        same = store is not None and self.store is not None and store.directory == self.store.directory
        return self.marker if same else None

    def _spawn_server(self) -> None:
        node = ray.get_runtime_context().get_node_id()
        self.server_actor = RemoteServerActor.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=True)).remote()

    def fit(self, rnd: int, client_ids: list[int], global_params: Params
            ) -> tuple[list[FitResult], list[ClientFailure]]:
        return self._dispatch("fit", rnd, client_ids, global_params)

    def evaluate(self, rnd: int, client_ids: list[int], global_params: Params
                 ) -> tuple[list[EvalResult], list[ClientFailure]]:
        return self._dispatch("evaluate", rnd, client_ids, global_params)

    def phase_metrics(self, phase: str) -> dict[str, float]:
        """Fault counters of the last `phase` ("fit" / "evaluate"), named for the round metrics."""
        counters = self._counters.get(phase, {})
        prefix = "" if phase == "fit" else "eval_"
        out = {f"{prefix}actor_restarts": counters.get("actor_restarts", 0.0),
               f"{prefix}client_retries": counters.get("client_retries", 0.0),
               f"{prefix}tasks_timed_out": counters.get("tasks_timed_out", 0.0)}
        if phase == "evaluate":
            out["eval_clients_failed"] = counters.get("clients_failed", 0.0)
        return out

    # -- dispatch ---------------------------------------------------------------------------------
    def _dispatch(self, method: str, rnd: int, client_ids: list[int], global_params: Params):
        params_ref = ray.put(global_params)  # one copy in the object store per phase, shared by all tasks
        queues: dict[int, deque[int]] = {s: deque() for s in range(self.num_actors)}
        for cid in sorted(client_ids):
            queues[self.slot_of(cid)].append(cid)
        attempts: dict[int, int] = {cid: 0 for cid in client_ids}
        inflight: dict[Any, _Task] = {}
        results: dict[int, Any] = {}
        failures: dict[int, ClientFailure] = {}
        counters = {"actor_restarts": 0.0, "client_retries": 0.0, "clients_failed": 0.0, "tasks_timed_out": 0.0}
        slot_free_at = {s: time.monotonic() for s in range(self.num_actors)}  # when its last task ended
        starting: dict[Any, tuple[int, float]] = {}  # start-up (prepare) of replacement actors -> (slot, since)
        progress = RoundProgress(rnd, method, len(client_ids))

        def submit(slot: int) -> None:
            while queues[slot] and sum(t.slot == slot for t in inflight.values()) < PIPELINE_DEPTH:
                cid = queues[slot].popleft()
                ref = getattr(self.actors[slot], method).remote(cid, rnd, params_ref,
                                                                self._fault(method, rnd, cid, attempts[cid]))
                self._seq += 1
                inflight[ref] = _Task(cid, slot, self._seq, time.monotonic())
                if method == "fit" and (rnd, cid) in self.faults.kill - self._fired:
                    self._fired.add((rnd, cid))
                    log.warning("fault injection: killing the actor of slot %d while client %d is in flight",
                                slot, cid)
                    ray.kill(self.actors[slot], no_restart=True)

        def charge(task: _Task, reason: str) -> bool:
            """Count a failed attempt; True if the client may be retried."""
            attempts[task.client_id] += 1
            if attempts[task.client_id] > self.rc.max_client_retries:
                failures[task.client_id] = ClientFailure(
                    task.client_id, f"{reason} (dropped after {attempts[task.client_id]} attempts)")
                return False
            counters["client_retries"] += 1
            return True

        def lose_actor(slot: int, lost: list[_Task], reason: str, was_running: bool = True) -> None:
            """The actor of `slot` is gone (died, or killed as hung). Its oldest unfinished task was the
            one running (an actor runs its tasks one at a time, in order): charge that client (unless
            the actor never got to run it: `was_running`); re-queue the rest free; a fresh actor takes the slot."""
            lost = lost + [t for t in inflight.values() if t.slot == slot]
            for r in [r for r, t in inflight.items() if t.slot == slot]:
                del inflight[r]
            lost.sort(key=lambda t: t.seq)
            keep = [t.client_id for t in lost[1:]]
            if lost and (not was_running or charge(lost[0], reason)):
                keep.insert(0, lost[0].client_id)
            queues[slot].extendleft(reversed(keep))
            log.warning("round %d: client actor %d %s; replacing it and re-queueing clients %s", rnd, slot, reason, keep)
            starting[self._replace(slot)] = (slot, time.monotonic())
            slot_free_at[slot] = math.inf  # its tasks' clocks start once it has started
            counters["actor_restarts"] += 1

        def running_since(slot: int) -> tuple[_Task, float] | None:
            """The task the slot's actor is running now, and since when (tasks queue behind it)."""
            tasks = [t for t in inflight.values() if t.slot == slot]
            if not tasks:
                return None
            oldest = min(tasks, key=lambda t: t.seq)
            return oldest, max(oldest.submitted, slot_free_at[slot])

        for slot in range(self.num_actors):
            submit(slot)
        while inflight:
            limit = task_timeout(self.rc.task_timeout_s, self._slowest_task_s)
            # a replacement actor's start-up (process, backbone, features) is not a client task: it gets
            # at least the automatic floor, so a loaded node does not make every replacement "hang"
            startup_limit = max(limit, MIN_TASK_TIMEOUT_S)
            running = [r for r in map(running_since, range(self.num_actors)) if r is not None]
            deadlines = [since + limit for _, since in running] + [since + startup_limit for _, since in starting.values()]
            wait_s = min(deadlines, default=time.monotonic() + 60.0) - time.monotonic()
            ready, _ = ray.wait([*inflight, *starting], num_returns=1, timeout=min(max(wait_s, 0.0), 60.0))
            if ready and ready[0] in starting:
                slot, _ = starting.pop(ready[0])
                slot_free_at[slot] = time.monotonic()  # started (or died: its tasks will say so)
                continue
            if not ready:
                now = time.monotonic()
                hung = [(task.slot, f"{method} of client {task.client_id}", limit, True) for task, since in running
                        if now - since > limit]
                hung += [(slot, "its start-up", startup_limit, False) for slot, since in starting.values()
                         if now - since > startup_limit]
                for slot, what, seconds, was_running in hung:
                    counters["tasks_timed_out"] += 1
                    for ref in [r for r, (s, _) in starting.items() if s == slot]:
                        del starting[ref]
                    ray.kill(self.actors[slot], no_restart=True)  # hung, not dead: end it
                    lose_actor(slot, [], f"timed out after {seconds:.0f} s in {what}, round {rnd} "
                                         f"(runtime.task_timeout_s)", was_running)
                    submit(slot)
                continue
            ref = ready[0]
            task = inflight.pop(ref)
            try:
                results[task.client_id] = ray.get(ref)
                progress.client_done(len(results))
                now = time.monotonic()
                self._slowest_task_s = max(self._slowest_task_s, now - max(task.submitted, slot_free_at[task.slot]))
                slot_free_at[task.slot] = now
            except RayActorError as err:
                # lose_actor drops every in-flight task of a replaced actor, so `task` is the current one's
                lose_actor(task.slot, [task], f"died during {method} of round {rnd}: {type(err).__name__}")
            except RayError as err:  # the task raised (RayTaskError) or its worker was lost
                slot_free_at[task.slot] = time.monotonic()
                cause = _unwrap(err) if isinstance(err, RayTaskError) else err
                if isinstance(cause, StorageError):  # unshared storage, a lost client state: never retried
                    raise cause from None
                if charge(task, f"{method} raised {type(cause).__name__}: {cause}".splitlines()[0]):
                    queues[task.slot].appendleft(task.client_id)
            submit(task.slot)
        counters["clients_failed"] = float(len(failures))
        self._counters[method] = counters
        done = [results[c] for c in sorted(results)]
        return done, [failures[c] for c in sorted(failures)]

    def _fault(self, method: str, rnd: int, client_id: int, attempt: int) -> str | None:
        if method != "fit":
            return None
        if attempt == 0 and (rnd, client_id) in self.faults.exit:
            return "exit"
        if attempt == 0 and (rnd, client_id) in self.faults.hang:
            return "hang"
        return "fail" if client_id in self.faults.fail else None

    def _replace(self, slot: int) -> Any:
        """A fresh actor in the dead one's placement-group bundle; it restores clients from the store.
        Returns the reference of its start-up (`prepare`), which runs before any client task submitted after it."""
        try:
            ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # already gone
            pass
        self.actors[slot] = self._spawn(slot)
        return self.actors[slot].prepare.remote(self.clients_of(slot))

    # -- reporting, shutdown ------------------------------------------------------------------------
    def cpu_seconds(self) -> list[float]:
        """CPU seconds used so far by each client actor process, then the server actor's."""
        return ray.get([a.cpu_seconds.remote() for a in [*self.actors, self.server_actor]])

    def memory_report(self) -> dict[str, Any]:
        """Memory (MiB, see `process_memory`) of the driver, each client actor and the server actor."""
        actors = ray.get([a.memory.remote() for a in self.actors])
        server = ray.get(self.server_actor.memory.remote()) if self.server_actor is not None else None
        return {"driver": process_memory(), "actors": actors, "server": server}

    def close(self) -> None:
        for actor in [*self.actors, *([self.server_actor] if self.server_actor is not None else [])]:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors, self.server_actor = [], None
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
        self.owns_ray = False


__all__ = ["ClientActor", "FaultPlan", "GpuFallbackWarning", "PlacementError", "RayRuntime", "ServerActor",
           "ServerProxy"]
