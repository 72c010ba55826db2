"""The server side of federated prompt learning, shaped like a Flower strategy.

`FedAvgStrategy` samples clients, averages the uploaded global prompt parameters weighted by
sample count (FedPGP's sigma, PromptFL's ctx; nothing for Local), and averages evaluation
metrics over clients. The math lives in pure helpers below. No transport, no runtime.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from fedpgp_ray.client import EvalResult, FitResult
from fedpgp_ray.algorithms import Params

log = logging.getLogger(__name__)


class RoundFailedError(RuntimeError):
    """Fewer clients reported than federation.min_reporting_clients."""


@dataclass
class ClientFailure:
    """A client that did not report in a round, and why."""
    client_id: int
    reason: str


def aggregate_weighted(results: list[tuple[Params, int]]) -> Params:
    """Sample-weighted mean: sum_i n_i * p_i / sum_i n_i for every key of the params."""
    if not results:
        raise ValueError("aggregate_weighted needs at least one result")
    total = float(sum(n for _, n in results))
    keys = results[0][0].keys()
    return {k: sum(p[k].double() * (n / total) for p, n in results).to(results[0][0][k].dtype) for k in keys}


def harmonic_mean(values: list[float]) -> float:
    """Harmonic mean; 0 if any value is 0, nan if any is nan."""
    if any(math.isnan(v) for v in values):
        return float("nan")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def sample_clients(num_clients: int, fraction: float, seed: int, rnd: int) -> list[int]:
    """m = max(floor(fraction * K), 1) clients without replacement, seeded by (seed, round)."""
    m = max(int(math.floor(fraction * num_clients)), 1)
    rng = np.random.default_rng([seed, 7, rnd])
    return sorted(rng.choice(num_clients, size=m, replace=False).tolist())


def summarize_accuracy(per_client: dict[int, dict[str, float]]) -> dict[str, float]:
    """Average each accuracy over clients, then HM3 = HM(local, base, novel) and HM2 = HM(base, novel)."""
    keys = sorted({k for m in per_client.values() for k in m})
    out = {k: float(np.nanmean([m.get(k, float("nan")) for m in per_client.values()])) for k in keys}
    if "novel" in out:
        out["hm3"] = harmonic_mean([out["local"], out["base"], out["novel"]])
        out["hm2"] = harmonic_mean([out["base"], out["novel"]])
    return out


class FedAvgStrategy:
    """Sample-weighted averaging of an algorithm's global prompt parameters.

    num_clients: K. fraction: share of clients sampled per round (SPEC: without replacement,
    round 0 included). min_reporting: fewest reporting clients for a round to count.
    evaluate_every: evaluate all clients every N rounds, and always at round 0 and the last.
    seed: makes sampling reproducible and identical across runtimes.
    """

    def __init__(self, num_clients: int, fraction: float, min_reporting: int, evaluate_every: int,
                 num_rounds: int, seed: int) -> None:
        self.num_clients = num_clients
        self.fraction = fraction
        self.min_reporting = min_reporting
        self.evaluate_every = evaluate_every
        self.num_rounds = num_rounds
        self.seed = seed

    def configure_train(self, rnd: int) -> list[int]:
        return sample_clients(self.num_clients, self.fraction, self.seed, rnd)

    def aggregate_train(self, rnd: int, global_params: Params, results: list[FitResult],
                        failures: list[ClientFailure]) -> tuple[Params, dict[str, float]]:
        for failure in failures:
            log.warning("round %d: client %d failed: %s", rnd, failure.client_id, failure.reason)
        if len(results) < min(self.min_reporting, self.num_clients):
            raise RoundFailedError(f"round {rnd}: only {len(results)} clients reported, fewer than "
                                   f"federation.min_reporting_clients={self.min_reporting} "
                                   f"({len(failures)} failed: {[f.client_id for f in failures]})")
        metrics = {"clients_reported": float(len(results)), "clients_failed": float(len(failures)),
                   "bytes_uploaded": float(sum(t.numel() * t.element_size()
                                                for r in results for t in r.params.values()))}
        for key in sorted({k for r in results for k in r.metrics}):
            metrics[f"train_{key}"] = float(np.mean([r.metrics[key] for r in results if key in r.metrics]))
        if not global_params:  # nothing global (Local): nothing to aggregate
            return global_params, metrics
        new = aggregate_weighted([(r.params, r.num_examples) for r in results])
        return {k: new[k].to(global_params[k].dtype) for k in global_params}, metrics

    def configure_evaluate(self, rnd: int) -> list[int] | None:
        if rnd == 0 or rnd == self.num_rounds or rnd % self.evaluate_every == 0:
            return list(range(self.num_clients))
        return None

    def aggregate_evaluate(self, rnd: int, results: list[EvalResult]) -> dict[str, float]:
        return summarize_accuracy({r.client_id: r.metrics for r in results})

