"""FedML arguments in, our validated ExperimentConfig out; FedML YAML loading without argv, network or logs.

FedML flattens its YAML two levels deep (`train_args: {comm_round: 2}` becomes `args.comm_round`), so
this module speaks in those flat names and names their usual section in error messages.

Mapping (FedML field -> fedpgp-ray config key); FedML's fields win over `fedpgp_config`:

    random_seed -> seed                     dataset -> data.dataset         model -> model.name
    comm_round -> train.rounds              epochs -> train.local_epochs    batch_size -> train.batch_size
    learning_rate -> train.lr               weight_decay -> train.weight_decay   momentum -> train.momentum
    client_num_in_total -> federation.num_clients
    client_num_per_round -> federation.client_fraction (= per_round / in_total)
    frequency_of_the_test -> evaluation.every
    using_gpu -> model.device ("auto" if true, "cpu" if false)
    fedpgp_runtime -> runtime.kind ("local": one process; "ray": our Ray runtime)
    fedpgp_output_dir -> output_dir
    federated_optimizer (a registered name, e.g. FedPGP) -> algorithm.name (e.g. "fedpgp")

Everything else of our config (backbone weights, rank, mu, tau, data sizes, Ray resources) goes in
`fedpgp_config:` (a mapping with our keys) or `fedpgp_config_file:` (a path to our YAML).
"""
from __future__ import annotations

import argparse
import copy
import difflib
import math
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from fedpgp_ray.config import ConfigError, ExperimentConfig, config_from_dict

# Names FedML 0.9.6 dispatches itself (constants.py); a plugin name may not shadow them.
FEDML_OPTIMIZERS = ("FedAvg", "FedOpt", "FedProx", "classical_vertical", "split_nn", "decentralized_fl", "FedGAN",
                    "FedAvg_robust", "FedAvg_seq", "FedOpt_seq", "FedGKT", "FedNAS", "FedSeg", "turbo_aggregate",
                    "FedNova", "FedDyn", "SCAFFOLD", "Mime", "HierarchicalFL", "FedSGD", "FedLocalSGD",
                    "Async_FedAvg", "base_framework", "LSA", "SA")
# The built-ins of the single-process simulator's if/elif (fedml/simulation/simulator.py).
FEDML_SP_OPTIMIZERS = ("FedAvg", "FedOpt", "FedNova", "FedDyn", "FedProx", "SCAFFOLD", "Mime", "HierarchicalFL",
                       "turbo_aggregate", "classical_vertical")
FEDML_CROSS_SILO_OPTIMIZERS = ("FedAvg", "LSA", "SA")

SECTIONS = {
    "training_type": "common_args", "random_seed": "common_args", "scenario": "common_args",
    "dataset": "data_args", "data_cache_dir": "data_args", "model": "model_args",
    "federated_optimizer": "train_args", "client_num_in_total": "train_args", "client_num_per_round": "train_args",
    "comm_round": "train_args", "epochs": "train_args", "batch_size": "train_args", "learning_rate": "train_args",
    "weight_decay": "train_args", "momentum": "train_args", "client_optimizer": "train_args",
    "client_id_list": "train_args", "frequency_of_the_test": "validation_args", "using_gpu": "device_args",
    "gpu_id": "device_args", "backend": "comm_args", "grpc_ipconfig_path": "comm_args",
    "enable_tracking": "tracking_args", "enable_wandb": "tracking_args", "using_mlops": "tracking_args",
}
PLUGIN_SECTION = "fedpgp_args"

# FedML field -> our dotted key (the direct copies; client_num_per_round and using_gpu are derived).
DIRECT = {
    "random_seed": "seed", "dataset": "data.dataset", "model": "model.name", "comm_round": "train.rounds",
    "epochs": "train.local_epochs", "batch_size": "train.batch_size", "learning_rate": "train.lr",
    "weight_decay": "train.weight_decay", "momentum": "train.momentum", "client_num_in_total": "federation.num_clients",
    "frequency_of_the_test": "evaluation.every", "fedpgp_runtime": "runtime.kind", "fedpgp_output_dir": "output_dir",
}
REQUIRED = ("training_type", "federated_optimizer", "dataset", "comm_round", "client_num_in_total",
            "client_num_per_round", "epochs", "batch_size", "learning_rate")
