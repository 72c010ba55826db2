"""The runtime interface: where and how client work runs (in-process, Ray actors, ...)."""
from __future__ import annotations

import sys
from abc import ABC, abstractmethod

from fedpgp_ray.algorithms import Params
from fedpgp_ray.client import EvalResult, FitResult
from fedpgp_ray.checkpoint import CheckpointStore
from fedpgp_ray.server import Server
from fedpgp_ray.strategy import ClientFailure, FedAvgStrategy


def status(message: str) -> None:
    """A start-up step (Ray, actors, backbone, image features), on stderr beside the progress bar."""
    print(message, file=sys.stderr, flush=True)


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
    def fit(self, rnd: int, client_ids: list[int], global_params: Params
            ) -> tuple[list[FitResult], list[ClientFailure]]:
        """Train the given clients from `global_params`; results sorted by client id."""

    @abstractmethod
    def evaluate(self, rnd: int, client_ids: list[int], global_params: Params
                 ) -> tuple[list[EvalResult], list[ClientFailure]]:
        """Evaluate the given clients' classifiers; results sorted by client id."""

    def dataset_manifest(self) -> dict | None:
        """What the clients loaded (ClientWorker.dataset_manifest), for results.json; None if unknown."""
        return None

    def close(self) -> None:
        """Release workers and resources."""

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
