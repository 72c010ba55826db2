"""One fit/evaluate phase over the actor pool: a small `ray.wait` loop that keeps each actor fed, replaces
dead or hung actors, retries their clients within `runtime.max_client_retries` and counts what happened."""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError, RayTaskError

from fedpgp_ray.algorithms import Params
from fedpgp_ray.config import ExperimentConfig, RuntimeConfig
from fedpgp_ray.runtime.assign import balanced_slots
from fedpgp_ray.runtime.base import RoundProgress, status
from fedpgp_ray.runtime.ray.actors import unwrap
from fedpgp_ray.runtime.ray.faults import FaultPlan
from fedpgp_ray.runtime.ray.placement import PlacementError
from fedpgp_ray.storage import StorageError
from fedpgp_ray.client import FitResult
from fedpgp_ray.strategy import ClientFailure, RoundClose

log = logging.getLogger("fedpgp_ray.runtime.ray")

PIPELINE_DEPTH = 2  # tasks in flight per actor: one running, one queued behind it (hides dispatch latency)
# An actor whose node stops answering is first "unavailable" (ActorUnavailableError), then dead once Ray
# declares its node dead (about 16 s after a raylet is killed here; Ray's health checks allow ~30 s).
# Wait that long, probing, before declaring it dead, so one node loss counts once.
UNAVAILABLE_WAIT_S = 90.0
PROBE_EVERY_S = 2.0
PLACEMENT_CHECK_S = 5.0  # how often a pending replacement's placement group is looked at
# Deadline mode: once a round has closed, its running tasks only finish their training (a straggler's wait is
# cut at once), so a task still running this long after the close is hung: at least 30 s, 3 x the slowest
# training measured so far (before any is measured, the task timeout).
CLOSE_GRACE_MIN_S = 30.0
CLOSE_GRACE_FACTOR = 3.0
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


@dataclass
class _Task:
    client_id: int
    slot: int
    seq: int
    submitted: float = 0.0  # time.monotonic() at submission


class ActorPool(Protocol):
    """What a phase needs of the runtime: its actors (slot -> actor), how clients map to slots, how a
    slot gets a fresh actor, and run-wide state (the task sequence, the slowest task so far)."""
    actors: list[Any]
    num_actors: int
    cfg: ExperimentConfig
    rc: RuntimeConfig
    pg: Any
    bundle: dict[str, float]
    faults: FaultPlan
    task_seq: int
    slowest_task_s: float
    slowest_compute_s: float  # the slowest fit's training (its `fit_seconds`, without a straggler's wait)
    state_round: dict[int, int]  # client -> the round that last trained it in this session

    def slot_of(self, client_id: int) -> int: ...

    def replace_actor(self, slot: int) -> Any: ...


