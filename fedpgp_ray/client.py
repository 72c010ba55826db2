"""ClientWorker: one frozen CLIP serving many logical clients.

A worker builds the dataset, the federated partition and the frozen backbone once from the
config, caches image features, and keeps the personal state (personal prompt parameters and
the client's OWN optimizer state) of every client it serves. Only the global parameters and
the sample count leave a client. Runtimes (in-process, Ray actors) wrap this class.
"""
from __future__ import annotations

import logging
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpgp_ray.algorithms import Algorithm, FrozenEncoders, Params, build_algorithm
from fedpgp_ray.checkpoint import CheckpointStore, MissingClientState
from fedpgp_ray.clip.backbone import load_clip
from fedpgp_ray.client_results import MAX_LISTED_CLIENTS
from fedpgp_ray.client_speed import RoundClosing, SpeedModel
from fedpgp_ray.clip.features import FeatureRequest, ImageFeatureCache
from fedpgp_ray.config import ExperimentConfig
from fedpgp_ray.data.base import ClassificationDataset
from fedpgp_ray.data.partition import EvalSet, FederatedPartition, partition_dataset
from fedpgp_ray.data.registry import build_dataset
from fedpgp_ray.privacy import clip_upload, flat_update
from fedpgp_ray.secagg.protocol import SecAggClient, client_step


log = logging.getLogger(__name__)


