"""The server side of federated prompt learning, shaped like a Flower strategy.

`FedAvgStrategy` samples clients, averages the uploaded global prompt parameters weighted by
sample count (FedPGP's sigma, PromptFL's ctx; nothing for Local), and averages evaluation
metrics over clients. With `privacy.enabled` it runs DP-FedAvg instead (Poisson sampling,
clipped unweighted sum plus Gaussian noise, epsilon per round; fedpgp_ray/privacy.py).
The math lives in pure helpers. No transport, no runtime.
"""
from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass

import numpy as np

from fedpgp_ray import privacy as dp
from fedpgp_ray.client import EvalResult, FitResult
from fedpgp_ray.algorithms import Params
from fedpgp_ray.config import ConfigError, PrivacyConfig, SecAggConfig
from fedpgp_ray.secagg import ddp
from fedpgp_ray.secagg.protocol import RoundSetup, make_setup
from fedpgp_ray.secagg.ring import check_resolution, dequantize, ring_scale

log = logging.getLogger(__name__)


class RoundFailedError(RuntimeError):
    """Fewer clients reported than federation.min_reporting_clients."""


@dataclass
class RoundClose:
    """When a training round stops waiting in deadline mode: once `target` clients reported, or
    `deadline_s` seconds after it started (None: no time limit), whichever comes first."""
    target: int
    deadline_s: float | None


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


def reporting_target(num_clients: int, fraction: float) -> int:
    """m = max(floor(fraction * K), 1): the clients a round aggregates."""
    return max(int(math.floor(fraction * num_clients)), 1)


def sample_clients(num_clients: int, fraction: float, seed: int, rnd: int, over_selection: float = 0.0) -> list[int]:
    """m = reporting_target clients without replacement, seeded by (seed, round); with over-selection o,
    min(m + ceil(o m), K) of them (the first m to report are aggregated)."""
    m = reporting_target(num_clients, fraction)
    size = min(m + math.ceil(round(over_selection * m, 9)), num_clients)
    rng = np.random.default_rng([seed, 7, rnd])
    return sorted(rng.choice(num_clients, size=size, replace=False).tolist())


def sample_eval_clients(num_clients: int, fraction: float, count: int | None, seed: int, rnd: int) -> list[int]:
    """The clients evaluated in round `rnd`: `count` (else max(floor(fraction * K), 1)) without replacement,
    from a stream of its own seeded by (seed, round); every client when that is all of them."""
    m = min(count if count is not None else max(int(math.floor(fraction * num_clients)), 1), num_clients)
    if m >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, 11, rnd])
    return sorted(rng.choice(num_clients, size=m, replace=False).tolist())


SPREAD_KEYS = ("local", "base", "novel")


