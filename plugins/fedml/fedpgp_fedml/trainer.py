"""FedPGPClientTrainer: FedML's ClientTrainer around our ClientWorker.

On the wire there are only the global parameters (FedPGP: sigma), as an OrderedDict of CPU tensors.
U and V, and each client's own optimizer state, stay in the worker, keyed by client id, so one
trainer can serve many clients (FedML's sp loop) or one silo (cross-silo).
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from typing import Any

import torch
from fedml.core import ClientTrainer

from fedpgp_ray.client import ClientWorker, FitResult
from fedpgp_ray.config import ExperimentConfig

from fedpgp_fedml.config import FedMLConfigError, experiment_config_from_args, get
from fedpgp_fedml.data import ClientData, partition_from_fedml

log = logging.getLogger(__name__)


def feature_cache_dir(args: Any) -> str:
    """Image-feature cache: fedpgp_cache_dir, else $FEDPGP_CACHE_DIR, else ~/.cache/fedpgp-ray/features."""
    explicit = get(args, "fedpgp_cache_dir")
    if explicit:
        return os.path.expanduser(str(explicit))
    from fedpgp_ray.run import feature_cache_dir as ours
    return ours()


def client_store(cfg: ExperimentConfig) -> Any:
    """The run's checkpoint store (`<output_dir>/checkpoints`): where clients keep their personal states."""
    from fedpgp_ray.checkpoint import CheckpointStore
    from fedpgp_ray.storage import RunStorage

    return CheckpointStore(RunStorage(cfg.output_dir).child("checkpoints"))


def build_worker(cfg: ExperimentConfig, fedml_dataset: Any = None, args: Any = None,
                 device: str | torch.device | None = None) -> ClientWorker:
    """Our ClientWorker for `cfg`, on our own data (None or our FedML list) or on a foreign FedML list."""
    from fedpgp_ray.runtime.base import worker_threads

    cache_dir = feature_cache_dir(args)
    torch.set_num_threads(worker_threads(cfg.runtime))  # as our runtimes: from the CPUs it was given
    # personal states in the run layout of `fedpgp-ray run` (checkpoints/clients/<id>/round_<r>.pt)
    store = client_store(cfg) if get(args, "fedpgp_output_dir") else None
    if fedml_dataset is None:
        worker = ClientWorker(cfg, device, store=store, cache_dir=cache_dir)
    else:
        dataset, partition = partition_from_fedml(fedml_dataset, get(args, "fedpgp_class_names"))
        if len(partition.clients) != cfg.federation.num_clients:
            raise FedMLConfigError(f"train_args.client_num_in_total = {cfg.federation.num_clients} but the dataset "
                                   f"has {len(partition.clients)} clients (train_data_local_dict)")
        worker = ClientWorker(cfg, device, store=store, cache_dir=cache_dir, dataset=dataset, partition=partition)
    worker.prepare()
    return worker


