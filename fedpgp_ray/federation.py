"""The round loop: strategy decides, runtime executes, listeners observe, checkpoints make it resumable."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from fedpgp_ray import privacy
from fedpgp_ray.secagg import ddp
from fedpgp_ray.algorithms import Params, build_algorithm
from fedpgp_ray.checkpoint import CheckpointStore, ClientStateRollback
from fedpgp_ray.client_results import accuracy_summary, listed
from fedpgp_ray.config import ExperimentConfig, config_to_dict
from fedpgp_ray.fedbuff import server_steps
from fedpgp_ray.runtime.base import Runtime
from fedpgp_ray.secagg.protocol import STAGES as SECAGG_STAGES
from fedpgp_ray.client import FitResult
from fedpgp_ray.strategy import FedAvgStrategy, RoundFailedError

log = logging.getLogger(__name__)

METRIC_NAMES = {
    "local": "accuracy (%) of each client's classifier on its own classes' test set, averaged over clients",
    "base": "accuracy (%) on the test set of all base classes, averaged over clients",
    "novel": "accuracy (%) on the novel classes (domain level: the held-out domain), averaged over clients",
    "hm3": "3-way harmonic mean of Local, Base, Novel",
    "hm2": "2-way harmonic mean of Base, Novel",
}


@dataclass
class RoundReport:
    """One round: aggregate metrics and per-client metrics (round 0 = before training).

    dropped: clients the runtime gave up on in this round (failed every attempt), and why: their
    upload or accuracy is missing from the round's aggregates.
    """
    round: int
    metrics: dict[str, float]
    clients: dict[int, dict[str, float]] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)


class WallClock:
    """Seconds since the run started (across resumes), and the same without evaluation phases, for
    time-to-accuracy curves: `wall_seconds` and `train_wall_seconds` on every round."""

    def __init__(self, offset: float = 0.0, eval_offset: float = 0.0) -> None:
        self.began = time.perf_counter() - offset
        self.eval_seconds = eval_offset

    @classmethod
    def resumed(cls, last: list[dict[str, Any]]) -> "WallClock":
        """Continuing after the last completed round's report (none: a new run)."""
        m = last[0]["metrics"] if last else {}
        wall = m.get("wall_seconds", 0.0)
        return cls(wall, wall - m.get("train_wall_seconds", wall))

    def stamp(self, metrics: dict[str, float]) -> None:
        metrics["wall_seconds"] = time.perf_counter() - self.began
        metrics["train_wall_seconds"] = metrics["wall_seconds"] - self.eval_seconds


class RoundListener(Protocol):
    """Observes a run (progress bar, MLflow). Listeners never change the run."""

    def on_round(self, report: RoundReport, global_params: Params) -> None: ...


def build_strategy(cfg: ExperimentConfig) -> FedAvgStrategy:
    ev = cfg.evaluation
    fed = cfg.federation
    return FedAvgStrategy(fed.num_clients, fed.client_fraction, fed.min_reporting_clients, ev.every, num_rounds(cfg),
                          cfg.seed, cfg.privacy, ev.client_fraction, ev.num_clients, ev.final == "all",
                          secagg=cfg.secagg, round_deadline_s=fed.round_deadline_s, over_selection=fed.over_selection)


def num_rounds(cfg: ExperimentConfig) -> int:
    """Training rounds (server steps in federation.mode async); zero-shot CLIP trains nothing, so it only
    has the round-0 evaluation."""
    if not build_algorithm(cfg.algorithm).trains:
        return 0
    return server_steps(cfg) if cfg.federation.mode == "async" else cfg.train.rounds


