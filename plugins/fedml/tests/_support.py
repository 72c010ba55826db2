"""Shared test configs (imported by the plugin tests)."""
from __future__ import annotations

import copy

# The brief's small experiment, written as a FedML config: 4 clients, 2 rounds, evaluation at rounds 0 and 2.
SMALL = {
    "common_args": {"training_type": "simulation", "random_seed": 0},
    "data_args": {"dataset": "world"},
    "model_args": {"model": "fedpgp-tiny"},
    "train_args": {"federated_optimizer": "FedPGP", "client_id_list": "[]", "client_num_in_total": 4,
                   "client_num_per_round": 4, "comm_round": 2, "epochs": 1, "batch_size": 8,
                   "client_optimizer": "sgd", "learning_rate": 0.002},
    "validation_args": {"frequency_of_the_test": 2},
    "device_args": {"using_gpu": False, "gpu_id": 0},
    "comm_args": {"backend": "sp"},
    "tracking_args": {"enable_tracking": False, "enable_wandb": False},
    "fedpgp_args": {"fedpgp_runtime": "local", "fedpgp_config": {
        "model": {"pretrained": None},
        "data": {"shots": 4, "world": {"num_classes": 40, "train_per_class": 8, "test_per_class": 6}},
        "tracking": {"mlflow": False}}},
}


def small_config(**changes) -> dict:
    """SMALL with flat FedML fields changed, e.g. small_config(comm_round=1) (None removes the field)."""
    cfg = copy.deepcopy(SMALL)
    for key, value in changes.items():
        section = next((s for s, fields in cfg.items() if key in fields), "train_args")
        if value is None:
            cfg[section].pop(key, None)
        else:
            cfg[section][key] = value
    return cfg


def max_abs_diff(a, b) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
