"""ClientWorker: one frozen CLIP serving many logical clients.

A worker builds the dataset, the federated partition and the frozen backbone once from the
config, caches image features, and keeps the personal state (personal prompt parameters and
the client's OWN optimizer state) of every client it serves. Only the global parameters and
the sample count leave a client. Runtimes (in-process, Ray actors) wrap this class.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fedpgp_ray.algorithms import Algorithm, FrozenEncoders, Params, build_algorithm
from fedpgp_ray.checkpoint import CheckpointStore
from fedpgp_ray.clip.backbone import load_clip
from fedpgp_ray.clip.features import ImageFeatureCache
from fedpgp_ray.config import ExperimentConfig
from fedpgp_ray.data.base import ClassificationDataset
from fedpgp_ray.data.partition import EvalSet, FederatedPartition, partition_dataset
from fedpgp_ray.data.registry import build_dataset


def seeded_generator(*parts: int) -> torch.Generator:
    """A torch generator whose stream depends only on `parts` (seed, round, client...)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


GLOBAL_INIT, PERSONAL_INIT, TRAIN_STREAM = 101, 202, 303


@dataclass
class ClientState:
    """What a client keeps between rounds: personal params and its own optimizer state."""
    personal: Params
    optimizer: dict | None = None


@dataclass
class FitResult:
    """A client's upload: global params only, its sample count, and training metrics."""
    client_id: int
    params: Params
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalResult:
    """Accuracies (%) of one client's classifier on its Local, Base and Novel sets."""
    client_id: int
    metrics: dict[str, float]


def init_global_params(algorithm: Algorithm, width: int, seed: int) -> Params:
    return algorithm.init_global(width, seeded_generator(seed, GLOBAL_INIT))