def run_federation(cfg: ExperimentConfig, runtime: Runtime, store: CheckpointStore | None = None,
                   listeners: list[RoundListener] = (), resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the experiment and return the results document (JSON-ready).

    The strategy picks clients, the runtime runs them, the server (in-process or an actor,
    as the runtime decides) aggregates and checkpoints, listeners observe.
    """
    if cfg.federation.mode == "async":
        raise ValueError("run_federation runs synchronous rounds: run federation.mode async with "
                         "fedpgp_ray.async_rounds.run_async_federation")
    strategy = build_strategy(cfg)
    if strategy.stop_message:
        log.warning("%s", strategy.stop_message)
    server = runtime.make_server(strategy, store, resume)
    began = time.perf_counter()
    rnd = server.start_round()
    clock = WallClock.resumed(server.get_history()[-1:] if rnd > 0 else [])
    while rnd <= strategy.num_rounds:
        try:
            report, global_params = play_round(rnd, strategy, runtime, server, clock)
        except ClientStateRollback as err:
            # a damaged or foreign client state: server and clients go back to the round before it together
            if store is None or store.apply_rollback() is None:
                raise
            log.warning("%s", err)
            runtime.forget_states()
            server = runtime.make_server(strategy, store, True)
            rnd = server.start_round()
            continue
        for listener in listeners:
            listener.on_round(report, global_params)
        rnd += 1
    history = [RoundReport(h["round"], h["metrics"], h["clients"], h.get("dropped", {}))
               for h in server.get_history()]
    return results_document(cfg, history, time.perf_counter() - began, runtime.dataset_manifest())


def secure_aggregation(rnd: int, server: Any, runtime: Runtime, clients: list[int]) -> None:
    """Round `rnd`'s SecAgg among the clients that trained: the server's message of each stage goes to the
    clients through the runtime, their answers back to the server, which ends holding the unmasked sum."""
    requests = server.secagg_start(rnd, clients)
    for stage in SECAGG_STAGES:
        requests = server.secagg_step(stage, runtime.secagg_exchange(rnd, stage, requests))


def play_round(rnd: int, strategy: FedAvgStrategy, runtime: Runtime, server: Any, clock: WallClock | None = None
               ) -> tuple[RoundReport, Params]:
    """Round `rnd`: train the sampled clients, aggregate, evaluate when due, checkpoint; its report."""
    clock = clock if clock is not None else WallClock()
    tick = time.perf_counter()
    metrics: dict[str, float] = {}
    clients: dict[int, dict[str, float]] = {}
    dropped: dict[int, str] = {}
    fit_dropped = 0
    global_params = server.global_params()
    if rnd > 0:
        sampled = strategy.configure_train(rnd)
        close = strategy.round_close(len(sampled))
        late: list[FitResult] = []
        if strategy.secagg_skips(sampled, global_params):
            results, failures = [], []  # too few sampled clients to hide one: no update (no one trains)
        else:
            results, failures = (runtime.fit(rnd, sampled, global_params) if close is None
                                 else runtime.fit(rnd, sampled, global_params, close))
            metrics["fit_phase_seconds"] = time.perf_counter() - tick
            if strategy.secagg is not None and global_params:
                secure_aggregation(rnd, server, runtime, [r.client_id for r in results])
        if close is not None:  # deadline mode: late results are discarded, counted, never dropped
            results, late = [r for r in results if not r.late], [r for r in results if r.late]
            metrics.update(clients_late=float(len(late)), clients_late_trained=float(sum("steps" in r.metrics
                                                                                           for r in late)))
            for r in late:
                clients[r.client_id] = {"late": 1.0}
        try:
            metrics.update(clients_sampled=float(len(sampled)), **server.aggregate_train(rnd, results, failures))
        except RoundFailedError as err:
            if not late:
                raise
            raise RoundFailedError(f"{err}; {len(late)} more were late (federation.round_deadline_s="
                                   f"{strategy.round_deadline_s}, over_selection={strategy.over_selection}): raise "
                                   f"the deadline or lower min_reporting_clients") from None
        fit_dropped = len(failures)
        if not strategy.private_ids:  # DP / SecAgg: who took part (or dropped out) stays unrecorded
            dropped.update({f.client_id: f"fit: {f.reason}" for f in failures})
        for r in ([] if strategy.private_ids else results):
            clients[r.client_id] = {f"train_{k}": v for k, v in r.metrics.items()}
        metrics["state_reinits"] = float(sum(r.metrics.get("state_reinit", 0.0) for r in results))
        global_params = server.global_params()
    eval_ids = strategy.configure_evaluate(rnd)
    if eval_ids is not None:
        began_eval = time.perf_counter()
        eval_results, eval_failures = runtime.evaluate(rnd, eval_ids, global_params)
        metrics["evaluate_phase_seconds"] = time.perf_counter() - began_eval
        clock.eval_seconds += metrics["evaluate_phase_seconds"]
        metrics.update(server.aggregate_evaluate(rnd, eval_results))
        for r in eval_results:
            clients.setdefault(r.client_id, {}).update(r.metrics)
        for f in eval_failures:
            dropped.setdefault(f.client_id, f"evaluate: {f.reason}")
    # a dropped client is loud: a round metric, a per-client flag (MLflow: client/<id>/dropped), its reason
    metrics["clients_dropped"] = float(max(len(dropped), fit_dropped))
    for cid in dropped:
        clients.setdefault(cid, {})["dropped"] = 1.0
    metrics["round_seconds"] = time.perf_counter() - tick
    clock.stamp(metrics)
    report = RoundReport(rnd, metrics, clients, dropped)
    server.finish_round(rnd, asdict(report))
    return report, global_params


def results_document(cfg: ExperimentConfig, history: list[RoundReport], wall_seconds: float,
                     dataset_manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    last_eval = next(h for h in reversed(history) if "local" in h.metrics)
    keys = ("local", "base", "novel", "hm3", "hm2")
    clean = lambda d: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
    return {
        "algorithm": cfg.algorithm.name,
        "dataset": cfg.data.dataset,
        "runtime": cfg.runtime.kind,
        "seed": cfg.seed,
        "config": config_to_dict(cfg),
        "metric_names": METRIC_NAMES,
        "final": clean({k: last_eval.metrics[k] for k in keys if k in last_eval.metrics}),
        # per client: the whole run in clients.parquet; here at most MAX_LISTED_CLIENTS per round
        "final_summary": accuracy_summary(last_eval.clients),
        "final_clients": {str(c): clean(m) for c, m in listed(last_eval.clients).items()},
        "rounds": [{"round": h.round, "metrics": clean(h.metrics),
                    "clients": {str(c): clean(m) for c, m in listed(h.clients).items()},
                    **({"clients_total": len(h.clients)} if len(h.clients) > len(listed(h.clients)) else {})}
                   for h in history],
        "rounds_done": max(h.round for h in history),
        "dropped_clients": dropped_clients(history),
        "wall_seconds": wall_seconds,
        "dataset_manifest": dataset_manifest,
        **({"privacy": privacy_summary(cfg, max(h.round for h in history))} if privacy_applies(cfg) else {}),
    }


def dropped_clients(history: list[RoundReport]) -> list[dict[str, Any]]:
    """Every (round, client) the runtime dropped, with the reason, oldest first."""
    return [{"round": h.round, "client": cid, "reason": why} for h in history for cid, why in sorted(h.dropped.items())]


def privacy_applies(cfg: ExperimentConfig) -> bool:
    """DP is on and the algorithm uploads global parameters (Local and zero-shot CLIP upload none)."""
    algorithm = build_algorithm(cfg.algorithm)
    return cfg.privacy.enabled and algorithm.trains and bool(algorithm.global_keys)


def privacy_summary(cfg: ExperimentConfig, rounds: int) -> dict[str, Any]:
    """The guarantee after `rounds` DP rounds, for results.json (epsilon null: infinite, no noise)."""
    p, q = cfg.privacy, cfg.federation.client_fraction
    eps = build_strategy(cfg).epsilon(rounds)
    distributed = cfg.secagg.enabled
    return {"epsilon": None if math.isinf(eps) else eps, "delta": p.target_delta, "rounds": rounds,
            "sampling_rate": q, "expected_clients_per_round": q * cfg.federation.num_clients,
            "noise_multiplier": p.noise_multiplier, "clip_norm": p.clip_norm, "max_epsilon": p.max_epsilon,
            "stopped_by_budget": rounds < num_rounds(cfg),
            "accountant": ddp.ACCOUNTANT if distributed else privacy.ACCOUNTANT, "seeded": p.seeded,
            "mode": "distributed (SecAgg + Skellam)" if distributed else "central"}
