"""Federated partitions: base/novel classes, per-client training shards, evaluation sets.

All functions are pure and seeded; class order is by label id, never by set iteration.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

from fedpgp_ray.config import DataConfig
from fedpgp_ray.data.base import ClassificationDataset, DataError


@dataclass(frozen=True)
class EvalSet:
    """Test images scored by a classifier over `classes` (global label ids, sorted)."""
    indices: np.ndarray
    classes: list[int]


@dataclass(frozen=True)
class ClientPartition:
    """One client's share: training images (indices into dataset.train), its own classes, local test set."""
    client_id: int
    train_indices: np.ndarray
    classes: list[int]
    local: EvalSet
    domain: str | None = None


@dataclass(frozen=True)
class FederatedPartition:
    """The federated task.

    train_classes: the classifier used in training and Local/Base evaluation (all base classes).
    base: every test image of `train_classes` (for domain level: of the clients' domains).
    novel: the novel classes' test set with its own classifier; for domain level, the held-out
        domain's test set (same classes). None when there is nothing novel.
    """
    classnames: list[str]
    train_classes: list[int]
    clients: Sequence[ClientPartition]
    base: EvalSet
    novel: EvalSet | None
    novel_kind: str = "classes"

    @property
    def shared_images(self) -> bool:
        """Clients share training images (the "shared" partition): features are cached per range of the
        training split, not per client shard."""
        return isinstance(self.clients, ClientTable)


class ClientTable(Sequence[ClientPartition]):
    """The clients of a large federation as flat index arrays (a few bytes per image, nothing per client
    beyond its offset and classes); a ClientPartition is built when one client is asked for.

    offsets: int64 [K + 1]; client k's training images are train_indices[offsets[k]:offsets[k + 1]].
    classes: [K, c] each client's classes (global label ids, sorted per row).
    test_by_class: label -> sorted test indices of that class (a client's local test set: its classes').
    eval_classes: the classifier of the local test set (all base classes).
    """

    def __init__(self, offsets: np.ndarray, train_indices: np.ndarray, classes: np.ndarray,
                 test_by_class: dict[int, np.ndarray], eval_classes: list[int]) -> None:
        self.offsets = offsets
        self.train_indices = train_indices
        self.classes = classes
        self.test_by_class = test_by_class
        self.eval_classes = eval_classes

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, i: int) -> ClientPartition: ...

    @overload
    def __getitem__(self, i: slice) -> list[ClientPartition]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        k = int(i) + len(self) if int(i) < 0 else int(i)
        if not 0 <= k < len(self):
            raise IndexError(f"client {i} out of range (0..{len(self) - 1})")
        train = self.train_indices[self.offsets[k]:self.offsets[k + 1]].astype(np.int64)
        own = self.classes[k].tolist()
        local = np.sort(np.concatenate([self.test_by_class[c] for c in own]))
        return ClientPartition(k, train, own, EvalSet(local, self.eval_classes))

    @property
    def nbytes(self) -> int:
        """Bytes held for all clients (the per-class test lists are data-sized, not client-sized)."""
        return self.offsets.nbytes + self.train_indices.nbytes + self.classes.nbytes


def split_base_novel(num_classes: int) -> tuple[list[int], list[int]]:
    """The first ceil(n/2) labels (classes sorted by name) are base, the rest novel."""
    n_base = math.ceil(num_classes / 2)
    return list(range(n_base)), list(range(n_base, num_classes))


def pathological_classes(classes: list[int], num_clients: int, seed: int) -> list[list[int]]:
    """Shuffle classes with `seed` (data.partition_seed: fixed, 2023 as in the reference, unless set to
    null) and cut K contiguous chunks of round(n/K); the last takes the rest."""
    if len(classes) < num_clients:
        raise DataError(f"pathological partition needs at least one class per client: {len(classes)} classes "
                        f"for {num_clients} clients (lower federation.num_clients or use more classes)")
    order = np.random.default_rng(seed).permutation(classes).tolist()
    size = max(round(len(classes) / num_clients), 1)
    chunks = [order[i * size:(i + 1) * size] for i in range(num_clients - 1)]
    chunks.append(order[(num_clients - 1) * size:])
    if any(not c for c in chunks):
        size = len(classes) // num_clients  # round() overshot: fall back to floor so nobody is empty
        chunks = [order[i * size:(i + 1) * size] for i in range(num_clients - 1)] + [order[(num_clients - 1) * size:]]
    return [sorted(c) for c in chunks]


def dirichlet_indices(labels: np.ndarray, indices: np.ndarray, num_clients: int, beta: float,
                      rng: np.random.Generator) -> list[np.ndarray]:
    """Label skew: each class's images are split over clients with proportions ~ Dir(beta)."""
    return dirichlet_split(labels, indices, num_clients, beta, rng)[0]


