"""Data adapter, both ways: our federated partitions <-> FedML's 8-item dataset list.

FedML's runners unpack every dataset as

    [train_data_num, test_data_num, train_data_global, test_data_global,
     train_data_local_num_dict, train_data_local_dict, test_data_local_dict, class_num]

with dicts keyed by client index 0..N-1 whose values iterate over (x, y) batches.

* `fedml_dataset(cfg)`: our dataset + partition (exactly what our own runs use) in that shape. Each
  local value is a `ClientData` that iterates like a DataLoader (float images in [0, 1], [B, 3, H, W];
  labels as indices into the classifier's classes) and carries its partition client id, so our
  trainer uses cached CLIP features instead of pixels. The list also carries `.dataset`,
  `.partition` and `.cfg`.
* `partition_from_fedml(dataset_list, classnames)`: any FedML-style list (e.g. from
  `fedml.data.load`) as our `ClassificationDataset` + `FederatedPartition`: client i trains on
  train_data_local_dict[i]; its Local set is test_data_local_dict[i]; Base is test_data_global; every
  client's classifier covers all `class_num` classes; there is no novel set.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from fedpgp_ray.config import ExperimentConfig
from fedpgp_ray.data.base import ClassificationDataset, ImageSplit
from fedpgp_ray.data.partition import ClientPartition, EvalSet, FederatedPartition, partition_dataset
from fedpgp_ray.data.registry import build_dataset

from fedpgp_fedml.config import FedMLConfigError

log = logging.getLogger(__name__)


class ClientData:
    """One shard of our dataset, iterable like a FedML DataLoader: (images [B, 3, H, W] in [0, 1], labels [B]).

    client_id: the partition client this shard belongs to (None for the global sets).
    classes: the global label ids the classifier scores; labels are positions in this list.
    """

    def __init__(self, split: ImageSplit, indices: np.ndarray, classes: list[int], client_id: int | None,
                 batch_size: int) -> None:
        self.split = split
        self.indices = np.asarray(indices, dtype=np.int64)
        self.classes = list(classes)
        self.client_id = client_id
        self.batch_size = max(int(batch_size), 1)
        lookup = {c: i for i, c in enumerate(self.classes)}
        self.labels = np.asarray([lookup[int(y)] for y in split.labels[self.indices]], dtype=np.int64)

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def __len__(self) -> int:  # number of batches, as len(DataLoader)
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def _image(self, i: int) -> torch.Tensor:
        item = self.split.images[i]
        if isinstance(item, np.ndarray):
            array = item
        else:
            array = np.asarray(self.split.load(i).convert("RGB"))
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255.0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.indices), self.batch_size):
            rows = self.indices[start:start + self.batch_size]
            images = torch.stack([self._image(int(i)) for i in rows])
            yield images, torch.from_numpy(self.labels[start:start + self.batch_size])

    def __repr__(self) -> str:
        return f"ClientData(client_id={self.client_id}, samples={self.num_samples}, classes={len(self.classes)})"


class FedPGPDatasetList(list):
    """FedML's 8-item dataset list built from our partition; `.dataset`, `.partition`, `.cfg` keep the source."""

    dataset: ClassificationDataset
    partition: FederatedPartition
    cfg: ExperimentConfig


def fedml_dataset(cfg: ExperimentConfig, dataset: ClassificationDataset | None = None,
                  partition: FederatedPartition | None = None) -> FedPGPDatasetList:
    """Our federated task for `cfg` (the same dataset and partition our runs build) as FedML's 8-item list."""
    dataset = dataset if dataset is not None else build_dataset(cfg.data, cfg.seed)
    if partition is None:
        partition = partition_dataset(dataset, cfg.data, cfg.federation.num_clients, cfg.seed)
    bs = cfg.train.batch_size
    train_local = {c.client_id: ClientData(dataset.train, c.train_indices, partition.train_classes, c.client_id, bs)
                   for c in partition.clients}
    test_local = {c.client_id: ClientData(dataset.test, c.local.indices, c.local.classes, c.client_id,
                                          cfg.evaluation.batch_size) for c in partition.clients}
    all_train = np.unique(np.concatenate([c.train_indices for c in partition.clients]))
    train_global = ClientData(dataset.train, all_train, partition.train_classes, None, bs)
    test_global = ClientData(dataset.test, partition.base.indices, partition.base.classes, None,
                             cfg.evaluation.batch_size)
    items = FedPGPDatasetList([
        int(sum(d.num_samples for d in train_local.values())), test_global.num_samples, train_global, test_global,
        {cid: d.num_samples for cid, d in train_local.items()}, train_local, test_local,
        len(partition.train_classes)])
    items.dataset, items.partition, items.cfg = dataset, partition, cfg
    return items


# -- FedML list -> our partition ---------------------------------------------------------------------------
def _to_uint8_hwc(x: Any) -> np.ndarray:
    """A batch of images (torch/numpy; [B, C, H, W] or [B, H, W, C] or [B, H, W]) as uint8 RGB [B, H, W, 3].

    Floats in [0, 1] are scaled by 255; other floats (e.g. mean/std-normalised) are min-max scaled per image.
    """
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 2:  # flattened square grey images (FedML's MNIST "lr" layout: [B, 784])
        side = int(round(np.sqrt(a.shape[1])))
        if side * side != a.shape[1]:
            raise FedMLConfigError(f"cannot read images of shape {a.shape}: expected [B, C, H, W], [B, H, W, C], "
                                   f"[B, H, W] or flattened square images")
        a = a.reshape(len(a), side, side)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4:
        raise FedMLConfigError(f"cannot read images of shape {a.shape}: expected a batch of images")
    if a.shape[1] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(0, 2, 3, 1)
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        if a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        else:
            lo = a.min(axis=(1, 2, 3), keepdims=True)
            hi = a.max(axis=(1, 2, 3), keepdims=True)
            a = (a - lo) / np.maximum(hi - lo, 1e-12) * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a)


