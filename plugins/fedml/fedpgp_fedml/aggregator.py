"""FedPGPServerAggregator: FedML's ServerAggregator with our aggregation (sample-weighted mean of sigma).

`aggregate` is always overridden: FedML's default reaches an operator that only knows its own
algorithm names. The aggregator keeps the global parameters after every round (`history`) and,
with `fedpgp_output_dir` set, saves them as <dir>/global_round_<r>.pt (r = 1, 2, ...).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, List, Tuple

import torch
from fedml.core import ServerAggregator

from fedpgp_ray.strategy import aggregate_weighted

from fedpgp_fedml.config import experiment_config_from_args, get

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
        """sigma_global = sum_i n_i sigma_i / sum_i n_i over the reporting clients (our aggregate_weighted)."""
        uploads = [({k: torch.as_tensor(p[k]).detach().cpu() for k in self.global_keys}, int(n))
                   for n, p in raw_client_model_or_grad_list]
        if not uploads:
            raise RuntimeError("FedPGPServerAggregator.aggregate: no client uploads this round")
        new = aggregate_weighted(uploads)
        self._pending_round = int(getattr(self.args, "round_idx", 0) or 0) + 1
        log.info("round %d: aggregated %d uploads (%d samples)", self._pending_round, len(uploads),
                 sum(n for _, n in uploads))
        return OrderedDict((k, new[k].to(self.params[k].dtype)) for k in self.global_keys)

    def test(self, test_data: Any, device: Any, args: Any) -> dict[str, float]:
        """Server-side metrics: the latest round's averaged client metrics (personal prompts live on the
        clients, so the server cannot classify by itself); {} before any evaluation."""
        return self.metrics[max(self.metrics)] if self.metrics else {}

    def test_all(self, train_data_local_dict: Any, test_data_local_dict: Any, device: Any, args: Any) -> bool:
        return True
