"""The server of a run: holds the global parameters, aggregates uploads, checkpoints each round.

In-process it is a plain object; the Ray runtime hosts the same class in a server actor.
"""
from __future__ import annotations

from typing import Any

from fedpgp_ray.algorithms import Params
from fedpgp_ray.checkpoint import CheckpointStore
from fedpgp_ray.client import EvalResult, FitResult
from fedpgp_ray.secagg.protocol import STAGES, SecAggAbort, SecAggServer
from fedpgp_ray.strategy import ClientFailure, FedAvgStrategy, RoundFailedError


class Server:
    """Global params + strategy aggregation + atomic per-round checkpoints.

    history: the JSON-ready reports of completed rounds (restored on resume).
    """

    def __init__(self, strategy: FedAvgStrategy, global_params: Params, store: CheckpointStore | None = None,
                 completed_round: int = -1, history: list[dict[str, Any]] | None = None) -> None:
        self.strategy = strategy
        self.params = global_params
        self.store = store
        self.completed_round = completed_round
        self.history = list(history or [])
        self.secagg: SecAggServer | None = None  # the SecAgg server state of the round in progress
        # under DP / SecAgg the published history names no clients; the server's own checkpoint keeps the
        # round each client first trained in (what CheckpointStore.trained_before needs), and nothing else
        self.first_trained: dict[int, int] = {}

    @classmethod
    def resume_or_start(cls, strategy: FedAvgStrategy, initial: Params, store: CheckpointStore | None,
                        resume: bool) -> "Server":
        """Continue from the store's newest server checkpoint when resuming, else start at round 0."""
        saved = store.latest_server() if (resume and store is not None) else None
        if saved is None:
            return cls(strategy, initial, store)
        server = cls(strategy, saved["global_params"], store, saved["round"], saved["history"])
        server.first_trained = dict(saved.get("first_trained", {}))
        return server

    def global_params(self) -> Params:
        return self.params

    def start_round(self) -> int:
        return self.completed_round + 1

    def get_history(self) -> list[dict[str, Any]]:
        return self.history

    def aggregate_train(self, rnd: int, results: list[FitResult], failures: list[ClientFailure]) -> dict[str, float]:
        secure = None
        if self.strategy.secagg is not None and self.params and (results or self.secagg is not None):
            done, self.secagg = self.secagg, None  # the uploads are masked: use the unmasked sum
            if done is None or done.total is None:
                raise RoundFailedError(f"round {rnd}: secure aggregation did not complete: nothing aggregated")
            secure = (done.signed_sum(), len(done.survivors), done.setup)
        self.params, metrics = self.strategy.aggregate_train(rnd, self.params, results, failures, secure)
        if self.strategy.private_ids:
            for r in results:
                self.first_trained.setdefault(r.client_id, rnd)
        return metrics

    # -- secure aggregation: the server's side; the runtime carries the messages to and from clients ----
    def secagg_start(self, rnd: int, clients: list[int]) -> dict[int, Any]:
        """Set up round `rnd`'s SecAgg among `clients`; returns the first stage's message per client."""
        dim = sum(v.numel() for v in self.params.values())
        self.secagg = SecAggServer(self.strategy.secagg_setup(rnd, clients, dim))
        return self.secagg.requests(STAGES[0])

    def secagg_step(self, stage: str, responses: dict[int, Any]) -> dict[int, Any] | None:
        """Take the clients' answers to `stage`; returns the next stage's messages (None after the last).
        Too few survivors or shares: RoundFailedError, nothing unmasked."""
        try:
            self.secagg.receive(stage, responses)
        except SecAggAbort as err:
            self.secagg = None
            raise RoundFailedError(str(err)) from None
        following = STAGES.index(stage) + 1
        return self.secagg.requests(STAGES[following]) if following < len(STAGES) else None

    def aggregate_evaluate(self, rnd: int, results: list[EvalResult]) -> dict[str, float]:
        return self.strategy.aggregate_evaluate(rnd, results)

    def finish_round(self, rnd: int, report: dict[str, Any]) -> None:
        """Record the round and checkpoint global params + history atomically."""
        self.history.append(report)
        self.completed_round = rnd
        if self.store is not None:
            extra = {"first_trained": self.first_trained} if self.first_trained else {}
            self.store.save_server(rnd, {"global_params": self.params, "history": self.history, **extra})
