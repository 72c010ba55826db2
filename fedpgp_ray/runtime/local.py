"""In-process runtime: one ClientWorker runs every client in turn (debugging, tests, laptops)."""
from __future__ import annotations

import threading
from collections import deque
from typing import Any, Hashable

import torch

from fedpgp_ray.algorithms import Params
from fedpgp_ray.checkpoint import CheckpointStore
from fedpgp_ray.client import ClientWorker, EvalResult, FitResult
from fedpgp_ray.config import ExperimentConfig
from fedpgp_ray.runtime.base import AsyncExecutor, RoundProgress, Runtime, TaskDone, status, worker_threads
from fedpgp_ray.strategy import ClientFailure, RoundClose


class LocalRuntime(Runtime):
    """Sequential clients in this process, with the torch threads its resources give
    (`worker_threads`: runtime.threads_per_worker, else floor(runtime.num_cpus_per_actor))."""

    def __init__(self, cfg: ExperimentConfig, store: CheckpointStore | None, cache_dir: str | None) -> None:
        torch.set_num_threads(worker_threads(cfg.runtime))
        status("local runtime: loading the backbone, reading (or encoding, once) the image features")
        self.worker = ClientWorker(cfg, store=store, cache_dir=cache_dir)
        self.worker.prepare()

    def dataset_manifest(self) -> dict:
        return self.worker.dataset_manifest()

    def initial_global_params(self) -> Params:
        return self.worker.global_params()

    def forget_states(self) -> None:
        self.worker.forget_states()

    def fit(self, rnd: int, client_ids: list[int], global_params: Params, close: RoundClose | None = None
            ) -> tuple[list[FitResult], list[ClientFailure]]:
        if close is None:
            return self._each(rnd, "fit", client_ids, lambda cid: self.worker.fit(cid, rnd, global_params)), []
        # deadline mode, clients in turn: a timer closes the round at its deadline (cutting a straggler's
        # wait short), and it closes once close.target reported; the clients after that do not start
        closing = self.worker.closing
        timer = threading.Timer(close.deadline_s, closing.close, args=(rnd,)) if close.deadline_s else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        reported = 0

        def work(cid: int) -> FitResult:
            nonlocal reported
            if reported >= close.target:
                closing.close(rnd)
            result = self.worker.fit(cid, rnd, global_params)
            reported += not result.late
            return result

        try:
            return self._each(rnd, "fit", client_ids, work), []
        finally:
            if timer is not None:
                timer.cancel()
            closing.close(rnd)

    def evaluate(self, rnd: int, client_ids: list[int], global_params: Params
                 ) -> tuple[list[EvalResult], list[ClientFailure]]:
        return self._each(rnd, "evaluate", client_ids, lambda cid: self.worker.evaluate(cid, rnd, global_params)), []

    @staticmethod
    def _each(rnd: int, phase: str, client_ids: list[int], work) -> list:
        progress, done = RoundProgress(rnd, phase, len(client_ids)), []
        for cid in client_ids:
            done.append(work(cid))
            progress.client_done(len(done))
        return done

    def async_executor(self, concurrency: int) -> AsyncExecutor:
        return LocalAsyncExecutor(self.worker)

    def secagg_exchange(self, rnd: int, stage: str, requests: dict[int, Any]) -> dict[int, Any]:
        return self.worker.secagg_batch(rnd, stage, requests)


class LocalAsyncExecutor(AsyncExecutor):
    """FedBuff in one process, as a deterministic simulation of clients of equal speed: tasks finish in
    the order they started (each runs when it is collected, from the parameters it was sent). Staleness
    comes from concurrency, as on a pool of identical workers; speed differences need the Ray runtime."""

    def __init__(self, worker: ClientWorker) -> None:
        self.worker = worker
        self.queue: deque[tuple[Hashable, str, int, int, Any]] = deque()

    def submit(self, key: Hashable, method: str, client_id: int, rnd: int, global_params: Any) -> None:
        self.queue.append((key, method, client_id, rnd, global_params))

    def next_done(self) -> TaskDone:
        key, method, client_id, rnd, params = self.queue.popleft()
        return TaskDone(key, getattr(self.worker, method)(client_id, rnd, params))
