"""The runtime interface: where and how client work runs (in-process, Ray actors, ...)."""
from __future__ import annotations

import math
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Hashable

from fedpgp_ray.algorithms import Params
from fedpgp_ray.client import EvalResult, FitResult
from fedpgp_ray.checkpoint import CheckpointStore
from fedpgp_ray.config import RuntimeConfig
from fedpgp_ray.server import Server
from fedpgp_ray.strategy import ClientFailure, FedAvgStrategy, RoundClose


def status(message: str) -> None:
    """A start-up step (Ray, actors, backbone, image features), on stderr beside the progress bar."""
    print(message, file=sys.stderr, flush=True)


PROGRESS_EVERY_S = 10.0  # a round that takes longer says how far it is, at most this often


class RoundProgress:
    """`round 3 fit: 4/10 clients done (42 s)` on stderr as clients finish, at most every `every_s`
    seconds: silent in short rounds, a sign of life in long ones (counts only: never a loop over clients)."""

    def __init__(self, rnd: int, phase: str, total: int, every_s: float | None = None) -> None:
        self.rnd, self.phase, self.total = rnd, phase, total
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.began = self.last = time.monotonic()

    def client_done(self, done: int) -> None:
        now = time.monotonic()
        if done < self.total and now - self.last >= self.every_s:
            status(f"round {self.rnd} {self.phase}: {done}/{self.total} clients done ({now - self.began:.0f} s)")
            self.last = now


def worker_threads(rc: RuntimeConfig) -> int:
    """Torch threads of one worker (a Ray client actor, or the in-process worker), from the CPUs it
    was given: `threads_per_worker` when set, else floor(num_cpus_per_actor), at least 1. Never
    torch's default (every core per process), which oversubscribes a machine running several
    workers or other jobs: spinning OpenMP threads then slow a round down many times."""
    return rc.threads_per_worker or max(int(math.floor(rc.num_cpus_per_actor)), 1)


@dataclass
class TaskDone:
    """A finished asynchronous task (federation.mode async): its result, or why it has none.

    charged: the failure is the client's (its task raised, or ran when its actor died or hung); False when
    it only waited behind another client on a lost actor. Either way the task left nothing behind.
    """
    key: Hashable
    result: Any = None
    error: str = ""
    charged: bool = True


class AsyncExecutor(ABC):
    """Client tasks submitted one at a time and collected as they finish, in finishing order (FedBuff)."""

    @abstractmethod
    def submit(self, key: Hashable, method: str, client_id: int, rnd: int, global_params: Params) -> None:
        """Start `method` ("fit" / "evaluate") of `client_id`; `rnd` numbers it (the task id for a fit:
        seeds its training, versions its saved state). `key` names it in the TaskDone."""

    @abstractmethod
    def next_done(self) -> TaskDone:
        """Block until a submitted task finishes (or is lost); each submitted key comes back exactly once."""

    def counters(self) -> dict[str, float]:
        """Fault counters so far (actor_restarts, tasks_timed_out)."""
        return {}

    def close(self) -> None:
        """Stop collecting: tasks still running are abandoned (their results are never applied)."""


class Runtime(ABC):
    """Runs clients' fit and evaluate; holds their personal state between rounds.

    Implementations must give the same results for the same config and seed: all randomness
    is seeded per (seed, round, client), never by which worker serves a client.
    """

    @abstractmethod
    def initial_global_params(self) -> Params:
        """The seeded initial global parameters."""

    def make_server(self, strategy: FedAvgStrategy, store: CheckpointStore | None, resume: bool) -> Server:
        """The run's server (in-process by default; a runtime may host it elsewhere behind the same methods)."""
        return Server.resume_or_start(strategy, self.initial_global_params(), store, resume)

    @abstractmethod
    def fit(self, rnd: int, client_ids: list[int], global_params: Params, close: RoundClose | None = None
            ) -> tuple[list[FitResult], list[ClientFailure]]:
        """Train the given clients from `global_params`; results sorted by client id.

        close (deadline mode): stop waiting once `close.target` clients reported or `close.deadline_s`
        passed; every other sampled client that did not fail comes back as a late FitResult (`late=True`).
        """

    @abstractmethod
    def evaluate(self, rnd: int, client_ids: list[int], global_params: Params
                 ) -> tuple[list[EvalResult], list[ClientFailure]]:
        """Evaluate the given clients' classifiers; results sorted by client id."""

    def secagg_exchange(self, rnd: int, stage: str, requests: dict[int, Any]) -> dict[int, Any]:
        """Deliver the server's SecAgg `stage` message to each client and return the answers of those that
        answered (a client that died or failed is absent: a dropout). See fedpgp_ray.secagg.protocol."""
        raise NotImplementedError(f"{type(self).__name__} does not run secure aggregation")

    def async_executor(self, concurrency: int) -> AsyncExecutor:
        """The executor of an asynchronous run with at most `concurrency` fits in flight (docs/ASYNC.md)."""
        raise NotImplementedError(f"{type(self).__name__} does not run federation.mode async")

    @abstractmethod
    def forget_states(self) -> None:
        """Drop the client states held in memory (after a rollback they are restored from the store)."""

    def dataset_manifest(self) -> dict | None:
        """What the clients loaded (ClientWorker.dataset_manifest), for results.json; None if unknown."""
        return None

    def close(self) -> None:
        """Release workers and resources."""

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
