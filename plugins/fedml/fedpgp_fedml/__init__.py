"""fedpgp_fedml: FedPGP (and our other prompt-learning algorithms) as a FedML 0.9.6 algorithm.

    import fedml, fedpgp_fedml
    fedpgp_fedml.register()                                   # federated_optimizer: FedPGP
    args = fedpgp_fedml.load_arguments("fedml_config.yaml")   # offline fedml.init()
    dataset, model = fedpgp_fedml.load_data(args), fedpgp_fedml.create_model(args)
    fedml.FedMLRunner(args, fedml.device.get_device(args), dataset, model).run()

Importing this package patches nothing and imports FedML only when a FedML class is first used.
"""
from __future__ import annotations

import importlib
from typing import Any

from fedpgp_fedml.config import FedMLConfigError, experiment_config_from_args, load_arguments
from fedpgp_fedml.registry import fedml_home, register, registered, unregister

__version__ = "0.1.0"

_LAZY = {
    "FedPGPClientTrainer": "fedpgp_fedml.trainer",
    "FedPGPServerAggregator": "fedpgp_fedml.aggregator",
    "FedPGPSimulator": "fedpgp_fedml.simulator",
    "GlobalPromptModel": "fedpgp_fedml.model",
    "create_model": "fedpgp_fedml.model",
    "ClientData": "fedpgp_fedml.data",
    "FedPGPDatasetList": "fedpgp_fedml.data",
    "fedml_dataset": "fedpgp_fedml.data",
    "partition_from_fedml": "fedpgp_fedml.data",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedpgp_fedml' has no attribute {name!r}")


def load_data(args: Any):
    """FedML's 8-item dataset list of our federated task for these args (what FedMLRunner takes)."""
    from fedpgp_fedml.data import fedml_dataset
    return fedml_dataset(experiment_config_from_args(args))


__all__ = ["FedMLConfigError", "experiment_config_from_args", "fedml_home", "load_arguments", "load_data",
           "register", "registered", "unregister", *_LAZY]
