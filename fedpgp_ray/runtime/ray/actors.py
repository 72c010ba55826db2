"""What runs inside Ray: the client actor (a ClientWorker: frozen CLIP, many logical clients) and the
server actor (a Server: global parameters, aggregation, checkpoints)."""
from __future__ import annotations

import os
import resource
import time
from typing import Any

import ray
import torch
from ray.exceptions import RayTaskError

from fedpgp_ray.algorithms import Params
from fedpgp_ray.checkpoint import CheckpointStore
from fedpgp_ray.client import ClientWorker, EvalResult, FitResult
from fedpgp_ray.config import ConfigError, ExperimentConfig
from fedpgp_ray.errors import user_errors
from fedpgp_ray.server import Server
from fedpgp_ray.storage import StorageError
from fedpgp_ray.strategy import FedAvgStrategy


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
        cache = self.worker._cache.directory
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "node_ip": ray.util.get_node_ip_address(), "cache_dir": str(cache) if cache else None,
                "device": str(self.worker.device), "gpu_ids": self.gpu_ids, "threads": self.threads,
                "fallback": self.fallback, "feature_rows": rows, "encoded_images": self.worker.encoded_images,
                "manifest": self.worker.dataset_manifest()}

    def global_params(self) -> Params:
        return self.worker.global_params()

    def fit(self, client_id: int, rnd: int, global_params: Params, fault: str | None = None,
            state_round: int | None = None) -> FitResult:
        """Train one client. fault: injected failure ("exit": the process dies, "fail": raise, "hang",
        "sleep S": wait S seconds, then train)."""
        if fault == "exit":
            os._exit(1)  # a crashed worker process, mid-round
        if fault == "fail":
            raise RuntimeError(f"injected failure of client {client_id} (FaultPlan.fail)")
        if fault == "hang":
            time.sleep(10**6)  # alive but stuck (a deadlock, a hung filesystem): only a timeout ends it
        if fault and fault.startswith("sleep "):
            time.sleep(float(fault.split()[1]))
        if self.start_error is not None:
            raise self.start_error
        return self.worker.fit(client_id, rnd, global_params, state_round)

    def evaluate(self, client_id: int, rnd: int, global_params: Params, fault: str | None = None,
                 state_round: int | None = None) -> EvalResult:
        if self.start_error is not None:
            raise self.start_error
        return self.worker.evaluate(client_id, rnd, global_params, state_round)

    def secagg_batch(self, rnd: int, stage: str, requests: dict[int, Any]) -> dict[int, Any]:
        """One SecAgg stage for this actor's clients of the round (ClientWorker.secagg_batch)."""
        if self.start_error is not None:
            raise self.start_error
        return self.worker.secagg_batch(rnd, stage, requests)

    def forget_states(self) -> None:
        if self.start_error is None:
            self.worker.forget_states()

    @ray.method(concurrency_group="control")
    def close_round(self, rnd: int) -> None:
        """The driver wants no more results of round `rnd` (deadline mode): a straggler waiting out its
        extra time stops now, and this actor's queued clients of that round do not start. Runs on the
        actor's control thread, beside the task in progress."""
        if self.start_error is None:
            self.worker.closing.close(rnd)

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


# "control": one thread of its own, so close_round reaches an actor busy with a client (the default group
# still runs the client tasks one at a time, in the order submitted)
RemoteClientActor = ray.remote(max_restarts=0, max_task_retries=0, concurrency_groups={"control": 1})(ClientActor)
RemoteServerActor = ray.remote(max_restarts=0, max_task_retries=0)(ServerActor)


def unwrap(err: RayTaskError) -> BaseException:
    """The user exception inside a RayTaskError (so RoundFailedError reaches run.py as itself)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err
