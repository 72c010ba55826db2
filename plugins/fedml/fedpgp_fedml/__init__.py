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

__version__ = "0.1.0"

# Everything is imported on first use: `python -m fedpgp_fedml.crosssilo --help` (which imports this
# package first) must not pay for torch, open_clip or FedML.
_LAZY = {
    "FedMLConfigError": "fedpgp_fedml.config",
    "experiment_config_from_args": "fedpgp_fedml.config",
    "load_arguments": "fedpgp_fedml.config",
    "fedml_home": "fedpgp_fedml.home",
    "register": "fedpgp_fedml.registry",
    "registered": "fedpgp_fedml.registry",
    "unregister": "fedpgp_fedml.registry",
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
    from fedpgp_fedml.config import experiment_config_from_args
    from fedpgp_fedml.data import fedml_dataset
    return fedml_dataset(experiment_config_from_args(args))


__all__ = ["load_data", *_LAZY]