def _collect(loader: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(loader, ClientData):  # exact pixels and the same label positions, no float round trip
        images = np.stack([loader.split.images[int(i)] if isinstance(loader.split.images[int(i)], np.ndarray)
                           else np.asarray(loader.split.load(int(i)).convert("RGB")) for i in loader.indices]) \
            if len(loader.indices) else np.zeros((0, 1, 1, 3), np.uint8)
        return images, loader.labels.copy()
    xs, ys = [], []
    for batch in loader:
        x, y = batch[0], batch[1]
        xs.append(_to_uint8_hwc(x))
        ys.append(np.asarray(y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y, dtype=np.int64).ravel())
    if not xs:
        return np.zeros((0, 1, 1, 3), np.uint8), np.zeros(0, np.int64)
    shapes = {x.shape[1:] for x in xs}
    if len(shapes) > 1:
        raise FedMLConfigError(f"images of one dataset must share one size, got {sorted(shapes)}")
    return np.concatenate(xs), np.concatenate(ys)


def default_classnames(class_num: int) -> list[str]:
    return [f"class {i}" for i in range(class_num)]


def partition_from_fedml(dataset_list: Sequence[Any], classnames: Sequence[str] | None = None,
                         name: str | None = None) -> tuple[ClassificationDataset, FederatedPartition]:
    """A FedML 8-item dataset list as our dataset + partition (see the module docstring)."""
    if isinstance(dataset_list, FedPGPDatasetList):
        return dataset_list.dataset, dataset_list.partition
    if not isinstance(dataset_list, (list, tuple)) or len(dataset_list) != 8:
        raise FedMLConfigError("a FedML dataset must be the 8-item list [train_data_num, test_data_num, "
                               "train_data_global, test_data_global, train_data_local_num_dict, "
                               "train_data_local_dict, test_data_local_dict, class_num]")
    _, _, _, test_global, local_num, train_local, test_local, class_num = dataset_list
    class_num = int(class_num)
    client_ids = sorted(train_local)
    if client_ids != list(range(len(client_ids))):
        raise FedMLConfigError(f"train_data_local_dict must be keyed 0..N-1, got {client_ids}")
    names = list(classnames) if classnames else default_classnames(class_num)
    if not classnames:
        log.warning("no class names given (fedpgp_class_names): prompts use 'class 0', 'class 1', ...")
    if len(names) != class_num or len(set(names)) != len(names):
        raise FedMLConfigError(f"fedpgp_class_names must list {class_num} distinct class names (class_num), "
                               f"got {len(names)}")
    train_x, train_y, train_rows = [], [], []
    offset = 0
    for cid in client_ids:
        x, y = _collect(train_local[cid])
        if len(y) == 0:
            raise FedMLConfigError(f"client {cid} has no training data in train_data_local_dict")
        train_x.append(x), train_y.append(y), train_rows.append(np.arange(offset, offset + len(y)))
        offset += len(y)
        if local_num is not None and cid in local_num and int(local_num[cid]) != len(y):
            log.warning("train_data_local_num_dict[%d] = %s but client %d has %d samples; weights use %d",
                        cid, local_num[cid], cid, len(y), len(y))
    test_x, test_y, local_rows = [], [], []
    offset = 0
    for cid in client_ids:
        x, y = _collect(test_local[cid]) if test_local is not None and test_local.get(cid) is not None \
            else (np.zeros((0,) + train_x[0].shape[1:], np.uint8), np.zeros(0, np.int64))
        test_x.append(x), test_y.append(y), local_rows.append(np.arange(offset, offset + len(y)))
        offset += len(y)
    if test_global is not None:
        x, y = _collect(test_global)
        test_x.append(x), test_y.append(y)
        base_rows = np.arange(offset, offset + len(y))
    else:  # no global test set: Base is the union of the local test sets
        base_rows = np.arange(offset)
    shapes = {x.shape[1:] for x in train_x + test_x if len(x)}
    if len(shapes) > 1:
        raise FedMLConfigError(f"all images must share one size, got {sorted(shapes)}")
    tx, ty = np.concatenate(train_x), np.concatenate(train_y)
    vx = np.concatenate([x for x in test_x if len(x)]) if any(len(x) for x in test_x) else tx[:0]
    vy = np.concatenate(test_y)
    for label_set, what in ((ty, "training"), (vy, "test")):
        if len(label_set) and (label_set.min() < 0 or label_set.max() >= class_num):
            raise FedMLConfigError(f"{what} labels must lie in [0, class_num={class_num}), "
                                   f"got {label_set.min()}..{label_set.max()}")
    if name is None:
        digest = hashlib.sha256()
        for arr in (tx, ty, vx, vy):
            digest.update(np.ascontiguousarray(arr).tobytes())
        digest.update("\x00".join(names).encode())
        name = f"fedml-{digest.hexdigest()[:20]}"
    dataset = ClassificationDataset(name=name, classnames=names, train=ImageSplit(tx, ty), test=ImageSplit(vx, vy))
    every = list(range(class_num))
    clients = [ClientPartition(cid, train_rows[cid], sorted(np.unique(train_y[cid]).tolist()),
                               EvalSet(local_rows[cid], every)) for cid in client_ids]
    partition = FederatedPartition(names, every, clients, EvalSet(base_rows, every), None)
    return dataset, partition