def seeded_generator(*parts: int) -> torch.Generator:
    """A torch generator whose stream depends only on `parts` (seed, round, client...)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


GLOBAL_INIT, PERSONAL_INIT, TRAIN_STREAM = 101, 202, 303
TEST_CHUNK = 2048  # test images per feature-cache entry: fixed index ranges, shared by every actor and run


@dataclass
class ClientState:
    """What a client keeps between rounds: personal params, its own optimizer state, and the round that
    trained them (-1: a fresh init)."""
    personal: Params
    optimizer: dict | None = None
    round: int = -1


class ClientStateCache(OrderedDict):
    """Client id -> ClientState, least recently used first; holds at most `capacity` states (None: no
    bound). Only states that are also in the run storage may be dropped: a worker without storage
    keeps every state (capacity None)."""

    def __init__(self, capacity: int | None) -> None:
        super().__init__()
        self.capacity = capacity

    def __getitem__(self, client_id: int) -> ClientState:
        self.move_to_end(client_id)
        return super().__getitem__(client_id)

    def __setitem__(self, client_id: int, state: ClientState) -> None:
        super().__setitem__(client_id, state)
        self.move_to_end(client_id)
        while self.capacity is not None and len(self) > self.capacity:
            self.popitem(last=False)


@dataclass
class FitResult:
    """A client's upload: global params only, its sample count, and training metrics.

    late: the round closed before this client finished (deadline mode): nothing uploaded; `metrics` has
    `steps` if it trained (its personal state then moved on), none if it never started.
    """
    client_id: int
    params: Params
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    late: bool = False


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
        # personal states in memory: a bounded LRU over the run storage (runtime.client_state_cache)
        self.states = ClientStateCache(cfg.runtime.client_state_cache if store is not None else None)
        self.reinits: set[int] = set()  # clients re-initialised for lack of a saved state, not yet reported
        self._cache = ImageFeatureCache(self.encoders.clip, cache_dir, cfg.evaluation.batch_size,
                                        content_hash=cfg.data.cache_content_hash)
        # Features per client (its training shard, in train_indices order) and of the whole test set.
        self._train_features: dict[int, torch.Tensor] = {}
        self._test_features: torch.Tensor | None = None
        # Algorithms that declare `uses_patch_tokens = True` (FedOTP) get patch_tokens=[n, P, D] as a
        # keyword of loss() and logits(); the others never compute or receive them.
        self._uses_tokens = bool(getattr(self.algorithm, "uses_patch_tokens", False))
        self._train_tokens: dict[int, torch.Tensor] = {}
        self._test_tokens: torch.Tensor | None = None
        # Shared partition: the used training images (sorted) and their features per kind, in chunks.
        self._shared_rows: np.ndarray | None = None
        self._shared_chunks: dict[str, list[torch.Tensor]] = {}
        # SecAgg: a trained client's update waits here (never in a FitResult) until the protocol takes it
        self._secagg_updates: dict[int, np.ndarray] = {}
        self._secagg_clients: dict[int, SecAggClient] = {}
        self.speed = SpeedModel(cfg.client_speed, cfg.seed, cfg.federation.num_clients)
        self.closing = RoundClosing()  # the runtime says when a round stops wanting results (deadline mode)

    @property
    def device(self) -> torch.device:
        return self.encoders.clip.device

    def global_params(self) -> Params:
        """Initial global parameters (identical in every worker for a given seed)."""
        return init_global_params(self.algorithm, self.encoders.width, self.cfg.seed)

    # -- features ----------------------------------------------------------------------------------
    def _load_features(self, client_ids: list[int]) -> None:
        """Features of these clients' training shards and (once) of the test set, from the shared cache.

        One cache entry per client shard and per fixed range of test images: a Ray actor reads or
        encodes only its own clients' images, and actors on one node share the test set's entries
        (each entry is encoded by one of them; see ImageFeatureCache.fetch).
        """
        kinds = ["patch_tokens", "pooled"] if self._uses_tokens else ["pooled"]  # the token pass caches both
        views, name = self.cfg.data.augment_views, self.dataset.name
        wanted: list[tuple[int | None, FeatureRequest]] = []  # (client id or None for test, request)
        if self.partition.shared_images:  # clients share images: ranges of the split, not client shards
            self._load_shared_train_features(kinds)
            client_ids = []
        for cid in client_ids:
            shard = self.partition.clients[cid].train_indices
            wanted += [(cid, FeatureRequest(name, f"train/client{cid}", self.dataset.train, shard, views,
                                            self.cfg.seed, kind)) for kind in kinds]
        if self._test_features is None:
            n = len(self.dataset.test)
            for start in range(0, max(n, 1), TEST_CHUNK):
                rows = np.arange(start, min(start + TEST_CHUNK, n))
                wanted += [(None, FeatureRequest(name, "test", self.dataset.test, rows, kind=kind)) for kind in kinds]
        values = self._cache.fetch([request for _, request in wanted])
        test: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
        for (cid, request), value in zip(wanted, values):
            if cid is None:
                test[request.kind].append(value)
            elif request.kind == "pooled":
                self._train_features[cid] = value.to(self.device)
            else:
                self._train_tokens[cid] = value.to(self.device)
        if self._test_features is None:
            self._test_features = torch.cat(test["pooled"]).to(self.device)
            if self._uses_tokens:
                self._test_tokens = torch.cat(test["patch_tokens"]).to(self.device)

    def _load_shared_train_features(self, kinds: list[str]) -> None:
        """Shared partition: the features of every training image of the training classes, as cache entries
        of TEST_CHUNK consecutive images of that set (the same entries for any number of clients;
        memory-mapped from the cache: a client's rows are gathered when it runs, so memory holds only
        the clients of the moment)."""
        if self._shared_rows is not None:
            return
        used = np.flatnonzero(np.isin(self.dataset.train.labels, self.partition.train_classes))
        views, name, train = self.cfg.data.augment_views, self.dataset.name, self.dataset.train
        requests = [FeatureRequest(name, "train/shared", train, used[start:start + TEST_CHUNK], views,
                                   self.cfg.seed, kind)
                    for start in range(0, len(used), TEST_CHUNK) for kind in kinds]
        values = self._cache.fetch(requests)
        self._shared_chunks = {kind: [v for r, v in zip(requests, values) if r.kind == kind] for kind in kinds}
        self._shared_rows = used

    def _shared_client_features(self, client_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = np.searchsorted(self._shared_rows, self.partition.clients[client_id].train_indices)
        views = self.cfg.data.augment_views > 0

        def gather(chunks: list[torch.Tensor], axis: int) -> torch.Tensor:
            parts = [chunks[r // TEST_CHUNK].select(axis, int(r % TEST_CHUNK)) for r in rows.tolist()]
            return torch.stack(parts, dim=axis).to(self.device)

        pooled = gather(self._shared_chunks["pooled"], 1 if views else 0)
        tokens = gather(self._shared_chunks["patch_tokens"], 1 if views else 0) if self._uses_tokens else None
        return pooled, tokens

    def _client_features(self, client_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.partition.shared_images:
            if self._shared_rows is None:
                self._load_features([])
            return self._shared_client_features(client_id)
        if client_id not in self._train_features:
            self._load_features([client_id])
        return self._train_features[client_id], self._train_tokens.get(client_id)

    def _test(self) -> torch.Tensor:
        if self._test_features is None:
            self._load_features([])
        return self._test_features

    def prepare(self, client_ids: list[int] | None = None) -> int:
        """Encode (or read from the cache) the features of these clients (default: all) and of the test
        set now; returns the number of feature rows held."""
        if self.partition.shared_images:  # every client's images: the shared training features
            self._load_features([])
            return len(self._shared_rows) + self._test_features.shape[0]
        ids = list(range(len(self.partition.clients))) if client_ids is None else list(client_ids)
        self._load_features([c for c in ids if c not in self._train_features])
        return sum(self._train_features[c].shape[-2] for c in ids) + self._test_features.shape[0]

    @property
    def encoded_images(self) -> int:
        """Image passes this worker ran through the image tower (0 when everything came from the cache)."""
        return self._cache.encoded_images

    def dataset_manifest(self) -> dict[str, Any]:
        """What this run loaded, for results.json and MLflow: dataset, root, class names in label order,
        base and novel names, image counts per split and per client, and the feature-cache key used."""
        ds, part, data = self.dataset, self.partition, self.cfg.data
        names = part.classnames
        novel = part.novel
        common = self._cache.key_fields(FeatureRequest(ds.name, "train", ds.train, np.zeros(0, dtype=np.int64),
                                                       data.augment_views, self.cfg.seed))
        test_fields = self._cache.key_fields(FeatureRequest(ds.name, "test", ds.test, np.zeros(0, dtype=np.int64)))
        return {
            "dataset": data.dataset,
            "identity": ds.name,
            "root": str(Path(data.root).expanduser().absolute()) if data.root else None,
            "classnames": list(ds.classnames),
            "domains": list(ds.domains),
            "base_classes": [names[c] for c in part.train_classes],
            "novel_classes": ([names[c] for c in novel.classes] if novel is not None and part.novel_kind == "classes"
                              else []),
            "novel_kind": part.novel_kind,
            "held_out_domain": data.held_out_domain,
            "partition": {"kind": data.partition, "shots": data.shots, "class_order": data.class_order,
                          "partition_seed": data.partition_seed, "local_test": data.local_test,
                          "few_shot_pool": data.few_shot_pool},
            "images": {"train": len(ds.train), "test": len(ds.test),
                       "base_test": len(part.base.indices), "novel_test": 0 if novel is None else len(novel.indices)},
            "clients": {str(c.client_id): {"train": len(c.train_indices), "local_test": len(c.local.indices),
                                           "classes": len(c.classes), **({"domain": c.domain} if c.domain else {})}
                        for c in part.clients[:MAX_LISTED_CLIENTS]},  # bounded: a federation may be huge
            **({"clients_total": len(part.clients)} if len(part.clients) > MAX_LISTED_CLIENTS else {}),
            "feature_cache": {
                "directory": str(self._cache.directory) if self._cache.directory else None,
                "key_fields": sorted(common),
                "train": {k: v for k, v in common.items() if k not in ("kind", "images", "images_sha256")},
                "test_transform": test_fields["transform"],
                "entries": list(self._cache.keys_used),
            },
        }

    # -- client state --------------------------------------------------------------------------------
    def state(self, client_id: int, before_round: int, state_round: int | None = None) -> ClientState:
        """The client's state, from memory, else the store, else a fresh seeded init.

        state_round: the round that last trained the client, when the runtime knows it (Ray: another
        actor may have trained it since this one cached it); a cached state of another round is stale
        and is read again from the store.

        A client that trained before (the server's checkpointed history says so) but has no saved
        state gets no silent fresh init: MissingClientState, unless runtime.allow_state_reinit
        (then it is re-initialised and counted in `state_reinits`).
        """
        cached = self.states.get(client_id)
        if cached is not None and state_round is not None and cached.round != state_round and self.store:
            del self.states[client_id]
        if client_id not in self.states:
            # evaluate() runs under inference mode; a state restored (or initialised) there would hold
            # inference tensors, and the client's next fit could not update its SGD momentum in place
            with torch.inference_mode(False):
                self.states[client_id] = self._restore(client_id, before_round)
        return self.states[client_id]

    def forget_states(self) -> None:
        """Drop every client state held in memory (the run rolled back: states are restored from the store)."""
        self.states.clear()
        self.reinits.clear()
        self.closing = RoundClosing()  # the rounds after the rollback are played again

    def _restore(self, client_id: int, before_round: int) -> ClientState:
        """The client's saved state, else a fresh seeded init (see `state`)."""
        saved = self.store.load_client(client_id, before_round - 1) if self.store else None
        if saved is not None:
            return ClientState(saved["personal"], saved.get("optimizer"), saved["round"])
        if self.store is not None and self.store.trained_before(client_id, before_round):
            where = self.store.storage.display(f"clients/{client_id}")
            if not self.cfg.runtime.allow_state_reinit:
                raise MissingClientState(
                    f"client {client_id} trained before round {before_round} but its personal state "
                    f"is not in {where}: restore the run directory (or use storage all nodes share), "
                    f"or set runtime.allow_state_reinit=true to start it again from a fresh init")
            log.warning("client %d: no saved personal state in %s; re-initialised "
                        "(runtime.allow_state_reinit)", client_id, where)
            self.reinits.add(client_id)
        gen = seeded_generator(self.cfg.seed, PERSONAL_INIT, client_id)
        return ClientState(self.algorithm.init_personal(self.encoders.width, gen))

    # -- fit ----------------------------------------------------------------------------------------
    def fit(self, client_id: int, rnd: int, global_params: Params, state_round: int | None = None) -> FitResult:
        """Train client `client_id` for E local epochs from the global params and its own state
        (state_round: see `state`). A slow client (client_speed) then waits out its extra time, unless the
        round closes meanwhile: a late result, whose personal state is kept (docs/ASYNC.md)."""
        if self.closing.closed(rnd):  # the round closed before this client started: it does not train
            return FitResult(client_id, {}, 0, {}, late=True)
        start = time.perf_counter()
        cfg, tc = self.cfg, self.cfg.train
        part = self.partition.clients[client_id]
        state = self.state(client_id, rnd, state_round)
        feats, tokens = self._client_features(client_id)
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
        if cfg.privacy.enabled or cfg.secagg.enabled:
            # the momentum of the global prompt is built from raw, unclipped gradients: under DP / SecAgg it
            # is not kept (nor checkpointed, nor logged); each round starts it afresh
            for index, key in enumerate(params):
                if key in self.algorithm.global_keys:
                    state.optimizer["state"].pop(index, None)
        state.round = rnd
        if self.store is not None:
            self.store.save_client(client_id, rnd, {"personal": state.personal, "optimizer": state.optimizer})
        metrics = {k: v / max(steps, 1) for k, v in sums.items()}
        metrics.update(steps=float(steps), fit_seconds=time.perf_counter() - start)
        if client_id in self.reinits:
            self.reinits.discard(client_id)
            metrics["state_reinit"] = 1.0
        upload = {k: params[k].detach().cpu() for k in self.algorithm.global_keys}
        if cfg.privacy.enabled and upload:  # DP: the update is clipped here, on the client, before it leaves
            clip = cfg.privacy.clip_norm if cfg.privacy.clip_norm is not None else math.inf
            upload = clip_upload(upload, {k: global_params[k].detach().cpu() for k in upload}, clip)
        if cfg.secagg.enabled and upload:  # SecAgg: the update stays here; only masked vectors leave
            self._secagg_updates[client_id] = flat_update(upload, {k: global_params[k].detach().cpu() for k in upload})
            upload = {}
        if self.speed.enabled:
            extra = self.speed.extra_seconds(client_id, metrics["fit_seconds"])
            metrics["straggle_seconds"] = self.closing.wait(rnd, extra) if extra > 0 else 0.0
        if self.closing.closed(rnd):
            return FitResult(client_id, {}, n, metrics, late=True)
        return FitResult(client_id, upload, n, metrics)

    # -- secure aggregation ------------------------------------------------------------------------------
    def secagg_step(self, client_id: int, rnd: int, stage: str, request: Any) -> Any:
        """Run one SecAgg stage for a client (fedpgp_ray.secagg.protocol); the first stage's request is the
        round's public setup. Rounding and noise come from (seed, round, client) when seeded (privacy.seeded,
        or SecAgg without DP), else from a generator seeded with 128 bits of `secrets`."""
        if stage == "advertise":
            p = self.cfg.privacy
            seeded = not p.enabled or p.seeded
            rng = np.random.default_rng([self.cfg.seed, 29, rnd, client_id] if seeded else secrets.randbits(128))
            update = self._secagg_updates.pop(client_id, None)
            if update is None:
                raise RuntimeError(f"client {client_id} has no trained update for round {rnd}'s secure aggregation")
            self._secagg_clients[client_id] = SecAggClient(client_id, request, update, rng)
        out = client_step(self._secagg_clients[client_id], stage, request)
        if stage == "unmask":
            del self._secagg_clients[client_id]
        return out

    def secagg_batch(self, rnd: int, stage: str, requests: dict[int, Any]) -> dict[int, Any]:
        """secagg_step for several clients; a client whose step fails drops out of the round (left out)."""
        out = {}
        for cid, request in requests.items():
            try:
                out[cid] = self.secagg_step(cid, rnd, stage, request)
            except Exception as err:  # a failing client is a dropout; the protocol decides if the round survives
                log.warning("round %d: a client dropped out of secure aggregation at %s: %s", rnd, stage,
                            str(err).splitlines()[0] if str(err) else type(err).__name__)
                self._secagg_clients.pop(cid, None)
        return out

    # -- evaluate -------------------------------------------------------------------------------------
    def evaluate(self, client_id: int, rnd: int, global_params: Params, state_round: int | None = None
                 ) -> EvalResult:
        """Local / Base / Novel accuracy (%) of the client's classifier (global + its personal params)."""
        # loaded outside inference mode: the cached state is trained later (inference tensors cannot be)
        state = self.state(client_id, rnd + 1, state_round)
        with torch.inference_mode():
            return self._evaluate(client_id, state, global_params)

    def _evaluate(self, client_id: int, state: ClientState, global_params: Params) -> EvalResult:
        params = {k: v.to(self.device) for k, v in {**global_params, **state.personal}.items()}
        part = self.partition.clients[client_id]
        metrics = {"local": self._accuracy(params, part.local), "base": self._accuracy(params, self.partition.base)}
        if self.partition.novel is not None:
            metrics["novel"] = self._accuracy(params, self.partition.novel)
        return EvalResult(client_id, metrics)

    def _accuracy(self, params: Params, eval_set: EvalSet) -> float:
        if len(eval_set.indices) == 0:
            return float("nan")
        test_feats = self._test()
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
