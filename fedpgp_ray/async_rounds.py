"""The asynchronous federation loop (federation.mode async: FedBuff, docs/ASYNC.md).

Up to `concurrency` clients train at once; each fit is a task with its own id (it seeds the training and
versions the client's saved state) and is sent the newest global prompt. As each upload arrives the
`FedBuffServer` buffers it (or drops it, too stale); every K buffered updates the server steps, and each
step is reported (a "round" of the history, MLflow and the progress bar) and checkpointed. Evaluation runs
every `eval_every_steps` steps: dispatch pauses, the evaluated clients run on the same workers, fits that
finish meanwhile are held and taken in their order afterwards.

Crash and `--resume`: a checkpoint is written after every server step (global prompt, step, history). A
resumed run continues from the newest one; the updates buffered after it and the tasks then in flight are
discarded, never applied (no update is applied twice). Their clients keep their personal training, as a
client whose update was dropped for staleness does. Task ids are leased in blocks from the run storage
(`async_tasks.json`), so a resumed run numbers its tasks above every task started before the crash and
never reuses a client-state file.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter, deque
from dataclasses import asdict
from typing import Any

import numpy as np

from fedpgp_ray.checkpoint import ROLLBACK_FILE, CheckpointStore, ClientStateDamaged
from fedpgp_ray.config import ExperimentConfig
from fedpgp_ray.fedbuff import (Applied, FedBuffServer, concurrency, eval_every_steps, staleness_histogram,
                                staleness_summary)
from fedpgp_ray.federation import RoundListener, RoundReport, num_rounds, results_document
from fedpgp_ray.runtime.base import AsyncExecutor, Runtime, TaskDone
from fedpgp_ray.strategy import FedAvgStrategy, RoundFailedError

log = logging.getLogger(__name__)

LEASE_FILE = "async_tasks.json"
LEASE_BLOCK = 256  # task ids reserved per write of the lease file


class TaskLease:
    """Fit task ids 1, 2, ...; every id handed out is first covered by the lease file, so a resumed run
    starts above every id its crashed predecessor could have used (None store: nothing is persisted)."""

    def __init__(self, store: CheckpointStore | None) -> None:
        self.store = store
        self.reserved = 0
        if store is not None:
            try:
                self.reserved = int(json.loads(store.storage.read_text(LEASE_FILE))["reserved"])
            except FileNotFoundError:
                pass
        self.next = self.reserved + 1

    def take(self) -> int:
        if self.next > self.reserved:
            self.reserved = self.next + LEASE_BLOCK - 1
            if self.store is not None:
                self.store.storage.write_text(LEASE_FILE, json.dumps({"reserved": self.reserved}))
        self.next += 1
        return self.next - 1


def pick_client(seed: int, task_id: int, num_clients: int, unavailable: set[int]) -> int:
    """The client of fit task `task_id`: uniform over the federation, seeded by (seed, task), redrawn while it
    is training or dropped (`unavailable` holds at most concurrency + dropped clients, never the population)."""
    rng = np.random.default_rng([seed, 31, task_id])
    while True:
        cid = int(rng.integers(num_clients))
        if cid not in unavailable:
            return cid


def run_async_federation(cfg: ExperimentConfig, runtime: Runtime, store: CheckpointStore | None = None,
                         listeners: list[RoundListener] = (), resume: bool = False) -> dict[str, Any]:
    """Run (or resume) an asynchronous experiment; the results document, as `run_federation`'s."""
    try:
        return AsyncRun(cfg, runtime, store, list(listeners), resume).run()
    except ClientStateDamaged as err:
        if store is not None:  # rollbacks redo synchronous rounds; here the damaged file is already set aside
            store.storage.delete(ROLLBACK_FILE)
        raise ClientStateDamaged(f"{str(err).split('; the run')[0]}: resume the run (`fedpgp-ray run --resume "
                                 f"{cfg.output_dir}`) and that client continues from its previous saved state") from None


