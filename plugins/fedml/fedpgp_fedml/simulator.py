"""FedPGPSimulator: the FedML algorithm that runs our rounds in FedML's single-process simulation (sp).

`FedMLRunner.run()` calls its `run()` (directly when passed as `algorithm_flow=`, or through
FedML's SimulatorSingleProcess once `fedpgp_fedml.register()` routed the name to it). Two runtimes,
chosen by the FedML field `fedpgp_runtime`:

* `local` (default): FedML's sp loop in this process with the two FedML classes: per round the
  sampled clients go through FedPGPClientTrainer (set_id, update_dataset, set_model_params,
  on_before_local_training, train, on_after_local_training, get_model_params), then
  FedPGPServerAggregator (on_before_aggregation, aggregate, on_after_aggregation,
  set_model_params); evaluation through the trainer's test on every client.
* `ray`: our Ray runtime (`fedpgp_ray.runtime.build_runtime`): client actors (each a frozen CLIP
  serving many clients; `fedpgp_config.runtime.num_gpus_per_actor` may be fractional) and a server
  actor that aggregates with our strategy; this driver runs `run_federation` and mirrors every
  round's global params into the FedML aggregator.

Client sampling, seeds and the evaluation schedule are our strategy's (`build_strategy`), so a run
here and our own in-process run with the same config produce the same sigma.
"""
from __future__ import annotations

import copy
import logging
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from fedpgp_ray.algorithms import Params
from fedpgp_ray.config import config_to_dict
from fedpgp_ray.federation import RoundReport, build_strategy, results_document, run_federation
from fedpgp_ray.runtime import build_runtime
from fedpgp_ray.strategy import summarize_accuracy

from fedpgp_fedml.aggregator import FedPGPServerAggregator
from fedpgp_fedml.config import FedMLConfigError, experiment_config_from_args
from fedpgp_fedml.data import FedPGPDatasetList, fedml_dataset
from fedpgp_fedml.model import GlobalPromptModel
from fedpgp_fedml.report import ServerReport, sigterm_as_ctrl_c
from fedpgp_fedml.trainer import FedPGPClientTrainer, client_store, feature_cache_dir

log = logging.getLogger(__name__)