def spread_over_clients(per_client: dict[int, dict[str, float]]) -> dict[str, float]:
    """How an accuracy varies over the evaluated clients: its standard error of the mean (`<key>_se`,
    sample std / sqrt(n); 0 for one client) and 10th / 50th / 90th percentiles, plus `clients_evaluated`."""
    out = {"clients_evaluated": float(len(per_client))}
    for key in SPREAD_KEYS:
        values = np.array([m[key] for m in per_client.values() if key in m], dtype=np.float64)
        values = values[~np.isnan(values)]
        if len(values) == 0:
            continue
        out[f"{key}_se"] = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
        for q in (10, 50, 90):
            out[f"{key}_p{q}"] = float(np.percentile(values, q))
    return out


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
    evaluate_every: evaluate every N rounds, and always at round 0 and the last.
    eval_fraction / eval_count: clients evaluated per evaluation round (sample_eval_clients);
        final_all: the last round evaluates every client.
    seed: makes sampling reproducible and identical across runtimes.
    privacy: DP-FedAvg when enabled (then `fraction` is the Poisson sampling rate q). With
        max_epsilon, num_rounds is cut to the rounds the budget allows (`stop_message` says so).
    secagg: secure aggregation when enabled: the server gets only the unmasked sum of the round's
        quantised updates (`secagg_setup`, `aggregate_secure`); with privacy, the noise comes from the
        clients (distributed Skellam DP) and epsilon from `secagg.ddp`.
    round_deadline_s / over_selection: deadline mode (`round_close`; config refuses it with DP or SecAgg).
    """

    def __init__(self, num_clients: int, fraction: float, min_reporting: int, evaluate_every: int,
                 num_rounds: int, seed: int, privacy: PrivacyConfig | None = None, eval_fraction: float = 1.0,
                 eval_count: int | None = None, final_all: bool = False, secagg: SecAggConfig | None = None,
                 round_deadline_s: float | None = None, over_selection: float = 0.0) -> None:
        self.num_clients = num_clients
        self.round_deadline_s = round_deadline_s
        self.over_selection = over_selection
        self.eval_fraction = eval_fraction
        self.eval_count = eval_count
        self.final_all = final_all
        self.fraction = fraction
        self.min_reporting = min_reporting
        self.evaluate_every = evaluate_every
        self.num_rounds = num_rounds
        self.seed = seed
        self.privacy = privacy if privacy is not None and privacy.enabled else None
        self.secagg = secagg if secagg is not None and secagg.enabled else None
        self.stop_message = ""
        if self.privacy is not None and self.privacy.max_epsilon is not None and num_rounds > 0:
            self._apply_budget()

    def _apply_budget(self) -> None:
        p, planned = self.privacy, self.num_rounds
        allowed = dp.rounds_within(self.fraction, p.noise_multiplier, p.target_delta, p.max_epsilon, planned,
                                   self.epsilon)
        if allowed == planned:
            return
        after = self.epsilon(allowed + 1)
        if allowed == 0:
            raise ConfigError(f"config key 'privacy.max_epsilon' = {p.max_epsilon:g} is below the epsilon of a single "
                              f"round ({after:.3g} at delta={p.target_delta:g}): raise max_epsilon or "
                              f"privacy.noise_multiplier, or lower federation.client_fraction")
        self.stop_message = (f"privacy budget: stopping after round {allowed} of {planned}: round {allowed + 1} would "
                             f"raise epsilon to {after:.3g} > privacy.max_epsilon={p.max_epsilon:g} "
                             f"(delta={p.target_delta:g})")
        self.num_rounds = allowed

    def _dp_seed(self) -> int | None:
        return self.seed if self.privacy.seeded else None

    def configure_train(self, rnd: int) -> list[int]:
        if self.privacy is not None:  # what the accountant assumes: each client independently, rate q
            return dp.poisson_sample(self.num_clients, self.fraction, self._dp_seed(), rnd)
        return sample_clients(self.num_clients, self.fraction, self.seed, rnd, self.over_selection)

    def round_close(self, sampled: int) -> RoundClose | None:
        """Deadline mode: when a round of `sampled` clients stops waiting (the first m = reporting_target
        with over-selection, else all of them), and its time limit; None: wait for every client."""
        if self.round_deadline_s is None and self.over_selection == 0:
            return None
        target = min(reporting_target(self.num_clients, self.fraction), sampled) if self.over_selection else sampled
        return RoundClose(target, self.round_deadline_s)

    def epsilon(self, rounds: int) -> float:
        """epsilon at privacy.target_delta after `rounds` DP rounds (inf without noise): central DP's RDP
        accountant, or with SecAgg the distributed Skellam bound at the coarsest scale a round can use."""
        p = self.privacy
        if self.secagg is None:
            return dp.epsilon(self.fraction, p.noise_multiplier, rounds, p.target_delta)
        gamma = ring_scale(self.secagg.bits, self.num_clients, self._coord_range(), p.noise_multiplier,
                           self.secagg.min_survivors)
        return ddp.epsilon(self.fraction, p.noise_multiplier, rounds, p.target_delta, gamma, self._coord_range())

    # -- secure aggregation ---------------------------------------------------------------------------
    def _coord_range(self) -> float:
        """Bound of every coordinate of an update: the DP clip norm, else secagg.clip_range."""
        p = self.privacy
        return p.clip_norm if p is not None and p.clip_norm is not None else self.secagg.clip_range

    def secagg_setup(self, rnd: int, clients: list[int], dim: int) -> RoundSetup:
        """The public parameters of round `rnd`'s SecAgg among `clients` (graph, threshold, scale, noise)."""
        sa, p = self.secagg, self.privacy
        if len(clients) < sa.min_survivors:
            raise RoundFailedError(f"round {rnd}: only {len(clients)} clients reported, fewer than "
                                   f"secagg.min_survivors={sa.min_survivors}: nothing aggregated")
        z = p.noise_multiplier if p is not None else 0.0
        r = self._coord_range()
        gamma = ring_scale(sa.bits, len(clients), r, z, sa.min_survivors)
        check_resolution(gamma, r, dim, sa.bits)
        noise = ddp.client_noise_variance(z, gamma, r, dim, sa.min_survivors) if z > 0 else 0.0
        seeded = p is None or p.seeded  # the graph is public; its randomness is the server's
        rng = np.random.default_rng([self.seed, 23, rnd] if seeded else secrets.randbits(128))
        return make_setup(rnd, clients, dim, sa.bits, gamma, r, sa.min_survivors, sa.threshold, rng, sa.degree, noise)

    def secagg_skips(self, sampled: list[int], global_params: Params) -> bool:
        """Under SecAgg, a round that sampled fewer than secagg.min_survivors clients makes no update: their
        sum would not hide one client (nor, with DP, carry the full noise). Poisson sampling makes it happen."""
        return self.secagg is not None and bool(global_params) and len(sampled) < self.secagg.min_survivors

    def aggregate_secure(self, rnd: int, global_params: Params, total: np.ndarray, survivors: int,
                         setup: RoundSetup) -> tuple[Params, dict[str, float]]:
        """New global params from the unmasked integer sum of `survivors` clients' updates.

        Without DP: global + sum / survivors (unweighted: sample counts would have to be aggregated too).
        With DP: global + sum / (q N), the fixed denominator of DP-FedAvg; the noise is already in the sum.
        """
        step = dequantize(total, setup.gamma) / (self.fraction * self.num_clients if self.privacy is not None
                                                  else survivors)
        delta = dp.unflatten(step, global_params)
        new = {k: (global_params[k].double() + delta[k]).to(global_params[k].dtype) for k in global_params}
        metrics = {"secagg/survivors": float(survivors), "secagg/threshold": float(setup.threshold),
                   "secagg/degree": float(min(len(v) for v in setup.neighbours.values()))}
        if self.privacy is not None:
            metrics["privacy/epsilon"] = self.epsilon(rnd)
        return new, metrics

    def aggregate_params(self, rnd: int, global_params: Params, uploads: list[tuple[Params, int]]
                         ) -> tuple[Params, dict[str, float]]:
        """New global params from (params, num_examples) uploads, and the privacy metrics.

        Without privacy: the sample-weighted mean. With privacy: DP-FedAvg; the sample counts are
        ignored (a weight would let one client's contribution exceed the clip bound, and reveal n_i).
        """
        if self.privacy is None:
            new = aggregate_weighted(uploads)
            return {k: new[k].to(global_params[k].dtype) for k in global_params}, {}
        p = self.privacy
        updates = [{k: params[k].double() - global_params[k].double() for k in global_params}
                   for params, _ in uploads]
        new = dp.dp_aggregate(global_params, updates, p.clip_norm if p.clip_norm is not None else math.inf,
                              p.noise_multiplier, self.fraction * self.num_clients,
                              dp.noise_generator(self._dp_seed(), rnd))
        return new, {"privacy/epsilon": self.epsilon(rnd)}

    def aggregate_train(self, rnd: int, global_params: Params, results: list[FitResult],
                        failures: list[ClientFailure], secure: tuple[np.ndarray, int, RoundSetup] | None = None
                        ) -> tuple[Params, dict[str, float]]:
        """secure: (unmasked sum, survivors, setup) of the round's SecAgg, which replaces the uploads."""
        if self.private_ids and failures:  # under DP or SecAgg: counts only, never which clients took part
            log.warning("round %d: %d clients failed (first reason: %s)", rnd, len(failures), failures[0].reason)
        for failure in ([] if self.private_ids else failures):
            log.warning("round %d: client %d failed: %s", rnd, failure.client_id, failure.reason)
        required = min(self.min_reporting, self.num_clients)
        if self.privacy is not None:  # Poisson sampling may pick fewer clients (even none): a noise-only round
            required = min(required, len(results) + len(failures))
        if len(results) < required:
            failed = f"{len(failures)} failed" + ("" if self.private_ids else f": {[f.client_id for f in failures]}")
            raise RoundFailedError(f"round {rnd}: only {len(results)} clients reported, fewer than "
                                   f"federation.min_reporting_clients={self.min_reporting} ({failed})")
        metrics = {"clients_reported": float(len(results)), "clients_failed": float(len(failures)),
                   "bytes_uploaded": float(sum(t.numel() * t.element_size()
                                                for r in results for t in r.params.values()))}
        for key in sorted({k for r in results for k in r.metrics}):
            metrics[f"train_{key}"] = float(np.mean([r.metrics[key] for r in results if key in r.metrics]))
        if not global_params:  # nothing global (Local): nothing to aggregate
            return global_params, metrics
        if secure is not None:
            new, secure_metrics = self.aggregate_secure(rnd, global_params, *secure)
            return new, {**metrics, **secure_metrics}
        if self.secagg is not None:  # a round with too few sampled clients (secagg_skips): no update
            log.warning("round %d: fewer than secagg.min_survivors=%d clients sampled: no update this round",
                        rnd, self.secagg.min_survivors)
            skipped = {"secagg/skipped": 1.0, **({"privacy/epsilon": self.epsilon(rnd)} if self.privacy else {})}
            return global_params, {**metrics, **skipped}
        new, privacy_metrics = self.aggregate_params(rnd, global_params, [(r.params, r.num_examples) for r in results])
        return new, {**metrics, **privacy_metrics}

    @property
    def private_ids(self) -> bool:
        """Under DP or SecAgg, which clients took part in a round is not recorded (counts only)."""
        return self.privacy is not None or self.secagg is not None

    def configure_evaluate(self, rnd: int) -> list[int] | None:
        if rnd == self.num_rounds and self.final_all:
            return list(range(self.num_clients))
        if rnd == 0 or rnd == self.num_rounds or rnd % self.evaluate_every == 0:
            return sample_eval_clients(self.num_clients, self.eval_fraction, self.eval_count, self.seed, rnd)
        return None

    def aggregate_evaluate(self, rnd: int, results: list[EvalResult]) -> dict[str, float]:
        per_client = {r.client_id: r.metrics for r in results}
        return {**summarize_accuracy(per_client), **spread_over_clients(per_client)}

