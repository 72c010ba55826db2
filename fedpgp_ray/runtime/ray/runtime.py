"""RayRuntime: the client actors' pool and the server actor, started, used by the federation loop, closed."""
from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from fedpgp_ray.algorithms import Params
from fedpgp_ray.checkpoint import CheckpointStore
from fedpgp_ray.client import EvalResult, FitResult
from fedpgp_ray.config import ExperimentConfig
from fedpgp_ray.runtime.assign import home_slot
from fedpgp_ray.runtime.base import AsyncExecutor, Runtime, status, worker_threads
from fedpgp_ray.runtime.ray.actors import RemoteClientActor, RemoteServerActor, process_memory, unwrap
from fedpgp_ray.runtime.ray.async_loop import RayAsyncExecutor
from fedpgp_ray.runtime.ray.dispatch import dispatch, task_timeout
from fedpgp_ray.runtime.ray.faults import FAULTS_ENV, FaultPlan
from fedpgp_ray.runtime.ray.placement import GpuFallbackWarning, actor_bundle, connect, gpus_per_actor, place_actors
from fedpgp_ray.runtime.ray.server_proxy import ServerProxy
from fedpgp_ray.strategy import ClientFailure, FedAvgStrategy, RoundClose

log = logging.getLogger("fedpgp_ray.runtime.ray")


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
        self.bundle: dict[str, float] = {}
        self._counters: dict[str, dict[str, float]] = {}
        self.task_seq = 0  # client tasks submitted in this run (orders an actor's tasks)
        self.slowest_task_s = 0.0  # the slowest client task completed in this run (automatic task timeout)
        self.slowest_compute_s = 0.0  # the slowest fit's training in this run (deadline mode's close grace)
        self.state_round: dict[int, int] = {}  # client -> the round that last trained it (sent with its tasks)
        self.marker: str | None = None
        self.owns_ray = connect(self.rc, self.num_actors)
        try:
            self._check_output_dir()
            # Every actor proves at start-up that it reads this marker (shared storage or a URI).
            self.marker = store.write_marker() if store is not None else None
            self.gpus = gpus_per_actor(cfg)
            self.bundle = actor_bundle(self.rc, self.gpus)
            self.pg = place_actors(self.rc, self.num_actors, self.bundle)
            self._start_actors()
        except BaseException:
            self.close()
            raise

    # -- start-up ---------------------------------------------------------------------------------
    def _check_output_dir(self) -> None:
        path = self.store.directory if self.store is not None else ""
        if "_ray_pkg_" in path or "runtime_resources" in path:
            warnings.warn(f"checkpoints go to {path}, inside Ray's temporary job directory (deleted after the "
                          f"job): set output_dir to an absolute path (--set output_dir=/abs/dir)", RuntimeWarning,
                          stacklevel=3)
        if self.store is None:
            log.warning("no checkpoint store: a replaced client actor cannot restore its clients' personal state")

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
            raise unwrap(err) from None
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
        """The actor slot a client returns to when the phase's balance allows (runtime.assign.balanced_slots)."""
        return home_slot(client_id, self.num_actors)

    def clients_of(self, slot: int) -> range:
        """The clients whose home is actor `slot` (see slot_of); a range, not a list of the federation."""
        return range(slot, self.cfg.federation.num_clients, self.num_actors)

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
            raise unwrap(err) from None
        return ServerProxy(self.server_actor, self.phase_metrics, self.cfg.output_dir)

    def _marker_for(self, store: CheckpointStore | None) -> str | None:
        """The start-up marker, if `store` is the run storage it was written to."""
        same = store is not None and self.store is not None and store.directory == self.store.directory
        return self.marker if same else None

    def _spawn_server(self) -> None:
        # Hard affinity to the driver's node: with soft=True and a 0-CPU head, Ray passed the lease on to a
        # worker node in 8 of 13 jobs, and losing that worker lost the server. The driver's node is the
        # one node the run cannot survive losing anyway.
        node = ray.get_runtime_context().get_node_id()
        self.server_actor = RemoteServerActor.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)).remote()

    def fit(self, rnd: int, client_ids: list[int], global_params: Params, close: RoundClose | None = None
            ) -> tuple[list[FitResult], list[ClientFailure]]:
        return self._phase("fit", rnd, client_ids, global_params, close)

    def evaluate(self, rnd: int, client_ids: list[int], global_params: Params
                 ) -> tuple[list[EvalResult], list[ClientFailure]]:
        return self._phase("evaluate", rnd, client_ids, global_params)

    def async_executor(self, concurrency: int) -> AsyncExecutor:
        return RayAsyncExecutor(self, concurrency)

    def secagg_exchange(self, rnd: int, stage: str, requests: dict[int, Any]) -> dict[int, Any]:
        """One SecAgg stage: one task per actor carrying its clients' messages. An actor that dies or hangs
        (runtime.task_timeout_s) takes its clients out of the round (dropouts, which the protocol recovers
        from or fails the round on); it is replaced for the next round. No retries: a restarted client has
        lost its keys."""
        by_slot: dict[int, dict[int, Any]] = {}
        for cid, request in requests.items():
            by_slot.setdefault(self.slot_of(cid), {})[cid] = request
        for rnd_, stage_, cid in sorted(self.faults.secagg_kill):
            if (rnd_, stage_) == (rnd, stage) and self.slot_of(cid) in by_slot:
                log.warning("fault injection: killing a client actor before SecAgg stage %s", stage)
                kill_and_wait(self.actors[self.slot_of(cid)])
        pending = {self.actors[slot].secagg_batch.remote(rnd, stage, batch): slot for slot, batch in by_slot.items()}
        deadline = time.monotonic() + task_timeout(self.rc.task_timeout_s, self.slowest_task_s)
        out: dict[int, Any] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(deadline - time.monotonic(), 0.0))
            if not ready:  # hung actors: their clients drop out
                for slot in pending.values():
                    ray.kill(self.actors[slot], no_restart=True)
                    self.replace_actor(slot)
                log.warning("round %d: %d client actors timed out in SecAgg stage %s", rnd, len(pending), stage)
                break
            slot = pending.pop(ready[0])
            try:
                out.update(ray.get(ready[0]))
            except RayActorError:
                log.warning("round %d: a client actor died in SecAgg stage %s; its %d clients drop out", rnd, stage,
                            len(by_slot[slot]))
                self.replace_actor(slot)
            except RayTaskError as err:
                raise unwrap(err) from None
        return out

    def forget_states(self) -> None:
        """Every actor drops its clients' states (after its queued tasks: an actor runs its tasks in order)."""
        for actor in self.actors:
            try:
                ray.get(actor.forget_states.remote())
            except RayActorError:  # dead: its replacement starts with empty memory anyway
                pass

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

    def _phase(self, method: str, rnd: int, client_ids: list[int], global_params: Params,
               close: RoundClose | None = None):
        results, failures, self._counters[method] = dispatch(self, method, rnd, client_ids, global_params, close)
        return results, failures

    def replace_actor(self, slot: int) -> Any:
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


def kill_and_wait(actor: Any, timeout: float = 30.0) -> None:
    """ray.kill returns before the actor is dead, and a task sent right after may still run on it: wait
    until the actor answers as dead, so an injected fault lands before the stage it is meant for."""
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=5)
        except RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            continue
        time.sleep(0.05)