def dispatch(rt: ActorPool, method: str, rnd: int, client_ids: list[int], global_params: Params,
             close: RoundClose | None = None) -> tuple[list[Any], list[ClientFailure], dict[str, float]]:
    """Run `method` ("fit" / "evaluate") for `client_ids` on rt's actors: the results sorted by client id,
    the clients dropped after too many failed attempts, and the phase's fault counters.

    close (fit in deadline mode): once close.target clients reported or close.deadline_s passed, the round
    closes: every actor is told (a straggler stops waiting), clients not yet started never start, and what
    comes back afterwards is a late FitResult (`late=True`: discarded, counted by the caller), never retried.
    The phase still collects its running tasks (they end within their training), so the driver knows every
    client's newest personal state; one still running CLOSE_GRACE after the close is hung (its actor replaced)."""
    params_ref = ray.put(global_params)  # one copy in the object store per phase, shared by all tasks
    # sticky where it costs nothing, balanced always: no actor gets more than its fair share
    queues = {s: deque(ids) for s, ids in balanced_slots(client_ids, rt.num_actors).items()}
    attempts: dict[int, int] = {cid: 0 for cid in client_ids}
    inflight: dict[Any, _Task] = {}
    results: dict[int, Any] = {}
    failures: dict[int, ClientFailure] = {}
    counters = {"actor_restarts": 0.0, "client_retries": 0.0, "clients_failed": 0.0, "tasks_timed_out": 0.0}
    slot_free_at = {s: time.monotonic() for s in range(rt.num_actors)}  # when its last task ended
    starting: dict[Any, tuple[int, float]] = {}  # start-up (prepare) of replacement actors -> (slot, since)
    placed: set[Any] = set()  # replacements whose placement group bundle is known to be placed
    suspect: dict[int, tuple[float, list[_Task]]] = {}  # unavailable actors' slots -> (since, their failed tasks)
    probes: dict[Any, int] = {}  # ping of an unavailable actor -> its slot
    reprobe_at: dict[int, float] = {}  # slot -> when to ping its unavailable actor again
    progress = RoundProgress(rnd, method, len(client_ids))
    late: dict[int, FitResult] = {}
    closed_at: float | None = None  # when the round closed (deadline mode)
    close_by = time.monotonic() + close.deadline_s if close is not None and close.deadline_s else math.inf
    closers: list[Any] = []

    def close_round() -> None:
        nonlocal closed_at
        closed_at = time.monotonic()
        closers.extend(actor.close_round.remote(rnd) for actor in rt.actors)
        for slot in range(rt.num_actors):
            submit(slot)  # their queued clients become late

    def discard(client_id: int, result: FitResult | None = None, trained: bool = True) -> None:
        """A late client: its result (if any) is discarded; if it may have trained, every actor reads its
        personal state from the store next time (a late client keeps its local update; docs/ASYNC.md)."""
        late[client_id] = result if result is not None else FitResult(client_id, {}, 0, {}, late=True)
        late[client_id].late, late[client_id].params = True, {}
        if trained:
            rt.state_round[client_id] = rnd

    def submit(slot: int) -> None:
        if closed_at is not None:  # the round closed: the clients still queued never start
            while queues[slot]:
                discard(queues[slot].popleft(), trained=False)
            return
        while slot not in suspect and queues[slot] and sum(t.slot == slot for t in inflight.values()) < PIPELINE_DEPTH:
            cid = queues[slot].popleft()
            ref = getattr(rt.actors[slot], method).remote(cid, rnd, params_ref,
                                                          rt.faults.fault_for(method, rnd, cid, attempts[cid]),
                                                          rt.state_round.get(cid))
            rt.task_seq += 1
            inflight[ref] = _Task(cid, slot, rt.task_seq, time.monotonic())
            if method == "fit" and (rnd, cid) in rt.faults.kill - rt.faults.fired:
                rt.faults.fired.add((rnd, cid))
                log.warning("fault injection: killing the actor of slot %d while client %d is in flight",
                            slot, cid)
                ray.kill(rt.actors[slot], no_restart=True)

    def charge(task: _Task, reason: str) -> bool:
        """Count a failed attempt; True if the client may be retried."""
        attempts[task.client_id] += 1
        if attempts[task.client_id] > rt.rc.max_client_retries:
            failures[task.client_id] = ClientFailure(
                task.client_id, f"{reason} (dropped after {attempts[task.client_id]} attempts)")
            return False
        counters["client_retries"] += 1
        return True

    def lose_actor(slot: int, lost: list[_Task], reason: str, was_running: bool = True) -> None:
        """The actor of `slot` is gone (died, or killed as hung). Its oldest unfinished task was the
        one running (an actor runs its tasks one at a time, in order): charge that client (unless
        the actor never got to run it: `was_running`); re-queue the rest free; a fresh actor takes the slot."""
        lost = lost + [t for t in inflight.values() if t.slot == slot] + suspect.pop(slot, (0.0, []))[1]
        for r in [r for r, t in inflight.items() if t.slot == slot]:
            del inflight[r]
        for r in [r for r, s in probes.items() if s == slot]:
            del probes[r]
        reprobe_at.pop(slot, None)
        lost.sort(key=lambda t: t.seq)
        keep = [t.client_id for t in lost[1:]]
        if closed_at is not None:  # the round closed: its clients are late, not retried nor charged
            for t in lost:
                discard(t.client_id)
            keep = []
        elif lost and (not was_running or charge(lost[0], reason)):
            keep.insert(0, lost[0].client_id)
        queues[slot].extendleft(reversed(keep))
        private = rt.cfg.privacy.enabled or rt.cfg.secagg.enabled  # DP / SecAgg: counts, never client ids
        log.warning("round %d: client actor %d %s; replacing it and re-queueing %s", rnd, slot,
                    reason.split(" of client ")[0] if private else reason,
                    f"{len(keep)} clients" if private else f"clients {keep}")
        starting[rt.replace_actor(slot)] = (slot, time.monotonic())
        slot_free_at[slot] = math.inf  # its tasks' clocks start once it has started
        counters["actor_restarts"] += 1

    def running_since(slot: int) -> tuple[_Task, float] | None:
        """The task the slot's actor is running now, and since when (tasks queue behind it)."""
        tasks = [t for t in inflight.values() if t.slot == slot]
        if not tasks:
            return None
        oldest = min(tasks, key=lambda t: t.seq)
        return oldest, max(oldest.submitted, slot_free_at[slot])

    def probe(slot: int) -> None:
        reprobe_at.pop(slot, None)
        probes[rt.actors[slot].ping.remote()] = slot

    def probed(ref: Any) -> None:
        """A ping of an unavailable actor answered: alive again (its failed tasks are re-queued free),
        still unavailable (ping again soon, within UNAVAILABLE_WAIT_S), or dead (replaced, counted once)."""
        slot = probes.pop(ref)
        try:
            ray.get(ref)
        except ActorUnavailableError:
            reprobe_at[slot] = time.monotonic() + PROBE_EVERY_S
            return
        except RayActorError as err:
            lose_actor(slot, [], f"died during {method} of round {rnd} ({type(err).__name__}: its node or "
                                 f"process was lost)")
            submit(slot)
            return
        _, tasks = suspect.pop(slot)
        queues[slot].extendleft(reversed([t.client_id for t in sorted(tasks, key=lambda t: t.seq)]))
        log.warning("round %d: client actor %d answers again; re-queueing clients %s", rnd, slot,
                    [t.client_id for t in tasks])
        submit(slot)

    def started(ref: Any) -> None:
        """A replacement actor finished its start-up: one line saying where and how fast, and why if it had to
        encode images."""
        slot, since = starting.pop(ref)
        placed.discard(ref)
        slot_free_at[slot] = time.monotonic()  # started (or died: its tasks will say so)
        try:
            info = ray.get(ref)
        except RayError:
            return
        if info.get("encoded_images"):
            status(f"round {rnd}: replacement client actor {slot} on node {info.get('node_ip', '?')} encoded "
                   f"{info['encoded_images']} images in {time.monotonic() - since:.0f} s: that node's feature cache "
                   f"({info.get('cache_dir') or 'none'}) lacked them; give every node the same FEDPGP_CACHE_DIR "
                   f"on shared storage (or warm each node's cache: fedpgp-ray cache) so replacements start warm")
        else:
            status(f"round {rnd}: replacement client actor {slot} ready on node {info.get('node_ip', '?')} in "
                   f"{time.monotonic() - since:.0f} s (image features read from the cache {info.get('cache_dir')})")

    def check_placement(now: float) -> None:
        """PlacementError (one line) when a replacement's bundle is still unplaced after
        runtime.placement_timeout_s: a lost node and no spare capacity, which would otherwise stall for ever."""
        late = [(ref, slot) for ref, (slot, since) in starting.items()
                if ref not in placed and now - since > rt.rc.placement_timeout_s]
        if not late:
            return
        state = ray.util.placement_group_table(rt.pg).get("state", "?")
        if state == "CREATED":
            placed.update(ref for ref, _ in late)
            return
        free = {k: ray.available_resources().get(k, 0) for k in rt.bundle}
        have = {k: ray.cluster_resources().get(k, 0) for k in rt.bundle}
        raise PlacementError(
            f"round {rnd}: cannot place a replacement for client actor {late[0][1]} ({rt.bundle}) within "
            f"runtime.placement_timeout_s={rt.rc.placement_timeout_s:g}s after losing its node: the Ray cluster "
            f"has {have} ({free} free). Add a node or free resources, then continue with "
            f"`fedpgp-ray run --resume {rt.cfg.output_dir}` (completed rounds are checkpointed), or lower "
            f"runtime.num_actors / runtime.num_cpus_per_actor")

    for slot in range(rt.num_actors):
        submit(slot)
    def hung_at(since: float, limit: float) -> float:
        """When a task running since `since` counts as hung: `limit` later, or CLOSE_GRACE after the close."""
        if closed_at is None:
            return since + limit
        grace = limit if rt.slowest_compute_s == 0 else max(CLOSE_GRACE_MIN_S,
                                                             CLOSE_GRACE_FACTOR * rt.slowest_compute_s)
        return min(since + limit, max(since, closed_at) + grace)

    while inflight or suspect:
        limit = task_timeout(rt.rc.task_timeout_s, rt.slowest_task_s)
        # a replacement actor's start-up (process, backbone, features) is not a client task: it gets
        # at least the automatic floor, so a loaded node does not make every replacement "hang"
        startup_limit = max(limit, MIN_TASK_TIMEOUT_S)
        running = [r for r in map(running_since, range(rt.num_actors)) if r is not None]
        deadlines = [hung_at(since, limit) for _, since in running]
        deadlines += [since + startup_limit for _, since in starting.values()]
        deadlines += [close_by] if closed_at is None and close_by < math.inf else []
        deadlines += [*reprobe_at.values(), *(since + UNAVAILABLE_WAIT_S for since, _ in suspect.values())]
        deadlines += [since + rt.rc.placement_timeout_s + PLACEMENT_CHECK_S
                      for ref, (_, since) in starting.items() if ref not in placed]
        wait_s = min(deadlines, default=time.monotonic() + 60.0) - time.monotonic()
        ready, _ = ray.wait([*inflight, *starting, *probes], num_returns=1, timeout=min(max(wait_s, 0.0), 60.0))
        if ready and ready[0] in starting:
            started(ready[0])
            continue
        if ready and ready[0] in probes:
            probed(ready[0])
            continue
        if not ready:
            now = time.monotonic()
            if closed_at is None and now >= close_by:
                log.info("round %d: deadline of %.3g s reached with %d of %d clients reported", rnd,
                         close.deadline_s, len(results), close.target)
                close_round()
            check_placement(now)
            for slot in [s for s, at in reprobe_at.items() if at <= now]:
                probe(slot)
            for slot in [s for s, (since, _) in suspect.items() if now - since > UNAVAILABLE_WAIT_S]:
                ray.kill(rt.actors[slot], no_restart=True)
                lose_actor(slot, [], f"unreachable for {UNAVAILABLE_WAIT_S:.0f} s during {method} of round {rnd}")
                submit(slot)
            hung = [(task.slot, f"{method} of client {task.client_id}", hung_at(since, limit) - since, True)
                    for task, since in running if now > hung_at(since, limit)]
            hung += [(slot, "its start-up", startup_limit, False) for slot, since in starting.values()
                     if now - since > startup_limit]
            for slot, what, seconds, was_running in hung:
                counters["tasks_timed_out"] += 1
                for ref in [r for r, (s, _) in starting.items() if s == slot]:
                    del starting[ref]
                ray.kill(rt.actors[slot], no_restart=True)  # hung, not dead: end it
                lose_actor(slot, [], f"timed out after {seconds:.0f} s in {what}, round {rnd} "
                                     f"(runtime.task_timeout_s)", was_running)
                submit(slot)
            continue
        ref = ready[0]
        task = inflight.pop(ref)
        try:
            result = ray.get(ref)
            if method == "fit" and "fit_seconds" in result.metrics:
                rt.slowest_compute_s = max(rt.slowest_compute_s, result.metrics["fit_seconds"])
            if closed_at is not None or getattr(result, "late", False):
                discard(task.client_id, result, trained="steps" in result.metrics)
            else:
                results[task.client_id] = result
                if method == "fit":  # later tasks tell any actor which state is current (ClientWorker.state)
                    rt.state_round[task.client_id] = rnd
                if close is not None and len(results) >= close.target:
                    close_round()
            progress.client_done(len(results))
            now = time.monotonic()
            rt.slowest_task_s = max(rt.slowest_task_s, now - max(task.submitted, slot_free_at[task.slot]))
            slot_free_at[task.slot] = now
            if rt.faults.kill_after(method, rnd, task.client_id):
                log.warning("fault injection: killing the actor of slot %d after the %s of client %d",
                            task.slot, method, task.client_id)
                ray.kill(rt.actors[task.slot], no_restart=True)
        except ActorUnavailableError:
            # its node may be lost or only slow to answer: hold its tasks and probe it until it answers,
            # dies (then replaced once, its running client charged once) or UNAVAILABLE_WAIT_S passes
            if task.slot not in suspect:
                suspect[task.slot] = (time.monotonic(), [])
                probe(task.slot)
            suspect[task.slot][1].append(task)
            continue
        except RayActorError as err:
            # lose_actor drops every in-flight task of a replaced actor, so `task` is the current one's
            lose_actor(task.slot, [task], f"died during {method} of round {rnd}: {type(err).__name__}")
        except RayError as err:  # the task raised (RayTaskError) or its worker was lost
            slot_free_at[task.slot] = time.monotonic()
            cause = unwrap(err) if isinstance(err, RayTaskError) else err
            if isinstance(cause, StorageError):  # unshared storage, a lost client state: never retried
                raise cause from None
            if closed_at is not None:
                discard(task.client_id)
            elif charge(task, f"{method} raised {type(cause).__name__}: {cause}".splitlines()[0]):
                queues[task.slot].appendleft(task.client_id)
        submit(task.slot)
    counters["clients_failed"] = float(len(failures))
    _settle(closers)
    results.update(late)
    done = [results[c] for c in sorted(results)]
    return done, [failures[c] for c in sorted(failures)], counters


def _settle(closers: list[Any]) -> None:
    """Collect the round-closing calls that have answered (one to a dead actor fails: nothing to do)."""
    ready, _ = ray.wait(closers, num_returns=len(closers), timeout=0) if closers else ([], [])
    for ref in ready:
        try:
            ray.get(ref)
        except RayError:
            pass
