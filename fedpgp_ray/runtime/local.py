"""In-process runtime: one ClientWorker runs every client in turn (debugging, tests, laptops)."""
from __future__ import annotations

import torch

from fedpgp_ray.algorithms import Params
from fedpgp_ray.checkpoint import CheckpointStore
from fedpgp_ray.client import ClientWorker, EvalResult, FitResult
from fedpgp_ray.config import ExperimentConfig
from fedpgp_ray.runtime.base import Runtime, status
from fedpgp_ray.strategy import ClientFailure


class LocalRuntime(Runtime):
    """Sequential clients in this process. threads: torch intra-op threads (0 = torch's default)."""

    def __init__(self, cfg: ExperimentConfig, store: CheckpointStore | None, cache_dir: str | None) -> None:
        if cfg.runtime.threads_per_worker:
            torch.set_num_threads(cfg.runtime.threads_per_worker)
        status("local runtime: loading the backbone, reading (or encoding, once) the image features")
        self.worker = ClientWorker(cfg, store=store, cache_dir=cache_dir)
        self.worker.prepare()

    def dataset_manifest(self) -> dict:
        return self.worker.dataset_manifest()

    def initial_global_params(self) -> Params:
        return self.worker.global_params()

    def fit(self, rnd: int, client_ids: list[int], global_params: Params
            ) -> tuple[list[FitResult], list[ClientFailure]]:
        return [self.worker.fit(cid, rnd, global_params) for cid in client_ids], []

    def evaluate(self, rnd: int, client_ids: list[int], global_params: Params
                 ) -> tuple[list[EvalResult], list[ClientFailure]]:
        return [self.worker.evaluate(cid, rnd, global_params) for cid in client_ids], []
