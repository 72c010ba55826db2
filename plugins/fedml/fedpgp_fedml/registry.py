"""Registering our algorithms under a FedML `federated_optimizer` name (explicit: `register()`).

FedML 0.9.6 has no algorithm registry and reads no entry points: the single-process simulator picks
its algorithm with a hard-coded if/elif and the cross-silo Server/Client accept only FedAvg, LSA
and SA. `register()` therefore wraps four constructors, each acting only for registered names and
delegating everything else to FedML unchanged:

* `SimulatorSingleProcess.__init__` (`backend: sp`): a registered name gets `FedPGPSimulator` as its
  `fl_trainer` (FedML's `run()` calls `fl_trainer.train()`); the user's trainer/aggregator, if
  given to FedMLRunner, are passed on (FedML's own sp algorithms ignore them).
* `FedMLCrossSiloServer.__init__` / `FedMLCrossSiloClient.__init__` (`training_type: cross_silo`):
  a registered name runs FedML's FedAvg message flow with FedPGPServerAggregator /
  FedPGPClientTrainer (built if not given); FedML calls every hook of both. For the duration of
  such a run, the GRPC backend's message loop blocks on its queue instead of busy-waiting
  (`_blocking_message_loop`; `fedpgp_grpc_busy_wait: true` keeps FedML's loop).
* `SimulatorMPI.__init__` (`backend: MPI`): a registered name fails with a clear message (MPI
  simulation hard-codes FedAvg aggregation).

For a name that neither FedML nor the plugin knows, all three raise FedMLConfigError naming the
choices instead of FedML's bare `Exception("Exception")`. `FedMLRunner.log_runner_result` (the trace
file FedML writes after every run) is redirected from ~/.fedml to the plugin's FedML home.
`unregister()` removes the name and, with no name left, restores FedML's constructors.

We hook the dispatch rather than only offering an algorithm flow because the issue asks for the
usual script and YAML (`FedMLRunner(args, device, dataset, model).run()` with `federated_optimizer:
FedPGP`); `FedPGPSimulator` is still usable directly as `FedMLRunner(..., algorithm_flow=...)`,
which needs no hook at all.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from fedpgp_ray.algorithms import ALGORITHMS, build_algorithm
from fedpgp_ray.config import AlgorithmConfig

from fedpgp_fedml.config import (FEDML_CROSS_SILO_OPTIMIZERS, FEDML_OPTIMIZERS, FEDML_SP_OPTIMIZERS, REGISTERED,
                                 FedMLConfigError, get, unknown_algorithm_message)

log = logging.getLogger(__name__)

HOME_ENV = "FEDPGP_FEDML_HOME"
_originals: dict[str, tuple[Any, str, Any]] = {}
_home: Path | None = None


# -- FedML's home folder --------------------------------------------------------------------------------
def fedml_home(args: Any = None) -> Path:
    """Where FedML's home-directory writes go: args.fedpgp_fedml_home, else register(home=...), else
    $FEDPGP_FEDML_HOME, else ~/.cache/fedpgp-ray/fedml-home (never ~/.fedml)."""
    explicit = get(args, "fedpgp_fedml_home") if args is not None else None
    if explicit:
        return Path(str(explicit)).expanduser().resolve()
    if _home is not None:
        return _home
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "fedpgp-ray" / "fedml-home"


def set_fedml_home(path: str | os.PathLike | None) -> None:
    global _home
    _home = Path(path).expanduser().resolve() if path else None


@contextlib.contextmanager
def home_redirect(path: Path) -> Iterator[Path]:
    """HOME (what FedML's expanduser('~') reads) points at `path` for the duration of the block."""
    path.mkdir(parents=True, exist_ok=True)
    before = os.environ.get("HOME")
    os.environ["HOME"] = str(path)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = before


# -- the hooks ----------------------------------------------------------------------------------------------
def _patch(key: str, owner: Any, attr: str, make: Callable[[Any], Any]) -> None:
    if key in _originals:
        return
    original = owner.__dict__[attr]
    _originals[key] = (owner, attr, original)
    setattr(owner, attr, make(original))


def _sp_init(original):
    @functools.wraps(original)
    def __init__(self, args, device, dataset, model, client_trainer=None, server_aggregator=None):
        name = getattr(args, "federated_optimizer", None)
        if name in REGISTERED:
            from fedpgp_fedml.simulator import FedPGPSimulator
            self.fl_trainer = FedPGPSimulator(args, device, dataset, model, client_trainer, server_aggregator)
            return
        if name not in FEDML_SP_OPTIMIZERS:
            raise FedMLConfigError(unknown_algorithm_message(name, "sp"))
        original(self, args, device, dataset, model, client_trainer, server_aggregator)
    return __init__


def _mpi_init(original):
    @functools.wraps(original)
    def __init__(self, args, device, dataset, model, client_trainer=None, server_aggregator=None):
        name = getattr(args, "federated_optimizer", None)
        if name in REGISTERED:
            raise FedMLConfigError(f"{name} does not run with comm_args.backend: MPI: FedML's MPI simulation "
                                   f"hard-codes FedAvg aggregation and never calls a ServerAggregator's aggregate; "
                                   f"use backend: sp (with fedpgp_runtime: ray for parallel clients) or "
                                   f"training_type: cross_silo")
        original(self, args, device, dataset, model, client_trainer, server_aggregator)
    return __init__


@contextlib.contextmanager
def _as_fedavg(args: Any, name: str) -> Iterator[None]:
    """FedML's cross-silo FedAvg message flow carries our algorithm; the name is restored afterwards."""
    args.federated_optimizer = "FedAvg"
    try:
        yield
    finally:
        args.federated_optimizer = name


def _blocking_message_loop(self) -> None:
    """FedML's GRPCCommManager.message_handling_subroutine without its busy-wait.

    FedML 0.9.6 polls `message_q.qsize()` in a tight loop (its `time.sleep` sits after the loop), which
    keeps one core per process at 100% for the whole run; on a small machine the silos then train
    several times slower. This version blocks on the queue; message handling is otherwise the same.
    """
    import pickle
    import queue

    from fedml.core.distributed.communication.grpc import grpc_comm_manager as gcm

    while self.is_running:
        try:
            msg_pkl = self.grpc_servicer.message_q.get(timeout=0.05)
        except queue.Empty:
            continue
        with gcm.lock:
            msg = pickle.loads(msg_pkl)
            sender_id = int(msg.get_sender_id())
            if sender_id not in self.grpc_mappings:
                params = msg.get_params()
                ip = str(params[gcm.GRPCCommManager.MSG_ARG_KEY_SENDER_IP])
                self.grpc_mappings[sender_id] = gcm.GRPCMapping(
                    eid=sender_id, rank=int(params[gcm.GRPCCommManager.MSG_ARG_KEY_SENDER_RANK]),
                    grpc_server_ip=ip, grpc_server_port=int(params[gcm.GRPCCommManager.MSG_ARG_KEY_SENDER_PORT]),
                    ingress_ip=ip)
            for observer in self._observers:
                observer.receive_message(msg.get_type(), msg)


def _graceful_stop(self) -> None:
    """FedML's stop_receive_message with a grace period: FedML stops its GRPC server with grace None,
    which cancels RPCs still in flight; a silo finishing right after the last model sync can thereby
    crash the server while it is still sending to the other silos ("Cancelling all calls")."""
    self.is_running = False
    self.grpc_server.stop(2.0).wait(3.0)


@contextlib.contextmanager
def _quiet_grpc(args: Any) -> Iterator[None]:
    """For the duration of one of our cross-silo runs, the GRPC backend waits without spinning and
    stops gracefully (FedML's loop and stop come back afterwards)."""
    if getattr(args, "backend", None) != "GRPC" or getattr(args, "fedpgp_grpc_busy_wait", False):
        yield
        return
    from fedml.core.distributed.communication.grpc.grpc_comm_manager import GRPCCommManager
    originals = {name: GRPCCommManager.__dict__[name] for name in ("message_handling_subroutine",
                                                                   "stop_receive_message")}
    GRPCCommManager.message_handling_subroutine = _blocking_message_loop
    GRPCCommManager.stop_receive_message = _graceful_stop
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(GRPCCommManager, name, original)


def _server_init(original):
    @functools.wraps(original)
    def __init__(self, args, device, dataset, model, server_aggregator=None):
        name = getattr(args, "federated_optimizer", None)
        if name in REGISTERED:
            from fedpgp_fedml.aggregator import FedPGPServerAggregator
            from fedpgp_fedml.model import create_model
            model = model if hasattr(model, "global_params") else create_model(args)
            aggregator = server_aggregator or FedPGPServerAggregator(model, args)
            with _as_fedavg(args, name), _quiet_grpc(args):
                original(self, args, device, dataset, model, aggregator)
            return
        if name not in FEDML_CROSS_SILO_OPTIMIZERS:
            raise FedMLConfigError(unknown_algorithm_message(name, "cross_silo"))
        original(self, args, device, dataset, model, server_aggregator)
    return __init__


def _client_init(original):
    @functools.wraps(original)
    def __init__(self, args, device, dataset, model, model_trainer=None):
        name = getattr(args, "federated_optimizer", None)
        if name in REGISTERED:
            from fedpgp_fedml.model import create_model
            from fedpgp_fedml.trainer import FedPGPClientTrainer
            model = model if hasattr(model, "global_params") else create_model(args)
            trainer = model_trainer or FedPGPClientTrainer(model, args, dataset=dataset)
            with _as_fedavg(args, name), _quiet_grpc(args):
                original(self, args, device, dataset, model, trainer)
            return
        if name not in FEDML_CROSS_SILO_OPTIMIZERS:
            raise FedMLConfigError(unknown_algorithm_message(name, "cross_silo"))
        original(self, args, device, dataset, model, model_trainer)
    return __init__


def _trace(original):
    def log_runner_result():
        with home_redirect(fedml_home()):
            original.__func__()
    return staticmethod(log_runner_result)


def _install() -> None:
    import fedml.cross_silo.fedml_client as client_mod
    import fedml.cross_silo.fedml_server as server_mod
    import fedml.runner as runner_mod
    import fedml.simulation.simulator as sim

    _patch("sp", sim.SimulatorSingleProcess, "__init__", _sp_init)
    _patch("mpi", sim.SimulatorMPI, "__init__", _mpi_init)
    _patch("cross_silo_server", server_mod.FedMLCrossSiloServer, "__init__", _server_init)
    _patch("cross_silo_client", client_mod.FedMLCrossSiloClient, "__init__", _client_init)
    _patch("trace", runner_mod.FedMLRunner, "log_runner_result", _trace)


def _uninstall() -> None:
    for key in list(_originals):
        owner, attr, original = _originals.pop(key)
        setattr(owner, attr, original)


# -- public --------------------------------------------------------------------------------------------
def register(name: str = "FedPGP", algorithm: str = "fedpgp", home: str | os.PathLike | None = None) -> None:
    """Make `federated_optimizer: <name>` run our `algorithm` through FedMLRunner (sp and cross-silo).

    home: folder for FedML's home-directory writes (default: see fedml_home()). Idempotent; call it
    before FedMLRunner (and before load_arguments, which checks the name).
    """
    if name in FEDML_OPTIMIZERS:
        raise FedMLConfigError(f"cannot register {name!r}: FedML already has an algorithm of that name")
    if algorithm not in ALGORITHMS:
        raise FedMLConfigError(f"cannot register {name!r}: unknown fedpgp-ray algorithm {algorithm!r}; "
                               f"choose one of {', '.join(sorted(ALGORITHMS))}")
    if not build_algorithm(AlgorithmConfig(name=algorithm)).global_keys:
        raise FedMLConfigError(f"cannot register {name!r}: algorithm {algorithm!r} has no global parameters "
                               f"to federate")
    if home is not None:
        set_fedml_home(home)
    _install()
    REGISTERED[name] = algorithm
    log.info("fedpgp_fedml: federated_optimizer %r -> %r", name, algorithm)


def unregister(name: str | None = None) -> None:
    """Remove `name` (all names when None); with none left, FedML's constructors are restored."""
    for key in ([name] if name is not None else list(REGISTERED)):
        REGISTERED.pop(key, None)
    if not REGISTERED:
        _uninstall()


def registered() -> dict[str, str]:
    """{FedML name: our algorithm name} of the registered algorithms."""
    return dict(REGISTERED)