CROSS_SILO_REQUIRED = ("rank", "role", "backend")

# fedpgp_fedml's registry of FedML names -> our algorithm names (filled by register()).
REGISTERED: dict[str, str] = {}
KNOWN_PLUGIN_NAMES = {"FedPGP": "fedpgp"}


class FedMLConfigError(ConfigError):
    """A FedML config (YAML or args) cannot run a fedpgp_fedml algorithm; the message says what to change."""


def where(field: str) -> str:
    """`train_args.comm_round`-style name of a flat FedML field."""
    section = SECTIONS.get(field, PLUGIN_SECTION if field.startswith("fedpgp_") else None)
    return f"{section}.{field}" if section else field


def get(args: Any, field: str, default: Any = None) -> Any:
    return getattr(args, field, default) if not isinstance(args, Mapping) else args.get(field, default)


def has(args: Any, field: str) -> bool:
    return (field in args) if isinstance(args, Mapping) else hasattr(args, field)


# -- algorithm names ---------------------------------------------------------------------------------
def unknown_algorithm_message(name: Any, mode: str) -> str:
    builtins = FEDML_SP_OPTIMIZERS if mode == "sp" else FEDML_CROSS_SILO_OPTIMIZERS
    choices = list(REGISTERED) + list(builtins)
    close = difflib.get_close_matches(str(name), choices + list(KNOWN_PLUGIN_NAMES), n=1, cutoff=0.6)
    close += [c for c in choices + list(KNOWN_PLUGIN_NAMES) if str(name).lower() == c.lower() and c not in close]
    hint = f" Did you mean {close[-1]!r}?" if close else ""
    unregistered = [n for n in KNOWN_PLUGIN_NAMES if n not in REGISTERED]
    reg = (f" fedpgp_fedml provides {', '.join(unregistered)}: call fedpgp_fedml.register() before FedMLRunner."
           if unregistered else "")
    return (f"{where('federated_optimizer')} = {name!r} is not an algorithm FedML can run here ({mode}): "
            f"registered plugin algorithms: {', '.join(REGISTERED) or 'none'}; FedML built-ins: "
            f"{', '.join(builtins)}.{hint}{reg}")


def plugin_algorithm(args: Any) -> str:
    """Our algorithm name for these args: a registered `federated_optimizer`, else `fedpgp_algorithm`."""
    name = get(args, "federated_optimizer")
    if name in REGISTERED:
        return REGISTERED[name]
    explicit = get(args, "fedpgp_algorithm")
    if explicit:  # e.g. unpatched cross-silo: federated_optimizer FedAvg + fedpgp_algorithm fedpgp
        return str(explicit)
    if name is None:
        raise FedMLConfigError(f"FedML config is missing {where('federated_optimizer')}: set it to "
                               f"{' or '.join(REGISTERED) or 'FedPGP'} (after fedpgp_fedml.register())")
    raise FedMLConfigError(unknown_algorithm_message(name, "sp" if get(args, "backend") == "sp" else "cross_silo"))


# -- args -> ExperimentConfig ------------------------------------------------------------------------------
def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def exact_fraction(per_round: int, total: int) -> float:
    """A fraction f with floor(f * total) == per_round (our strategy samples max(floor(f*K), 1) clients)."""
    f = per_round / total
    while math.floor(f * total) < per_round:
        f = math.nextafter(f, 2.0)
    return min(f, 1.0)


