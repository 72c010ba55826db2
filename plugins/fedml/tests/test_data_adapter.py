"""Our partitions <-> FedML's 8-item dataset list, and a run on FedML-provided data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _support import SMALL, small_config


@pytest.fixture(scope="module")
def ours(registered):
    return registered.load_data(registered.load_arguments(SMALL))


def test_our_partition_as_fedml_list(ours):
    from fedpgp_fedml import ClientData

    (train_num, test_num, train_global, test_global, local_num, train_local, test_local, class_num) = ours
    part = ours.partition
    assert sorted(train_local) == sorted(test_local) == sorted(local_num) == [0, 1, 2, 3]
    assert class_num == len(part.train_classes)
    assert train_num == sum(local_num.values()) == sum(len(c.train_indices) for c in part.clients)
    assert test_num == len(part.base.indices)
    for cid, data in train_local.items():
        assert isinstance(data, ClientData) and data.client_id == cid and local_num[cid] == data.num_samples
    x, y = next(iter(train_local[0]))
    assert x.dtype == torch.float32 and x.dim() == 4 and x.shape[1] == 3 and 0.0 <= x.min() and x.max() <= 1.0
    assert y.dtype == torch.int64 and int(y.max()) < class_num
    assert len(train_local[0]) == -(-train_local[0].num_samples // 8)  # batches, like len(DataLoader)
    assert sum(len(b[1]) for b in test_global) == test_num


def test_fedml_list_back_to_our_partition(ours, registered):
    """A plain FedML list (no marker) converts back to the same shards, pixels and labels."""
    from fedpgp_fedml import partition_from_fedml

    plain = [ours[0], ours[1], ours[2], ours[3], dict(ours[4]), dict(ours[5]), dict(ours[6]), ours[7]]
    names = [ours.partition.classnames[c] for c in ours.partition.train_classes]
    dataset, partition = partition_from_fedml(plain, names)
    assert [len(c.train_indices) for c in partition.clients] == [len(c.train_indices) for c in ours.partition.clients]
    for client, orig in zip(partition.clients, ours.partition.clients):
        assert np.array_equal(dataset.train.images[client.train_indices], ours.dataset.train.images[orig.train_indices])
        assert client.classes == orig.classes  # base labels are positions 0..n_base-1 in both
    assert partition.train_classes == list(range(ours[7])) and partition.novel is None
    # same list -> same dataset name (feature-cache key); the marker list short-cuts to the originals
    assert partition_from_fedml(plain, names)[0].name == dataset.name
    assert partition_from_fedml(ours)[1] is ours.partition


def fedml_style_dataset(num_clients=2, class_num=4, per_client=12, size=20, seed=0):
    """What fedml.data.load gives for an image task: normalised float tensors in DataLoader-like lists."""
    g = torch.Generator().manual_seed(seed)

    def batches(n, classes):
        y = torch.tensor([classes[i % len(classes)] for i in range(n)])
        x = (torch.rand(n, 1, size, size, generator=g) + y.view(-1, 1, 1, 1) * 0.5 - 0.1307) / 0.3081  # grey, normalised
        return [(x[i:i + 5], y[i:i + 5]) for i in range(0, n, 5)]

    train = {c: batches(per_client, [2 * c, 2 * c + 1]) for c in range(num_clients)}
    test = {c: batches(6, [2 * c, 2 * c + 1]) for c in range(num_clients)}
    test_global = [b for c in range(num_clients) for b in test[c]]
    train_global = [b for c in range(num_clients) for b in train[c]]
    return [num_clients * per_client, num_clients * 6, train_global, test_global,
            {c: per_client for c in range(num_clients)}, train, test, class_num]


def test_foreign_fedml_data_converts():
    from fedpgp_fedml import partition_from_fedml

    data = fedml_style_dataset()
    dataset, partition = partition_from_fedml(data, ["zero", "one", "two", "three"])
    assert dataset.train.images.shape == (24, 20, 20, 3) and dataset.train.images.dtype == np.uint8
    assert [c.classes for c in partition.clients] == [[0, 1], [2, 3]]
    assert len(partition.base.indices) == 12 and all(c.local.classes == [0, 1, 2, 3] for c in partition.clients)
    with pytest.raises(Exception, match="4 distinct class names"):
        partition_from_fedml(data, ["a", "b"])


def test_fedpgp_on_fedml_data_as_algorithm_flow(registered):
    """FedML-provided data, FedPGPSimulator passed as FedMLRunner's algorithm_flow (no dispatch hook needed)."""
    import fedml
    from fedpgp_fedml import FedPGPSimulator

    cfg = small_config(client_num_in_total=2, client_num_per_round=2, comm_round=1, dataset="mnist-like",
                       frequency_of_the_test=1)
    cfg["fedpgp_args"]["fedpgp_class_names"] = ["zero", "one", "two", "three"]
    args = registered.load_arguments(cfg)
    data, model = fedml_style_dataset(), registered.create_model(args)
    flow = FedPGPSimulator(args, "cpu", data, model)
    fedml.FedMLRunner(args, "cpu", data, model, algorithm_flow=flow).run()
    assert [r.round for r in flow.history] == [0, 1]
    assert flow.trainer.worker.dataset.name.startswith("fedml-")
    assert flow.results["final"]["local"] >= 0.0 and "novel" not in flow.results["final"]
    assert sorted(flow.trainer.worker.states) == [0, 1]
