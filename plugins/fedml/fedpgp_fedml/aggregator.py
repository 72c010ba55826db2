"""FedPGPServerAggregator: FedML's ServerAggregator with our aggregation (sample-weighted mean of sigma,
or DP-FedAvg with `privacy.enabled`: our strategy's `aggregate_params`, noise added here on the server).

`aggregate` is always overridden: FedML's default reaches an operator that only knows its own
algorithm names. The aggregator keeps the global parameters after every round (`history`) and,
with `fedpgp_output_dir` set, saves them as <dir>/global_round_<r>.pt (r = 1, 2, ...).
"""
from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, List, Tuple

import torch
from fedml.core import ServerAggregator

from fedpgp_ray.federation import build_strategy

from fedpgp_fedml.config import FedMLConfigError, experiment_config_from_args, get, where

log = logging.getLogger(__name__)


class FedPGPServerAggregator(ServerAggregator):
    """FedML ServerAggregator for our algorithms. model: fedpgp_fedml's GlobalPromptModel. args: FedML args."""

    def __init__(self, model: Any, args: Any) -> None:
        super().__init__(model, args)
        self.cfg = experiment_config_from_args(args)
        self.global_keys = tuple(model.global_keys)
        self.params: OrderedDict[str, torch.Tensor] = model.global_params()
        self.history: dict[int, OrderedDict[str, torch.Tensor]] = {0: self.get_model_params()}
        self.metrics: dict[int, dict[str, float]] = {}
        out = get(args, "fedpgp_output_dir")
        self.save_dir = Path(str(out)).expanduser() if out else None
        self._pending_round: int | None = None
        self.strategy = build_strategy(self.cfg)
        if get(args, "training_type") == "cross_silo" and self.strategy.num_rounds < self.cfg.train.rounds:
            # FedML's cross-silo server runs comm_round rounds itself: it cannot stop early at the budget
            raise FedMLConfigError(f"{self.strategy.stop_message}; FedML cross-silo cannot stop early: set "
                                   f"{where('comm_round')} (train.rounds) to {self.strategy.num_rounds}")
        self.aggregation_metrics: dict[str, float] = {}  # of the last aggregate(): privacy/epsilon under DP
        # cross-silo: the clients' reports per round (fedpgp_fedml.report.ServerReport shows them)
        self.server_report: Any = None
        self._evals: dict[int, dict[int, dict[str, float]]] = {}
        self._fits: dict[int, dict[int, dict[str, float]]] = {}
        self._aggregated: dict[int, dict[str, float]] = {}
        self._last_emit = time.perf_counter()
        if get(args, "training_type") == "cross_silo":  # now, so a TrackingError comes before any training
            from fedpgp_fedml.report import ServerReport

            self.server_report = ServerReport(self.cfg, f"FedML cross-silo ({get(args, 'backend')}, "
                                                        f"{get(args, 'client_num_per_round')} silos), "
                                                        f"{self.cfg.algorithm.name}")

    def get_model_params(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((k, v.detach().cpu().clone()) for k, v in self.params.items())

    def set_model_params(self, model_parameters: Any) -> None:
        self.params = OrderedDict((k, torch.as_tensor(model_parameters[k]).detach().cpu().clone())
                                  for k in self.global_keys)
        self.model.load_global(self.params)
        if self._pending_round is not None:  # the result of aggregate() (after FedML's after-hooks)
            self.record(self._pending_round, self.params)
            self._pending_round = None

    def record(self, rnd: int, params: Any, metrics: dict[str, float] | None = None) -> None:
        """Keep (and with fedpgp_output_dir, save) the global params after round `rnd`."""
        self.history[rnd] = OrderedDict((k, torch.as_tensor(params[k]).detach().cpu().clone()) for k in self.global_keys)
        if metrics:
            self.metrics[rnd] = dict(metrics)
        if self.save_dir is not None:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            torch.save(dict(self.history[rnd]), self.save_dir / f"global_round_{rnd}.pt")

    def aggregate(self, raw_client_model_or_grad_list: List[Tuple[float, Any]]) -> "OrderedDict[str, torch.Tensor]":
        """sigma_global = sum_i n_i sigma_i / sum_i n_i over the reporting clients; under DP, DP-FedAvg
        (clipped unweighted sum + Gaussian noise over q * N; a round without uploads is noise only)."""
        uploads = [({k: torch.as_tensor(p[k]).detach().cpu() for k in self.global_keys}, int(n))
                   for n, p in raw_client_model_or_grad_list]
        if not uploads and self.strategy.privacy is None:
            raise RuntimeError("FedPGPServerAggregator.aggregate: no client uploads this round")
        self._pending_round = int(getattr(self.args, "round_idx", 0) or 0) + 1
        new, self.aggregation_metrics = self.strategy.aggregate_params(self._pending_round, dict(self.params), uploads)
        self._aggregated[self._pending_round] = {"clients_reported": float(len(uploads)), **self.aggregation_metrics}
        if self.server_report is not None:  # cross-silo: the previous round is complete now
            self._emit(self._pending_round - 1)
        log.info("round %d: aggregated %d uploads (%d samples)", self._pending_round, len(uploads),
                 sum(n for _, n in uploads))
        return OrderedDict((k, new[k].to(self.params[k].dtype)) for k in self.global_keys)

    # -- cross-silo reporting -------------------------------------------------------------------------
    def receive_report(self, text: str) -> None:
        """A client's report (FedPGPClientTrainer.pop_report), arriving with its upload or, after the
        last round, with its FINISHED status; the last client's final report ends the run's report."""
        report = json.loads(text)
        cid = int(report["client"])
        if report.get("eval") is not None:
            self._evals.setdefault(int(report["eval_round"]), {})[cid] = report["eval"]
        if "fit_round" in report:
            self._fits.setdefault(int(report["fit_round"]), {})[cid] = report["fit"]
            return
        last = self.cfg.train.rounds
        complete = len(self._evals.get(last, {})) >= int(get(self.args, "client_num_per_round"))
        if int(report["eval_round"]) == last and complete and last not in self.metrics:
            self._emit(last)
            self.server_report.finish()

    def _emit(self, rnd: int) -> None:
        """Round `rnd`'s aggregate metrics (as our strategy computes them) to the server's report."""
        from fedpgp_ray.federation import RoundReport
        from fedpgp_ray.strategy import summarize_accuracy

        evals, fits = self._evals.get(rnd, {}), self._fits.get(rnd, {})
        metrics: dict[str, float] = dict(self._aggregated.get(rnd, {}))
        if rnd > 0:
            metrics["clients_sampled"] = float(len(fits))
            for key in sorted({k for m in fits.values() for k in m}):
                values = [m[key] for m in fits.values() if key in m]
                metrics[f"train_{key}"] = float(sum(values) / len(values))
        if evals:
            metrics.update(summarize_accuracy(evals))
        now = time.perf_counter()
        metrics["round_seconds"], self._last_emit = now - self._last_emit, now
        clients = {cid: {**{f"train_{k}": v for k, v in fits.get(cid, {}).items()}, **evals.get(cid, {})}
                   for cid in sorted({*evals, *fits})}
        self.metrics[rnd] = metrics
        self.server_report.on_round(RoundReport(rnd, metrics, clients), self.history.get(rnd, self.params))

    def test(self, test_data: Any, device: Any, args: Any) -> dict[str, float]:
        """Server-side metrics: the latest round's averaged client metrics (personal prompts live on the
        clients, so the server cannot classify by itself); {} before any evaluation."""
        return self.metrics[max(self.metrics)] if self.metrics else {}

    def test_all(self, train_data_local_dict: Any, test_data_local_dict: Any, device: Any, args: Any) -> bool:
        return True