def _check_int(args: Any, field: str, lo: int) -> int:
    value = get(args, field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FedMLConfigError(f"{where(field)} must be an integer, got {value!r}: fix it in the FedML YAML")
    if value < lo:
        raise FedMLConfigError(f"{where(field)} = {value} is out of range: must be >= {lo}")
    return value


def missing_fields(args: Any, fields: tuple[str, ...] = REQUIRED) -> list[str]:
    return [f for f in fields if not has(args, f) or get(args, f) is None]


def experiment_config_from_args(args: Any) -> ExperimentConfig:
    """Validate FedML args for a fedpgp_fedml algorithm and return our ExperimentConfig."""
    missing = missing_fields(args)
    if missing:
        raise FedMLConfigError("FedML config is missing " + ", ".join(where(f) for f in missing) +
                               ": the fedpgp_fedml algorithms need them (see plugins/fedml/examples/fedml_config.yaml)")
    algorithm = plugin_algorithm(args)
    optimizer = get(args, "client_optimizer")
    if optimizer is not None and str(optimizer).lower() != "sgd":
        raise FedMLConfigError(f"{where('client_optimizer')} = {optimizer!r}: FedPGP trains with SGD with momentum "
                               f"(the paper's setting); set client_optimizer: sgd")
    for flag in ("enable_tracking", "enable_wandb", "using_mlops"):
        if get(args, flag) in (True, "True", "true", 1):
            raise FedMLConfigError(f"{where(flag)} is on: it would contact FedML's cloud or W&B, and the fedpgp_fedml "
                                   f"path runs offline; set it to false (our MLflow tracking is configured under "
                                   f"fedpgp_config.tracking)")
    total = _check_int(args, "client_num_in_total", 1)
    per_round = _check_int(args, "client_num_per_round", 1)
    if per_round > total:
        raise FedMLConfigError(f"{where('client_num_per_round')} = {per_round} is larger than "
                               f"{where('client_num_in_total')} = {total}")
    if get(args, "training_type") == "cross_silo" and per_round != total:
        # FedML 0.9.6's cross-silo server hands each silo a different partition client from round to
        # round: a client's personal prompt would be split between processes or restarted from init,
        # some clients would never train, and the final table would average in untrained ones.
        raise FedMLConfigError(f"cross-silo needs one partition client per silo: {where('client_num_in_total')} = "
                               f"{total} but {where('client_num_per_round')} = {per_round} silos; set both to the "
                               f"number of silos, or run more clients than processes in simulation (backend sp)")

    data: dict[str, Any] = {}
    config_file = get(args, "fedpgp_config_file")
    if config_file:
        path = Path(str(config_file)).expanduser()
        if not path.is_file():
            raise FedMLConfigError(f"{where('fedpgp_config_file')}: file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
    extra = get(args, "fedpgp_config") or {}
    if not isinstance(extra, Mapping):
        raise FedMLConfigError(f"{where('fedpgp_config')} must be a mapping of fedpgp-ray config keys "
                               f"(e.g. {{algorithm: {{rank: 8}}}}), got {extra!r}")
    data = _merge(data, extra)
    for field, key in DIRECT.items():
        if has(args, field) and get(args, field) is not None:
            _set(data, key, get(args, field))
    _set(data, "federation.client_fraction", exact_fraction(per_round, total))
    if has(args, "using_gpu") and get(args, "using_gpu") is not None:
        _set(data, "model.device", "auto" if get(args, "using_gpu") else "cpu")
    _set(data, "algorithm.name", algorithm)
    try:
        cfg = config_from_dict(data)
    except ConfigError as err:
        message = str(err)
        for field, key in {**DIRECT, "client_num_per_round": "federation.client_fraction",
                           "federated_optimizer": "algorithm.name"}.items():
            message = message.replace(f"'{key}'", f"'{key}' (FedML {where(field)})")
        raise FedMLConfigError(f"FedML config: {message}") from None
    if cfg.secagg.enabled:
        raise FedMLConfigError("FedML config: fedpgp_config.secagg.enabled is not supported on FedML (its transport "
                               "has no SecAgg stages): use fedpgp-ray's in-process or Ray runtime, or set it to false")
    if cfg.federation.round_deadline_s is not None or cfg.federation.over_selection > 0:
        raise FedMLConfigError("FedML config: fedpgp_config.federation.round_deadline_s / over_selection are not "
                               "supported on FedML (its rounds wait for every silo): use fedpgp-ray's in-process or "
                               "Ray runtime, or remove them")
    return cfg


# -- loading FedML arguments offline -----------------------------------------------------------------------
CMD_DEFAULTS = {"yaml_config_file": "", "run_id": "0", "rank": 0, "local_rank": 0, "node_rank": 0, "role": "client",
                "run_device_id": "0", "using_mlops": False}
OFFLINE_DEFAULTS = {"using_mlops": False, "enable_tracking": False, "enable_wandb": False, "sys_perf_profiling": False,
                    "skip_log_model_net": True, "scenario": "horizontal", "frequency_of_the_test": 1}


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A FedML YAML as {section: {field: value}}, with errors that name the file (FedML itself swallows them)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FedMLConfigError(f"FedML config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise FedMLConfigError(f"FedML config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    check_sections(data, str(path))
    return data


def check_sections(data: Any, origin: str) -> None:
    if not isinstance(data, Mapping):
        raise FedMLConfigError(f"FedML config {origin} must be a mapping of sections (common_args, train_args, ...)")
    for section, fields in data.items():
        if not isinstance(fields, Mapping):
            raise FedMLConfigError(f"FedML config {origin}: section {section!r} must be a mapping of fields, "
                                   f"got {fields!r} (FedML reads every top-level key as a section)")


def load_arguments(config: str | os.PathLike | Mapping[str, Any], **overrides: Any):
    """FedML `Arguments` from a YAML path or a {section: {field: value}} mapping, ready for FedMLRunner.

    The offline counterpart of `fedml.init()`: it reads no argv, contacts no server, installs no log
    handlers and writes nothing under ~/.fedml. `overrides` set flat fields after the YAML (e.g.
    rank=1, role="client" for a cross-silo client). Fails with FedMLConfigError on a config that
    cannot run (missing fields, unknown algorithm, tracking switched on).
    """
    from fedml.arguments import Arguments  # FedML's own args class, so FedML code sees what it expects

    if isinstance(config, Mapping):
        data, origin = copy.deepcopy(dict(config)), "mapping"
        check_sections(data, origin)
    else:
        data, origin = read_yaml(config), str(config)
    args = Arguments.__new__(Arguments)  # skips FedML's argv parsing and its silent fallback YAML
    for key, value in CMD_DEFAULTS.items():
        setattr(args, key, value)
    args.yaml_config_file = "" if isinstance(config, Mapping) else str(Path(config).expanduser().resolve())
    args.set_attr_from_config(data)
    for key, value in overrides.items():
        setattr(args, key, value)
    return prepare_args(args)


def prepare_args(args: Any) -> Any:
    """What `fedml.init()` does for simulation / horizontal cross-silo, minus network, logs and home writes."""
    import fedml
    from fedml.core import mlops

    missing = missing_fields(args, ("training_type", "federated_optimizer"))
    if missing:
        raise FedMLConfigError("FedML config is missing " + ", ".join(where(f) for f in missing))
    for key, value in OFFLINE_DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    training_type = args.training_type
    if training_type not in ("simulation", "cross_silo"):
        raise FedMLConfigError(f"{where('training_type')} = {training_type!r}: the fedpgp_fedml algorithms run in "
                               f"'simulation' (backend sp) or 'cross_silo' (scenario horizontal)")
    if not hasattr(args, "backend"):
        if training_type == "simulation":
            args.backend = "sp"
        else:
            raise FedMLConfigError(f"FedML config is missing {where('backend')}: cross-silo needs GRPC, MQTT_S3 or MPI")
    name = args.federated_optimizer
    if name in KNOWN_PLUGIN_NAMES and name not in REGISTERED:
        raise FedMLConfigError(f"{where('federated_optimizer')} = {name!r} comes from fedpgp_fedml but is not "
                               f"registered: call fedpgp_fedml.register() first")
    if name in REGISTERED or get(args, "fedpgp_algorithm"):
        if training_type == "simulation" and args.backend != "sp":
            raise FedMLConfigError(f"{where('backend')} = {args.backend!r}: {name} runs in simulation with backend "
                                   f"sp only (FedML's MPI simulation hard-codes FedAvg aggregation; NCCL is not in "
                                   f"the 0.9.6 wheel); for parallel clients use fedpgp_runtime: ray")
        experiment_config_from_args(args)  # fail now, before FedML starts anything
    elif name not in FEDML_OPTIMIZERS:
        raise FedMLConfigError(unknown_algorithm_message(name, "sp" if args.backend == "sp" else "cross_silo"))
    if hasattr(args, "data_cache_dir") and isinstance(args.data_cache_dir, str):
        args.data_cache_dir = os.path.expanduser(args.data_cache_dir)
    args.rank = int(getattr(args, "rank", 0))
    if not hasattr(args, "worker_num") and hasattr(args, "client_num_per_round"):
        args.worker_num = args.client_num_per_round
    if training_type == "cross_silo":
        if getattr(args, "scenario", "horizontal") != "horizontal":
            raise FedMLConfigError(f"{where('scenario')} = {args.scenario!r}: only horizontal cross-silo is supported "
                                   f"(FedML 0.9.6's hierarchical init calls exit())")
        if str(args.backend).startswith("MQTT") and not (getattr(args, "customized_training_mqtt_config", None)
                                                          and getattr(args, "customized_training_s3_config", None)):
            raise FedMLConfigError(f"{where('backend')} = {args.backend!r} fetches its MQTT/S3 settings from FedML's "
                                   f"cloud; the fedpgp_fedml path stays offline: use backend GRPC (or MPI), or give "
                                   f"customized_training_mqtt_config and customized_training_s3_config")
        if args.backend == "GRPC" and not getattr(args, "grpc_ipconfig_path", None):
            raise FedMLConfigError(f"FedML config is missing {where('grpc_ipconfig_path')}: the GRPC backend needs a "
                                   f"CSV of eid,rank,grpc_server_ip,grpc_server_port")
        # fedml/__init__.py: _init_cross_silo_horizontal (_manage_mpi_args), without CUDA-RPC
        if args.backend == "MPI":
            try:
                from mpi4py import MPI
            except ImportError:
                raise FedMLConfigError(f"{where('backend')} = 'MPI' needs mpi4py (not in .venv-fedml): pip install "
                                       f"mpi4py and start the ranks with mpirun, or use backend GRPC") from None
            args.comm = MPI.COMM_WORLD
            args.rank = args.comm.Get_rank()
            args.role = "server" if args.rank == 0 else "client"
        else:
            args.comm = None
        args.n_proc_in_silo, args.proc_rank_in_silo, args.process_id = 1, 0, args.rank
        args.enable_cuda_rpc, args.cpu_transfer = False, args.backend == "TRPC"
        if getattr(args, "client_id_list", None) in (None, "None", "[]"):
            # fedml/__init__.py: _update_client_id_list for cross-silo without MLOps
            ids = list(range(1, int(args.client_num_per_round) + 1)) if args.rank == 0 else [args.rank]
            args.client_id_list = str(ids)
    elif not hasattr(args, "comm"):
        args.comm = None
    fedml._global_training_type, fedml._global_comm_backend = training_type, args.backend
    seed = int(getattr(args, "random_seed", 0) or 0)
    random.seed(seed)
    np.random.seed(seed)
    import torch
    torch.manual_seed(seed)
    mlops.pre_setup(args)  # FedML's mlops helpers read their args from here; with using_mlops off they are no-ops
    if getattr(args, "fedpgp_fedml_home", None):
        from fedpgp_fedml.home import set_fedml_home
        set_fedml_home(args.fedpgp_fedml_home)
    return args


def args_namespace(**fields: Any) -> argparse.Namespace:
    """A plain namespace of flat FedML fields (tests, programmatic use): prefer load_arguments."""
    return argparse.Namespace(**fields)