class FedPGPClientTrainer(ClientTrainer):
    """FedML ClientTrainer for our algorithms (FedPGP by default).

    model: fedpgp_fedml's GlobalPromptModel (initial global params). args: FedML args.
    dataset: the FedML 8-item list this run uses (ours, or any FedML list to convert); None builds our
        partition from the config. worker: an existing ClientWorker to share (e.g. the sp loop's).
    """

    def __init__(self, model: Any, args: Any, dataset: Any = None, worker: ClientWorker | None = None) -> None:
        super().__init__(model, args)
        self.cfg = experiment_config_from_args(args)
        self.global_keys = tuple(model.global_keys)
        self._fedml_dataset = dataset
        self._worker = worker
        self._global: OrderedDict[str, torch.Tensor] = model.global_params()
        self._upload: OrderedDict[str, torch.Tensor] | None = None
        self._client_of: dict[int, int] = {}
        if dataset is not None and isinstance(dataset, (list, tuple)) and len(dataset) == 8:
            for key in ("train", "test"):
                local = dataset[5] if key == "train" else dataset[6]
                for cid, value in (local or {}).items():
                    self._client_of[id(value)] = int(cid)
        self.last_fit: FitResult | None = None
        self.last_eval: dict[str, float] = {}
        self.report: dict[str, Any] | None = None  # cross-silo: what the next message to the server carries
        self.last_round: int | None = None          # cross-silo: the last round this silo trained

    # -- the worker: built on first use (FedML constructs trainers before it hands them data) -----------
    @property
    def worker(self) -> ClientWorker:
        if self._worker is None:
            self._worker = build_worker(self.cfg, self._fedml_dataset, self.args)
            initial = self._worker.global_params()
            for k in self.global_keys:
                if tuple(initial[k].shape) != tuple(self._global[k].shape):
                    raise FedMLConfigError(f"global parameter {k!r} has shape {tuple(self._global[k].shape)} in the "
                                           f"FedML model but {tuple(initial[k].shape)} in the backbone: build the "
                                           f"model with fedpgp_fedml.create_model(args)")
        return self._worker

    def client_id(self, train_data: Any = None) -> int:
        """The partition client to train: from our ClientData, else the FedML dict it came from, else set_id."""
        data = train_data if train_data is not None else self.local_train_dataset
        if isinstance(data, ClientData) and data.client_id is not None:
            return int(data.client_id)
        if data is not None and id(data) in self._client_of:
            return self._client_of[id(data)]
        return int(self.id)

    @staticmethod
    def round_of(args: Any) -> int:
        """Our round number (1-based) for FedML's 0-based args.round_idx."""
        return int(getattr(args, "round_idx", 0) or 0) + 1

    # -- FedML ClientTrainer ---------------------------------------------------------------------------
    def get_model_params(self) -> "OrderedDict[str, torch.Tensor]":
        """After train(): this client's upload (sigma_i); before: the global params it holds."""
        source = self._upload if self._upload is not None else self._global
        return OrderedDict((k, v.detach().cpu().clone()) for k, v in source.items())

    def set_model_params(self, model_parameters: Any) -> None:
        missing = [k for k in self.global_keys if k not in model_parameters]
        if missing:
            raise ValueError(f"FedPGPClientTrainer.set_model_params: missing {missing}; the wire format is "
                             f"an OrderedDict with exactly {list(self.global_keys)}")
        self._global = OrderedDict((k, torch.as_tensor(model_parameters[k]).detach().cpu().clone())
                                   for k in self.global_keys)
        self._upload = None
        self.model.load_global(self._global)

    def train(self, train_data: Any, device: Any, args: Any) -> dict[str, float]:
        cid, rnd = self.client_id(train_data), self.round_of(args)
        if self.cross_silo:  # the global just received is round rnd - 1's result: evaluate it first
            self.report = {"client": cid, "eval_round": rnd - 1, "eval": self._evaluate_if_due(cid, rnd - 1)}
        result = self.worker.fit(cid, rnd, dict(self._global))
        self._upload = OrderedDict((k, result.params[k]) for k in self.global_keys)
        self.last_fit = result
        if self.local_sample_number and int(self.local_sample_number) != result.num_examples:
            log.warning("client %d: FedML weights it by %s samples, it trained on %d", cid, self.local_sample_number,
                        result.num_examples)
        log.info("round %d client %d: %s", rnd, cid, {k: round(v, 4) for k, v in result.metrics.items()})
        if self.cross_silo:
            self.report.update(fit_round=rnd, fit=dict(result.metrics), num_examples=result.num_examples)
            self.last_round = rnd
            # the silo's own log (crosssilo.launch_loopback: <log_dir>/rank<r>.log) gets a line per round
            evaluated = self.report.get("eval") or {}
            shown = [f"loss {result.metrics['train_loss']:.3f}"] if "train_loss" in result.metrics else []
            shown += [f"{k} {evaluated[k]:.1f} (round {rnd - 1})" for k in ("local", "base", "novel") if k in evaluated]
            print(f"silo {get(self.args, 'rank')} client {cid} round {rnd}/{self.cfg.train.rounds}: "
                  f"{', '.join(shown) or 'trained'}", flush=True)
        return result.metrics

    # -- cross-silo: the server's table needs the clients' evaluations (personal prompts stay here) -----
    @property
    def cross_silo(self) -> bool:
        return get(self.args, "training_type") == "cross_silo"

    def _evaluate_if_due(self, cid: int, rnd: int) -> dict[str, float] | None:
        """This client's Local / Base / Novel for round `rnd` when our schedule evaluates that round."""
        if rnd % self.cfg.evaluation.every and rnd != self.cfg.train.rounds:
            return None
        self.last_eval = self.worker.evaluate(cid, rnd, dict(self._global)).metrics
        log.info("round %d client %d eval: %s", rnd, cid, self.last_eval)
        return dict(self.last_eval)

    def pop_report(self, final: bool = False) -> str | None:
        """JSON for the server (fedpgp_fedml.registry sends it with the upload, or with the FINISHED
        status): the evaluation of the previous round's global and this round's training metrics;
        final=True evaluates the last global, which FedML sends after the last round."""
        if final:
            if self.last_round is None:
                return None
            cid = self.client_id()
            self.report = {"client": cid, "eval_round": self.last_round,
                           "eval": self._evaluate_if_due(cid, self.last_round)}
            self.last_round = None  # FedML may send FINISHED twice: report once
        report, self.report = self.report, None
        return json.dumps(report) if report else None

    def test(self, test_data: Any, device: Any, args: Any) -> dict[str, float]:
        """Local / Base / Novel accuracy (%) of this client's personalised classifier (global + its U, V)."""
        cid, rnd = self.client_id(test_data), self.round_of(args)
        self.last_eval = self.worker.evaluate(cid, rnd, dict(self._global)).metrics
        log.info("round %d client %d eval: %s", rnd, cid, self.last_eval)
        return self.last_eval