class FedPGPSimulator:
    """A FedML algorithm (flow) for FedPGP in simulation; FedMLRunner only calls `run()`.

    dataset: FedML's 8-item list (ours from `fedpgp_fedml.load_data`, or any FedML list for
        `fedpgp_runtime: local`); None builds ours from the config.
    model: GlobalPromptModel (None: built from args). client_trainer / server_aggregator: FedML
        ClientTrainer / ServerAggregator to use (default: ours).
    After run(): `history` (round reports), `results` (our results document) and
    `aggregator.history` (global params per round).
    """

    def __init__(self, args: Any, device: Any, dataset: Any, model: Any, client_trainer: Any = None,
                 server_aggregator: Any = None) -> None:
        self.args, self.device = args, device
        self.cfg = experiment_config_from_args(args)
        self.model = model if isinstance(model, GlobalPromptModel) else GlobalPromptModel(self.cfg)
        if model is not None and not isinstance(model, GlobalPromptModel):
            log.warning("FedPGPSimulator: model %s is not a GlobalPromptModel; using one built from the config",
                        type(model).__name__)
        self.dataset = dataset if dataset is not None else fedml_dataset(self.cfg)
        self.aggregator = server_aggregator or FedPGPServerAggregator(self.model, args)
        self.trainer = client_trainer
        if self.cfg.runtime.kind == "local" and self.trainer is None:
            self.trainer = FedPGPClientTrainer(self.model, args, dataset=self.dataset)
        if self.cfg.runtime.kind != "local":
            self._check_ray_data()
        self.history: list[RoundReport] = []
        self.results: dict[str, Any] | None = None

    def _check_ray_data(self) -> None:
        """Ray actors rebuild our partition from the config: the FedML data must be that partition."""
        if not isinstance(self.dataset, FedPGPDatasetList):
            raise FedMLConfigError("fedpgp_args.fedpgp_runtime: ray runs on our datasets (client actors build the "
                                   "partition from the config): load the data with fedpgp_fedml.load_data(args), "
                                   "or use fedpgp_runtime: local for a FedML-provided dataset")
        ours, theirs = config_to_dict(self.cfg), config_to_dict(self.dataset.cfg)
        for key in ("seed", "data"):
            if ours[key] != theirs[key]:
                raise FedMLConfigError(f"the dataset list was built for a different config ({key} differs): "
                                       f"build it with fedpgp_fedml.load_data(args) from these args")
        if ours["federation"]["num_clients"] != theirs["federation"]["num_clients"]:
            raise FedMLConfigError("the dataset list has a different number of clients than client_num_in_total")

    # FedML's SimulatorSingleProcess.run() calls fl_trainer.train()
    def train(self) -> None:
        self.run()

    def run(self) -> dict[str, Any]:
        with sigterm_as_ctrl_c(self.cfg.output_dir):
            began = time.perf_counter()
            # the server side's table, results files and MLflow run (fedpgp_fedml.report)
            self.report = ServerReport(self.cfg, f"FedML simulation (sp, fedpgp_runtime: {self.cfg.runtime.kind}), "
                                                 f"{self.cfg.algorithm.name}")
            if self.cfg.runtime.kind == "local":
                self._run_local()
                self.results = results_document(self.cfg, self.history, time.perf_counter() - began)
            else:
                self.results = self._run_runtime()
            self.report.finish(self.results)
        log.info("FedPGP finished: %s", self.results["final"])
        return self.results

    # -- fedpgp_runtime: local -- FedML's sp loop around the two FedML classes --------------------------
    def _run_local(self) -> None:
        args, trainer, agg = self.args, self.trainer, self.aggregator
        _, _, _, _, local_num, train_local, test_local, _ = self.dataset
        strategy = build_strategy(self.cfg)
        global_params = agg.get_model_params()
        for rnd in range(0, strategy.num_rounds + 1):  # strategy: a privacy budget may cut rounds
            tick = time.perf_counter()
            args.round_idx = rnd - 1  # FedML's 0-based index of the training round; -1: round 0, no training
            metrics: dict[str, float] = {}
            clients: dict[int, dict[str, float]] = {}
            if rnd > 0:
                sampled = strategy.configure_train(rnd)
                uploads, train_metrics = [], []
                for cid in sampled:
                    trainer.set_id(cid)
                    trainer.update_dataset(train_local[cid], test_local[cid], local_num[cid])
                    trainer.set_model_params(copy.deepcopy(global_params))
                    trainer.on_before_local_training(train_local[cid], self.device, args)
                    fit_metrics = trainer.train(train_local[cid], self.device, args) or {}
                    trainer.on_after_local_training(train_local[cid], self.device, args)
                    uploads.append((local_num[cid], copy.deepcopy(trainer.get_model_params())))
                    clients[cid] = {f"train_{k}": float(v) for k, v in fit_metrics.items()}
                    train_metrics.append(fit_metrics)
                uploads, _ = agg.on_before_aggregation(uploads)
                aggregated = agg.aggregate(uploads)
                aggregated = agg.on_after_aggregation(aggregated)
                agg.set_model_params(aggregated)
                global_params = agg.get_model_params()
                metrics.update(clients_sampled=float(len(sampled)), clients_reported=float(len(uploads)),
                               **getattr(agg, "aggregation_metrics", {}))
                for key in sorted({k for m in train_metrics for k in m}):
                    metrics[f"train_{key}"] = float(np.mean([m[key] for m in train_metrics if key in m]))
            eval_ids = strategy.configure_evaluate(rnd)
            if eval_ids is not None:
                per_client = {}
                for cid in eval_ids:
                    trainer.set_id(cid)
                    trainer.update_dataset(train_local[cid], test_local[cid], local_num[cid])
                    trainer.set_model_params(copy.deepcopy(global_params))
                    per_client[cid] = dict(trainer.test(test_local[cid], self.device, args))
                    clients.setdefault(cid, {}).update(per_client[cid])
                metrics.update(summarize_accuracy(per_client))
            metrics["round_seconds"] = time.perf_counter() - tick
            if isinstance(agg, FedPGPServerAggregator):
                agg.record(rnd, global_params, metrics)
            self.history.append(RoundReport(rnd, metrics, clients))
            self.report.on_round(self.history[-1], global_params)
            log.info("round %d: %s", rnd, {k: round(v, 3) for k, v in metrics.items()})

    # -- fedpgp_runtime: ray (or any runtime of ours) ---------------------------------------------------
    def _run_runtime(self) -> dict[str, Any]:
        mirror = _AggregatorMirror(self.aggregator)
        store = client_store(self.cfg) if self.args is not None and getattr(self.args, "fedpgp_output_dir", None) else None
        with build_runtime(self.cfg, store, feature_cache_dir(self.args)) as runtime:
            results = run_federation(self.cfg, runtime, None, [mirror, self.report])
        self.history = [RoundReport(r["round"], r["metrics"], {int(c): m for c, m in r["clients"].items()})
                        for r in results["rounds"]]
        return results


class _AggregatorMirror:
    """RoundListener that keeps the FedML aggregator's global params in step with our server actor."""

    def __init__(self, aggregator: Any) -> None:
        self.aggregator = aggregator

    def on_round(self, report: RoundReport, global_params: Params) -> None:
        params = OrderedDict((k, v.detach().cpu()) for k, v in global_params.items())
        self.aggregator.set_model_params(params)
        if isinstance(self.aggregator, FedPGPServerAggregator):
            self.aggregator.record(report.round, params, report.metrics)
