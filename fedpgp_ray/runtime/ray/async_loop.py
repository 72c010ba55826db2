"""Asynchronous tasks on the actor pool (federation.mode async, FedBuff): submitted one at a time, collected
in finishing order through `ray.wait`.

Each actor runs at most ceil(concurrency / num_actors) tasks at a time (one running, the rest queued in its
mailbox); more wait here and go to the first actor with room, its clients' home actor on ties. A dead actor
(`RayActorError`, which includes an unavailable one: an asynchronous run does not wait for a node to answer
again) or a hung one (its running task past `runtime.task_timeout_s`, see `task_timeout`) is killed and
replaced in its slot; each of its tasks comes back as a TaskDone without result: the running one charged
to its client, the queued ones free. The federation loop re-queues those clients; every other task,
finished or running elsewhere, is untouched.
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Hashable

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from fedpgp_ray.algorithms import Params
from fedpgp_ray.errors import user_errors
from fedpgp_ray.runtime.base import AsyncExecutor, TaskDone
from fedpgp_ray.runtime.ray.actors import unwrap
from fedpgp_ray.runtime.ray.dispatch import MIN_TASK_TIMEOUT_S, ActorPool, task_timeout
from fedpgp_ray.storage import StorageError

log = logging.getLogger("fedpgp_ray.runtime.ray")


@dataclass
class _Task:
    key: Hashable
    method: str
    client_id: int
    rnd: int
    params_ref: Any
    slot: int = -1
    seq: int = 0
    submitted: float = 0.0


class RayAsyncExecutor(AsyncExecutor):
    """`AsyncExecutor` over a RayRuntime's actors (see the module docstring)."""

    def __init__(self, rt: ActorPool, concurrency: int) -> None:
        self.rt = rt
        self.per_actor = max(math.ceil(concurrency / rt.num_actors), 1)
        self.waiting: deque[_Task] = deque()
        self.inflight: dict[Any, _Task] = {}
        self.starting: dict[Any, tuple[int, float]] = {}  # replacement actor's start-up -> (slot, since)
        self.slot_free_at = {s: time.monotonic() for s in range(rt.num_actors)}  # its last task's end
        self.done: deque[TaskDone] = deque()
        self.counts: Counter[str] = Counter()
        self._last_params: tuple[Any, Any] = (None, None)  # (params object, its object-store reference)

    def counters(self) -> dict[str, float]:
        return {k: float(self.counts[k]) for k in ("actor_restarts", "tasks_timed_out")}

    def submit(self, key: Hashable, method: str, client_id: int, rnd: int, global_params: Params) -> None:
        if self._last_params[0] is not global_params:  # one copy per global version, shared by its tasks
            self._last_params = (global_params, ray.put(global_params))
        self.waiting.append(_Task(key, method, client_id, rnd, self._last_params[1]))
        self._dispatch()

    def _load(self, slot: int) -> int:
        return sum(t.slot == slot for t in self.inflight.values())

    def _dispatch(self) -> None:
        while self.waiting:
            loads = {s: self._load(s) for s in range(self.rt.num_actors)}
            task = self.waiting[0]
            home = self.rt.slot_of(task.client_id)
            slot = min(loads, key=lambda s: (loads[s], s != home, s))
            if loads[slot] >= self.per_actor:
                return
            self.waiting.popleft()
            faults = self.rt.faults
            ref = getattr(self.rt.actors[slot], task.method).remote(
                task.client_id, task.rnd, task.params_ref, faults.fault_for(task.method, task.rnd, task.client_id, 0),
                self.rt.state_round.get(task.client_id))
            self.rt.task_seq += 1
            task.slot, task.seq, task.submitted = slot, self.rt.task_seq, time.monotonic()
            self.inflight[ref] = task
            if task.method == "fit" and (task.rnd, task.client_id) in faults.kill - faults.fired:
                faults.fired.add((task.rnd, task.client_id))
                log.warning("fault injection: killing the actor of slot %d while task %d (client %d) is in flight",
                            slot, task.rnd, task.client_id)
                ray.kill(self.rt.actors[slot], no_restart=True)

    def _running(self, slot: int) -> tuple[_Task, float] | None:
        """The task the slot's actor runs now, and since when (the others queue behind it)."""
        tasks = [t for t in self.inflight.values() if t.slot == slot]
        if not tasks:
            return None
        oldest = min(tasks, key=lambda t: t.seq)
        return oldest, max(oldest.submitted, self.slot_free_at[slot])

    def _lose(self, slot: int, reason: str, lost: list[_Task], was_running: bool = True) -> None:
        """Replace the actor of `slot`; each of its tasks comes back without result (see the module docstring)."""
        lost = sorted(lost + [t for t in self.inflight.values() if t.slot == slot], key=lambda t: t.seq)
        for ref in [r for r, t in self.inflight.items() if t.slot == slot]:
            del self.inflight[ref]
        for ref in [r for r, (s, _) in self.starting.items() if s == slot]:
            del self.starting[ref]
        for i, task in enumerate(lost):
            self.done.append(TaskDone(task.key, error=reason, charged=was_running and i == 0))
        log.warning("async: client actor %d %s; replacing it and re-queueing clients %s", slot, reason,
                    [t.client_id for t in lost])
        self.starting[self.rt.replace_actor(slot)] = (slot, time.monotonic())
        self.slot_free_at[slot] = math.inf  # its tasks' clocks start once it has started
        self.counts["actor_restarts"] += 1

    def next_done(self) -> TaskDone:
        while not self.done:
            self._dispatch()
            if not self.inflight and not self.starting:
                raise RuntimeError("next_done: no task in flight")
            self._wait_one()
        return self.done.popleft()

    def _wait_one(self) -> None:
        limit = task_timeout(self.rt.rc.task_timeout_s, self.rt.slowest_task_s)
        startup_limit = max(limit, MIN_TASK_TIMEOUT_S)  # a replacement's start-up is not a client task
        running = [r for r in map(self._running, range(self.rt.num_actors)) if r is not None]
        deadlines = [since + limit for _, since in running] + [since + startup_limit for _, since in self.starting.values()]
        wait_s = min(deadlines, default=time.monotonic() + 60.0) - time.monotonic()
        ready, _ = ray.wait([*self.inflight, *self.starting], num_returns=1, timeout=min(max(wait_s, 0.0), 60.0))
        now = time.monotonic()
        if not ready:
            hung = [(t.slot, f"timed out after {limit:.0f} s in the {t.method} of client {t.client_id}", True)
                    for t, since in running if now - since > limit]
            hung += [(slot, f"timed out after {startup_limit:.0f} s in its start-up", False)
                     for slot, since in self.starting.values() if now - since > startup_limit]
            for slot, reason, was_running in hung:
                self.counts["tasks_timed_out"] += 1
                ray.kill(self.rt.actors[slot], no_restart=True)  # hung, not dead: end it
                self._lose(slot, f"{reason} (runtime.task_timeout_s)", [], was_running)
            return
        ref = ready[0]
        if ref in self.starting:
            slot, _ = self.starting.pop(ref)
            self.slot_free_at[slot] = now
            return
        task = self.inflight.pop(ref)
        try:
            result = ray.get(ref)
        except RayActorError as err:  # dead, or unavailable (its node lost or partitioned)
            self._lose(task.slot, f"died during the {task.method} of client {task.client_id} "
                                  f"({type(err).__name__})", [task])
            return
        except RayError as err:  # the task raised (RayTaskError) or its worker was lost
            self.slot_free_at[task.slot] = now
            cause = unwrap(err) if isinstance(err, RayTaskError) else err
            if isinstance(cause, (StorageError, *user_errors())):  # bad storage or input: never retried
                raise cause from None
            self.done.append(TaskDone(task.key, error=f"{task.method} raised {type(cause).__name__}: "
                                                      f"{cause}".splitlines()[0]))
            return
        if task.method == "fit":  # later tasks tell any actor which saved state is current
            self.rt.state_round[task.client_id] = task.rnd
        self.rt.slowest_task_s = max(self.rt.slowest_task_s, now - max(task.submitted, self.slot_free_at[task.slot]))
        self.slot_free_at[task.slot] = now
        self.done.append(TaskDone(task.key, result))
        if self.rt.faults.kill_after(task.method, task.rnd, task.client_id):
            log.warning("fault injection: killing the actor of slot %d after the %s of client %d",
                        task.slot, task.method, task.client_id)
            ray.kill(self.rt.actors[task.slot], no_restart=True)