class ClientWorker:
    """Runs `fit` and `evaluate` for any client of the experiment on one backbone.

    store: where personal states are saved after each client's turn and restored from
        when this worker has not seen the client (actor restart, driver resume); None = memory only.
    """

    def __init__(self, cfg: ExperimentConfig, device: str | torch.device | None = None,
                 store: CheckpointStore | None = None, cache_dir: str | None = None, *,
                 dataset: ClassificationDataset | None = None, partition: FederatedPartition | None = None) -> None:
        # dataset / partition: given ones replace those built from cfg.data (adapters feeding external
        # data, e.g. the FedML plugin); a given partition must index the given dataset.
        self.cfg = cfg
        self.algorithm = build_algorithm(cfg.algorithm)
        self.dataset = dataset if dataset is not None else build_dataset(cfg.data, cfg.seed)
        self.partition: FederatedPartition = partition if partition is not None else partition_dataset(
            self.dataset, cfg.data, cfg.federation.num_clients, cfg.seed)
        self.encoders = FrozenEncoders(load_clip(cfg.model, device), cfg.algorithm.n_ctx)
        self.store = store
        self.states: dict[int, ClientState] = {}
        self._cache = ImageFeatureCache(self.encoders.clip, cache_dir, cfg.evaluation.batch_size)
        self._train_index = np.unique(np.concatenate([c.train_indices for c in self.partition.clients]))
        self._train_features: torch.Tensor | None = None
        self._test_features: torch.Tensor | None = None
        # Algorithms that declare `uses_patch_tokens = True` (FedOTP) get patch_tokens=[n, P, D] as a
        # keyword of loss() and logits(); the others never compute or receive them.
        self._uses_tokens = bool(getattr(self.algorithm, "uses_patch_tokens", False))
        self._train_tokens: torch.Tensor | None = None
        self._test_tokens: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.encoders.clip.device

    def global_params(self) -> Params:
        """Initial global parameters (identical in every worker for a given seed)."""
        return init_global_params(self.algorithm, self.encoders.width, self.cfg.seed)

    # -- features ----------------------------------------------------------------------------------
    def _features(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._train_features is None:
            views = self.cfg.data.augment_views
            train = self._cache.features(self.dataset.name, "train", self.dataset.train, self._train_index,
                                         views=views, seed=self.cfg.seed)
            test = self._cache.features(self.dataset.name, "test", self.dataset.test,
                                        np.arange(len(self.dataset.test)))
            self._train_features, self._test_features = train.to(self.device), test.to(self.device)
            if self._uses_tokens:
                train_tok = self._cache.patch_tokens(self.dataset.name, "train", self.dataset.train,
                                                     self._train_index, views=views, seed=self.cfg.seed)
                test_tok = self._cache.patch_tokens(self.dataset.name, "test", self.dataset.test,
                                                    np.arange(len(self.dataset.test)))
                self._train_tokens, self._test_tokens = train_tok.to(self.device), test_tok.to(self.device)
        return self._train_features, self._test_features

    def prepare(self) -> int:
        """Encode (or load) all image features now; returns the number of feature rows."""
        train, test = self._features()
        return train.shape[-2] + test.shape[0]

    # -- client state --------------------------------------------------------------------------------
    def state(self, client_id: int, before_round: int) -> ClientState:
        """The client's state, from memory, else the store, else a fresh seeded init."""
        if client_id not in self.states:
            saved = self.store.load_client(client_id, before_round - 1) if self.store else None
            if saved is not None:
                self.states[client_id] = ClientState(saved["personal"], saved.get("optimizer"))
            else:
                gen = seeded_generator(self.cfg.seed, PERSONAL_INIT, client_id)
                self.states[client_id] = ClientState(self.algorithm.init_personal(self.encoders.width, gen))
        return self.states[client_id]

    # -- fit ----------------------------------------------------------------------------------------
    def fit(self, client_id: int, rnd: int, global_params: Params) -> FitResult:
        """Train client `client_id` for E local epochs from the global params and its own state."""
        start = time.perf_counter()
        cfg, tc = self.cfg, self.cfg.train
        part = self.partition.clients[client_id]
        state = self.state(client_id, rnd)
        train_feats, _ = self._features()
        rows = torch.as_tensor(np.searchsorted(self._train_index, part.train_indices), device=self.device)
        feats = train_feats[..., rows, :]
        tokens = self._train_tokens[..., rows, :, :] if self._uses_tokens else None
        labels = self._labels(self.dataset.train.labels[part.train_indices], self.partition.train_classes)
        names = [self.partition.classnames[c] for c in self.partition.train_classes]

        merged = {**global_params, **state.personal}
        params = {k: v.detach().to(self.device).clone().requires_grad_(True) for k, v in merged.items()}
        start_global = {k: v.to(self.device) for k, v in global_params.items()}
        optimizer = torch.optim.SGD(list(params.values()), lr=tc.lr, momentum=tc.momentum,
                                    weight_decay=tc.weight_decay)
        if state.optimizer is not None:
            optimizer.load_state_dict(state.optimizer)

        gen = seeded_generator(cfg.seed, TRAIN_STREAM, rnd, client_id)
        n = len(labels)
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(tc.local_epochs):
            order = torch.randperm(n, generator=gen)
            for begin in range(0, n, tc.batch_size):
                idx = order[begin:begin + tc.batch_size]
                if feats.dim() == 3:  # cached augmented views: one random view per image
                    view = torch.randint(feats.shape[0], (len(idx),), generator=gen)
                    pick = (view.to(self.device), idx.to(self.device))
                else:
                    pick = (idx.to(self.device),)
                x = feats[pick]
                extra = {"patch_tokens": tokens[pick].float()} if tokens is not None else {}
                with self.encoders.clip.autocast():
                    terms = self.algorithm.loss(self.encoders, params, x, labels[idx.to(self.device)], names,
                                                start_global, **extra)
                optimizer.zero_grad(set_to_none=True)
                terms.total.backward()
                optimizer.step()
                steps += 1
                sums["loss"] = sums.get("loss", 0.0) + float(terms.total.detach())
                for key, value in terms.parts.items():
                    sums[f"loss_{key}"] = sums.get(f"loss_{key}", 0.0) + float(value.detach())

        state.personal = {k: params[k].detach().cpu() for k in self.algorithm.personal_keys}
        state.optimizer = _to_cpu(optimizer.state_dict())
        if self.store is not None:
            self.store.save_client(client_id, rnd, {"personal": state.personal, "optimizer": state.optimizer})
        metrics = {k: v / max(steps, 1) for k, v in sums.items()}
        metrics.update(steps=float(steps), fit_seconds=time.perf_counter() - start)
        upload = {k: params[k].detach().cpu() for k in self.algorithm.global_keys}
        return FitResult(client_id, upload, n, metrics)

    # -- evaluate -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def evaluate(self, client_id: int, rnd: int, global_params: Params) -> EvalResult:
        """Local / Base / Novel accuracy (%) of the client's classifier (global + its personal params)."""
        state = self.state(client_id, rnd + 1)
        params = {k: v.to(self.device) for k, v in {**global_params, **state.personal}.items()}
        part = self.partition.clients[client_id]
        metrics = {"local": self._accuracy(params, part.local), "base": self._accuracy(params, self.partition.base)}
        if self.partition.novel is not None:
            metrics["novel"] = self._accuracy(params, self.partition.novel)
        return EvalResult(client_id, metrics)

    def _accuracy(self, params: Params, eval_set: EvalSet) -> float:
        if len(eval_set.indices) == 0:
            return float("nan")
        _, test_feats = self._features()
        names = [self.partition.classnames[c] for c in eval_set.classes]
        rows = torch.as_tensor(eval_set.indices, device=self.device)
        extra = {"patch_tokens": self._test_tokens[rows].float()} if self._uses_tokens else {}
        with self.encoders.clip.autocast():
            logits = self.algorithm.logits(self.encoders, params, test_feats[rows], names, **extra)
        labels = self._labels(self.dataset.test.labels[eval_set.indices], eval_set.classes)
        return float((logits.argmax(-1) == labels).float().mean() * 100)

    def _labels(self, global_labels: np.ndarray, classes: list[int]) -> torch.Tensor:
        lookup = {c: i for i, c in enumerate(classes)}
        return torch.as_tensor([lookup[int(y)] for y in global_labels], dtype=torch.long, device=self.device)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