class AsyncRun:
    """One session of an asynchronous run (see the module docstring)."""

    def __init__(self, cfg: ExperimentConfig, runtime: Runtime, store: CheckpointStore | None,
                 listeners: list[RoundListener], resume: bool) -> None:
        self.cfg, self.runtime, self.store, self.listeners = cfg, runtime, store, listeners
        ev = cfg.evaluation
        self.total_steps = num_rounds(cfg)
        self.evaluator = FedAvgStrategy(cfg.federation.num_clients, cfg.federation.client_fraction, 1,
                                        eval_every_steps(cfg), self.total_steps, cfg.seed, None, ev.client_fraction,
                                        ev.num_clients, ev.final == "all")
        saved = store.latest_server() if (resume and store is not None) else None
        params = saved["global_params"] if saved else runtime.initial_global_params()
        self.server = FedBuffServer(params, cfg.fedbuff, saved["round"] if saved else 0)
        self.history: list[dict[str, Any]] = list(saved["history"]) if saved else []
        state = (saved or {}).get("async", {})
        self.wall_before = float(state.get("wall_seconds", 0.0))  # wall time of earlier sessions
        self.eval_seconds = float(state.get("eval_seconds", 0.0))  # of it, in evaluation phases
        self.totals: Counter[str] = Counter(state.get("totals", {}))
        self.since_eval: Counter[int] = Counter({int(k): v for k, v in state.get("since_eval", {}).items()})
        self.steps_since_eval = int(state.get("steps_since_eval", 0))
        self.resumed_from = saved["round"] if saved else None
        self.lease = TaskLease(store)
        self.concurrency = concurrency(cfg)
        self.fits: dict[int, int] = {}  # in-flight fit task -> client
        self.requeue: deque[int] = deque()
        self.attempts: Counter[int] = Counter()
        self.dropped: dict[int, str] = {}  # clients dropped from the run (failed every attempt) -> why
        self.step_dropped: dict[int, str] = {}
        self.step_counts: Counter[str] = Counter()
        self.held: deque[TaskDone] = deque()  # fits that finished during an evaluation
        self.began = self.last_report = time.perf_counter()

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.began

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        if self.resumed_from is not None:
            log.warning("resume: continuing after server step %d; updates buffered or in flight after it are "
                        "discarded (never applied)", self.resumed_from)
        self.executor: AsyncExecutor = self.runtime.async_executor(self.concurrency)
        try:
            if self.resumed_from is None:
                self.report(0, [])
            while self.server.step < self.total_steps:
                self.fill()
                done = self.held.popleft() if self.held else self.executor.next_done()
                applied = self.take_fit(done)
                if applied is not None:
                    self.report(self.server.step, applied)
        finally:
            self.executor.close()
        reports = [RoundReport(h["round"], h["metrics"], h["clients"], h.get("dropped", {})) for h in self.history]
        doc = results_document(self.cfg, reports, self.wall(), self.runtime.dataset_manifest())
        doc["async"] = {**{k: float(v) for k, v in self.totals.items()}, "server_steps": self.server.step,
                        "resumed_from_step": self.resumed_from}
        return doc

    def fill(self) -> None:
        """Start fits until `concurrency` are in flight: re-queued clients first, then seeded draws."""
        busy = set(self.fits.values())
        while len(self.fits) < self.concurrency:
            while self.requeue and self.requeue[0] in busy:
                self.requeue.popleft()
            unavailable = busy | set(self.dropped)
            if not self.requeue and len(unavailable) >= self.cfg.federation.num_clients:
                if not self.fits and not self.held:
                    raise RoundFailedError(f"step {self.server.step}: every client was dropped "
                                           f"({len(self.dropped)} failed every attempt): nothing left to train")
                return
            tid = self.lease.take()
            cid = self.requeue.popleft() if self.requeue else pick_client(
                self.cfg.seed, tid, self.cfg.federation.num_clients, unavailable)
            _, params = self.server.send(tid)
            self.executor.submit(("fit", tid), "fit", cid, tid, params)
            self.fits[tid] = cid
            busy.add(cid)

    def take_fit(self, done: TaskDone) -> list[Applied] | None:
        """Buffer a finished fit, or re-queue (or drop) the client of a failed one."""
        tid = done.key[1]
        cid = self.fits.pop(tid)
        if done.result is None:
            self.server.forget(tid)
            self.retry_or_drop(cid, done)
            return None
        self.attempts.pop(cid, None)
        self.totals["updates_received"] += 1
        self.step_counts["received"] += 1
        dropped_before = self.server.stale_dropped
        applied = self.server.receive(tid, cid, done.result.params, done.result.metrics)
        if self.server.stale_dropped > dropped_before:
            self.totals["updates_stale_dropped"] += 1
        return applied

    def retry_or_drop(self, cid: int, done: TaskDone) -> None:
        if done.charged:
            self.attempts[cid] += 1
        if self.attempts[cid] > self.cfg.runtime.max_client_retries:
            reason = f"fit: {done.error} (dropped after {self.attempts[cid]} attempts)"
            self.dropped[cid] = self.step_dropped[cid] = reason
            log.warning("client %d dropped from the run: %s", cid, reason)
            return
        self.requeue.appendleft(cid)
        self.totals["tasks_requeued"] += 1
        self.step_counts["requeued"] += 1

    # -- reporting ------------------------------------------------------------------------------------
    def report(self, step: int, applied: list[Applied]) -> None:
        """Step `step`'s report (evaluated when due), checkpointed, then shown to the listeners."""
        metrics: dict[str, float] = {}
        clients: dict[int, dict[str, float]] = {}
        if step > 0:
            self.totals["updates_applied"] += len(applied)
            self.steps_since_eval += 1
            metrics.update({"updates_applied": float(len(applied)), **staleness_summary(applied),
                            "async/updates_received": float(self.step_counts["received"]),
                            "async/updates_stale_dropped": float(self.server.stale_dropped),
                            "async/tasks_requeued": float(self.step_counts["requeued"]),
                            "async/in_flight": float(self.server.in_flight())})
            for key in sorted({k for a in applied for k in a.metrics}):
                values = [a.metrics[key] for a in applied if key in a.metrics]
                metrics[f"train_{key}"] = float(np.mean(values))
            for a in applied:
                clients[a.client_id] = {f"train_{k}": v for k, v in a.metrics.items()}
            self.since_eval.update(self.server.staleness_seen)
            self.server.staleness_seen.clear()
            self.server.stale_dropped = 0
            self.step_counts.clear()
        if step == self.total_steps and step > 0:
            metrics["async/updates_discarded_at_end"] = float(self.drain())
        eval_ids = self.evaluator.configure_evaluate(step)
        if eval_ids is not None:
            began = time.perf_counter()
            results = self.evaluate(step, eval_ids)
            metrics["evaluate_phase_seconds"] = time.perf_counter() - began
            self.eval_seconds += metrics["evaluate_phase_seconds"]
            metrics.update(self.evaluator.aggregate_evaluate(step, results))
            for r in results:
                clients.setdefault(r.client_id, {}).update(r.metrics)
            if step > 0:
                metrics.update(staleness_histogram(self.since_eval, self.cfg.fedbuff.max_staleness))
                metrics["async/received_per_step"] = sum(self.since_eval.values()) / self.steps_since_eval
            self.since_eval.clear()
            self.steps_since_eval = 0
        metrics.update({f"async/{k}": v for k, v in self.executor.counters().items()})
        dropped, self.step_dropped = self.step_dropped, {}
        metrics["clients_dropped"] = float(len(dropped))
        for cid in dropped:
            clients.setdefault(cid, {})["dropped"] = 1.0
        metrics["wall_seconds"] = self.wall()
        metrics["train_wall_seconds"] = metrics["wall_seconds"] - self.eval_seconds  # the sync runs' measure
        metrics["round_seconds"] = time.perf_counter() - self.last_report
        self.last_report = time.perf_counter()
        report = RoundReport(step, metrics, clients, dropped)
        self.history.append({**asdict(report), "applied": [[a.client_id, a.task_id, a.staleness] for a in applied]})
        if self.store is not None:
            state = {"wall_seconds": metrics["wall_seconds"], "eval_seconds": self.eval_seconds, "totals": dict(self.totals),
                     "since_eval": dict(self.since_eval), "steps_since_eval": self.steps_since_eval}
            self.store.save_server(step, {"global_params": self.server.params, "history": self.history,
                                          "async": state})
        for listener in self.listeners:
            listener.on_round(report, self.server.params)

    def drain(self) -> int:
        """After the last step: wait for the fits still in flight and discard them (never applied), so the final
        evaluation and the saved personal states are the clients' last ones. Returns how many were discarded."""
        discarded = 0
        while self.fits:
            done = self.held.popleft() if self.held else self.executor.next_done()
            self.server.forget(done.key[1])
            del self.fits[done.key[1]]
            discarded += done.result is not None
        self.totals["updates_discarded_at_end"] += discarded
        return discarded

    def evaluate(self, step: int, client_ids: list[int]) -> list[Any]:
        """Evaluate `client_ids` with the current global prompt on the async workers; no fit starts meanwhile,
        fits that finish are held. A client whose evaluation fails every attempt is left out (and reported)."""
        newest = self.lease.next - 1  # every saved client state so far has a task id <= this
        params = self.server.params
        pending = set(client_ids)
        for cid in client_ids:
            self.executor.submit(("evaluate", cid), "evaluate", cid, newest, params)
        results, attempts = {}, Counter()
        while pending:
            done = self.executor.next_done()
            if done.key[0] == "fit":
                self.held.append(done)
                continue
            cid = done.key[1]
            if done.result is not None:
                results[cid] = done.result
                pending.discard(cid)
                continue
            attempts[cid] += 1 if done.charged else 0
            if attempts[cid] > self.cfg.runtime.max_client_retries:
                self.step_dropped.setdefault(cid, f"evaluate: {done.error}")
                pending.discard(cid)
            else:
                self.executor.submit(("evaluate", cid), "evaluate", cid, newest, params)
        return [results[c] for c in sorted(results)]