def dirichlet_split(labels: np.ndarray, indices: np.ndarray, num_clients: int, beta: float,
                    rng: np.random.Generator) -> tuple[list[np.ndarray], dict[int, np.ndarray]]:
    """`dirichlet_indices` plus the proportions drawn for each class (label -> [num_clients])."""
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    proportions: dict[int, np.ndarray] = {}
    for label in np.unique(labels[indices]):
        members = rng.permutation(indices[labels[indices] == label])
        proportions[int(label)] = rng.dirichlet(np.full(num_clients, beta))
        for client, part in enumerate(split_by_proportions(members, proportions[int(label)])):
            shards[client].extend(part.tolist())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards], proportions


def split_by_proportions(members: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    """Cut `members` into len(proportions) consecutive parts of (floored cumulative) sizes."""
    cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
    return np.split(members, cuts)


def local_test_split(labels: np.ndarray, proportions: dict[int, np.ndarray], num_clients: int,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """The reference's Dirichlet local test sets: each class's test images split over the clients with
    the proportions that class's training images were split with (disjoint; they sum to the test set)."""
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    for label, props in sorted(proportions.items()):
        members = rng.permutation(np.flatnonzero(labels == label))
        for client, part in enumerate(split_by_proportions(members, props)):
            shards[client].extend(part.tolist())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


def few_shot(indices: np.ndarray, labels: np.ndarray, shots: int, rng: np.random.Generator) -> np.ndarray:
    """Keep at most `shots` images per class (all of a class that has fewer)."""
    keep = []
    for label in np.unique(labels[indices]):
        members = indices[labels[indices] == label]
        keep.append(rng.choice(members, size=min(shots, len(members)), replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def _test_of(dataset: ClassificationDataset, classes: list[int], domains: list[int] | None = None) -> np.ndarray:
    mask = np.isin(dataset.test.labels, classes)
    if domains is not None:
        mask &= np.isin(dataset.test.domains, domains)
    return np.flatnonzero(mask)


def partition_dataset(dataset: ClassificationDataset, cfg: DataConfig, num_clients: int,
                      seed: int) -> FederatedPartition:
    """Build the federated task described by `cfg` (see DataConfig.partition)."""
    if cfg.partition == "domain":
        return _partition_domains(dataset, cfg, num_clients, seed)
    if cfg.partition == "shared":
        return partition_shared(dataset, cfg, num_clients, seed)
    n = len(dataset.classnames)
    base, novel = split_base_novel(n) if cfg.base_novel else (list(range(n)), [])
    rng = np.random.default_rng([seed, 1])
    train_labels = dataset.train.labels
    in_base = np.flatnonzero(np.isin(train_labels, base))
    local_tests = None
    if cfg.partition == "pathological":
        shuffle_seed = seed if cfg.partition_seed is None else cfg.partition_seed
        chunks = pathological_classes(base, num_clients, shuffle_seed)
        shards = [np.flatnonzero(np.isin(train_labels, c)) for c in chunks]
    else:
        shards, proportions = dirichlet_split(train_labels, in_base, num_clients, cfg.beta, rng)
        if cfg.local_test == "split":  # own stream: the training shards do not depend on this option
            local_tests = local_test_split(dataset.test.labels, proportions, num_clients,
                                           np.random.default_rng([seed, 3]))
    clients = []
    for cid, shard in enumerate(shards):
        train = few_shot(shard, train_labels, cfg.shots, rng)
        own = sorted(np.unique(train_labels[train]).tolist())
        if not own:
            raise DataError(f"client {cid} received no training images: raise data.beta or lower "
                            f"federation.num_clients")
        local = local_tests[cid] if local_tests is not None else _test_of(dataset, own)
        clients.append(ClientPartition(cid, train, own, EvalSet(local, base)))
    novel_set = EvalSet(_test_of(dataset, novel), novel) if novel else None
    return FederatedPartition(list(dataset.classnames), base, clients, EvalSet(_test_of(dataset, base), base),
                              novel_set)


def _partition_domains(dataset: ClassificationDataset, cfg: DataConfig, num_clients: int,
                       seed: int) -> FederatedPartition:
    """One domain per client (several clients per domain split by Dir(beta) label skew), one held out."""
    if not dataset.domains or dataset.train.domains is None:
        raise DataError(f"data.partition: domain needs a domain-level dataset; '{dataset.name}' has no domains")
    names = list(dataset.domains)
    held = cfg.held_out_domain
    if held is not None and held not in names:
        raise DataError(f"data.held_out_domain '{held}' is not a domain of this dataset: choose one of "
                        f"{', '.join(names)} or null")
    train_domains = [d for d in names if d != held]
    if num_clients % len(train_domains):
        raise DataError(f"federation.num_clients ({num_clients}) must be a multiple of the {len(train_domains)} "
                        f"training domains ({', '.join(train_domains)})")
    per_domain = num_clients // len(train_domains)
    classes = list(range(len(dataset.classnames)))
    rng = np.random.default_rng([seed, 2])
    clients = []
    for domain in train_domains:
        d = names.index(domain)
        members = np.flatnonzero(dataset.train.domains == d)
        shards = [members] if per_domain == 1 else dirichlet_indices(
            dataset.train.labels, members, per_domain, cfg.beta, rng)
        for shard in shards:
            train = few_shot(shard, dataset.train.labels, cfg.shots, rng)
            own = sorted(np.unique(dataset.train.labels[train]).tolist())
            local = EvalSet(_test_of(dataset, own, [d]), classes)
            clients.append(ClientPartition(len(clients), train, own, local, domain))
    base = EvalSet(_test_of(dataset, classes, [names.index(d) for d in train_domains]), classes)
    novel = EvalSet(_test_of(dataset, classes, [names.index(held)]), classes) if held else None
    return FederatedPartition(list(dataset.classnames), classes, clients, base, novel, novel_kind="domain")


BLOCK_CLIENTS = 8192  # clients drawn per vectorised block (bounds the temporary [block, base classes] array)


def partition_shared(dataset: ClassificationDataset, cfg: DataConfig, num_clients: int,
                     seed: int) -> FederatedPartition:
    """Cross-device populations larger than the dataset: each client draws `data.classes_per_client`
    distinct base classes uniformly, and for each a window of `shots` consecutive images of that class's
    shuffled training pool (wrapping around), so images are shared between clients but distinct
    within one. Local test: every test image of the client's classes. Built with array operations only
    (no Python work per client) into a ClientTable."""
    n = len(dataset.classnames)
    base, novel = split_base_novel(n) if cfg.base_novel else (list(range(n)), [])
    per_client = cfg.classes_per_client
    if per_client > len(base):
        raise DataError(f"data.classes_per_client ({per_client}) exceeds the {len(base)} base classes: lower it "
                        f"or use more classes")
    labels = dataset.train.labels
    rng = np.random.default_rng([seed, 4])
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in base]
    empty = [dataset.classnames[c] for c, pool in zip(base, pools) if len(pool) == 0]
    if empty:
        raise DataError(f"base class {empty[0]!r} has no training images: data.partition 'shared' needs images "
                        f"of every base class")
    pool_size = np.array([len(p) for p in pools], dtype=np.int64)
    pool_start = np.concatenate([[0], np.cumsum(pool_size)[:-1]])
    pool_flat = np.concatenate(pools)
    # each client's classes (positions in `base`): the first c of a random permutation of the base classes
    slots = np.empty((num_clients, per_client), dtype=np.int64)
    for begin in range(0, num_clients, BLOCK_CLIENTS):
        end = min(begin + BLOCK_CLIENTS, num_clients)
        keys = rng.random((end - begin, len(base)), dtype=np.float32)
        slots[begin:end] = np.sort(np.argpartition(keys, per_client - 1, axis=1)[:, :per_client], axis=1)
    slot = slots.ravel()                                         # [K * c] (client, class) pairs
    take = np.minimum(cfg.shots, pool_size[slot])
    start = (rng.random(len(slot)) * pool_size[slot]).astype(np.int64)
    pair = np.repeat(np.arange(len(slot)), take)
    within = np.arange(len(pair)) - np.repeat(np.cumsum(take) - take, take)
    images = pool_flat[pool_start[slot[pair]] + (start[pair] + within) % pool_size[slot[pair]]]
    client = pair // per_client
    order = np.lexsort((images, client))                         # sorted by client, then image index
    index_dtype = np.int32 if len(labels) < 2**31 else np.int64
    counts = take.reshape(num_clients, per_client).sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    base_ids = np.asarray(base, dtype=np.int16 if n < 2**15 else np.int32)
    test_labels = dataset.test.labels
    test_by_class = {c: np.flatnonzero(test_labels == c) for c in base}
    table = ClientTable(offsets, images[order].astype(index_dtype), base_ids[slots], test_by_class, base)
    novel_set = EvalSet(_test_of(dataset, novel), novel) if novel else None
    return FederatedPartition(list(dataset.classnames), base, table, EvalSet(_test_of(dataset, base), base),
                              novel_set)
