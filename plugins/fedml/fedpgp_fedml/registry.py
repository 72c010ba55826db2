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
  such a run the GRPC backend sends and reads messages in our wire format (`fedpgp_fedml.wire`:
  `torch.load(weights_only=True)`, never FedML's `pickle.loads` of what reaches the port), its
  message loop blocks on its queue instead of busy-waiting (`_blocking_message_loop`), and a rank
  missing from the ipconfig CSV listens on 127.0.0.1 (FedML: 0.0.0.0, every interface).
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
from fedpgp_fedml.home import fedml_home, home_redirect, set_fedml_home

log = logging.getLogger(__name__)

_originals: dict[str, tuple[Any, str, Any]] = {}


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
    import queue

    from fedml.core.distributed.communication.grpc import grpc_comm_manager as gcm

    from fedpgp_fedml.wire import WireError, decode

    while self.is_running:
        try:
            data = self.grpc_servicer.message_q.get(timeout=0.05)
        except queue.Empty:
            continue
        with gcm.lock:
            try:
                msg = decode(data)
            except WireError as err:
                log.warning("%s", err)
                continue
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


def _safe_send_message(self, msg: Any) -> None:
    """FedML's GRPCCommManager.send_message with our wire format instead of `pickle.dumps`."""
    import grpc
    from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2, grpc_comm_manager_pb2_grpc
    from fedml.core.distributed.communication.grpc.grpc_comm_manager import GRPCCommManager

    from fedpgp_fedml.wire import encode

    own = self.grpc_mappings[self.client_id]
    msg.add_params(GRPCCommManager.MSG_ARG_KEY_SENDER_RANK, self.client_rank)
    msg.add_params(GRPCCommManager.MSG_ARG_KEY_SENDER_IP, own.ingress_ip or own.grpc_server_ip)
    msg.add_params(GRPCCommManager.MSG_ARG_KEY_SENDER_PORT, own.grpc_server_port)
    receiver = self.grpc_mappings[int(msg.get_receiver_id())]
    channel = grpc.insecure_channel(f"{receiver.ingress_ip or receiver.grpc_server_ip}:{receiver.grpc_server_port}",
                                    options=self.opts)
    try:
        request = grpc_comm_manager_pb2.CommRequest(client_id=self.client_id, message=encode(msg))
        grpc_comm_manager_pb2_grpc.gRPCCommManagerStub(channel).sendMessage(request)
    finally:
        channel.close()


def _loopback_mappings(original):
    """FedML's _init_grpc_mappings; a rank missing from the CSV listens on 127.0.0.1, not 0.0.0.0."""
    @functools.wraps(original)
    def _init_grpc_mappings(self):
        from fedml.core.distributed.communication.constants import CommunicationConstants
        from fedml.core.distributed.communication.grpc.grpc_comm_manager import GRPCMapping

        original(self)
        if self.client_id not in self.grpc_mappings:
            self.grpc_mappings[self.client_id] = GRPCMapping(
                eid=self.client_id, rank=self.client_id, grpc_server_ip="127.0.0.1",
                grpc_server_port=CommunicationConstants.GRPC_BASE_PORT + self.client_rank, ingress_ip=None)
    return _init_grpc_mappings


def _graceful_stop(self) -> None:
    """FedML's stop_receive_message with a grace period: FedML stops its GRPC server with grace None,
    which cancels RPCs still in flight; a silo finishing right after the last model sync can thereby
    crash the server while it is still sending to the other silos ("Cancelling all calls")."""
    self.is_running = False
    self.grpc_server.stop(2.0).wait(3.0)


@contextlib.contextmanager
def _quiet_grpc(args: Any) -> Iterator[None]:
    """For the duration of one of our cross-silo runs (FedML runs the whole protocol inside the
    server's and client's constructors), the GRPC backend uses our wire format, listens on loopback
    unless the ipconfig CSV names the rank's address, waits without spinning and stops gracefully
    (FedML's methods come back afterwards)."""
    if getattr(args, "backend", None) != "GRPC":
        yield
        return
    from fedml.core.distributed.communication.grpc.grpc_comm_manager import GRPCCommManager
    originals = {name: GRPCCommManager.__dict__[name] for name in ("message_handling_subroutine",
                                                                   "stop_receive_message", "send_message",
                                                                   "_init_grpc_mappings")}
    GRPCCommManager.message_handling_subroutine = _blocking_message_loop
    GRPCCommManager.stop_receive_message = _graceful_stop
    GRPCCommManager.send_message = _safe_send_message
    GRPCCommManager._init_grpc_mappings = _loopback_mappings(originals["_init_grpc_mappings"])
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


# Cross-silo: the server prints and records the run, but personal prompts (and so the evaluation)
# live on the clients: each client's report rides as one extra message parameter (a JSON string)
# on its model upload and on its final FINISHED status.
REPORT_KEY = "fedpgp_report"


# Ours are recognised by the report methods they carry (FedPGPClientTrainer.pop_report,
# FedPGPServerAggregator.receive_report): no import of trainer / aggregator here, so the modules
# import each other in one direction only (trainer, aggregator -> config; registry -> config, home).
def _our_trainer(manager: Any) -> Any:
    adapter = getattr(manager, "trainer_dist_adapter", None)
    trainer = getattr(getattr(adapter, "trainer", None), "trainer", None)
    return trainer if callable(getattr(trainer, "pop_report", None)) else None


def _our_aggregator(manager: Any) -> Any:
    aggregator = getattr(getattr(manager, "aggregator", None), "aggregator", None)
    return aggregator if callable(getattr(aggregator, "receive_report", None)) else None


def _send_with_report(manager: Any, report: str | None, send: Callable[[], None]) -> None:
    """Run `send` with manager.send_message adding REPORT_KEY to the message it sends."""
    if report is None:
        send()
        return
    plain = manager.send_message

    def send_message(message):
        message.add_params(REPORT_KEY, report)
        plain(message)

    manager.send_message = send_message
    try:
        send()
    finally:
        del manager.send_message


def _client_upload(original):
    @functools.wraps(original)
    def send_model_to_server(self, receive_id, weights, local_sample_num):
        trainer = _our_trainer(self)
        report = trainer.pop_report() if trainer is not None else None
        _send_with_report(self, report, lambda: original(self, receive_id, weights, local_sample_num))
    return send_model_to_server


def _client_status(original):
    @functools.wraps(original)
    def send_client_status(self, receive_id, status="ONLINE"):
        trainer = _our_trainer(self)
        finished = status == getattr(type(self), "RUN_FINISHED_STATUS_FLAG", "FINISHED")
        report = trainer.pop_report(final=True) if trainer is not None and finished else None
        _send_with_report(self, report, lambda: original(self, receive_id, status))
    return send_client_status


def _server_receive(original):
    @functools.wraps(original)
    def handler(self, msg_params):
        aggregator = _our_aggregator(self)
        report = msg_params.get(REPORT_KEY)
        if aggregator is not None and report:
            aggregator.receive_report(report)
        return original(self, msg_params)
    return handler


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
    from fedml.cross_silo.client.fedml_client_master_manager import ClientMasterManager
    from fedml.cross_silo.server.fedml_server_manager import FedMLServerManager

    _patch("client_upload", ClientMasterManager, "send_model_to_server", _client_upload)
    _patch("client_status", ClientMasterManager, "send_client_status", _client_status)
    _patch("server_upload", FedMLServerManager, "handle_message_receive_model_from_client", _server_receive)
    _patch("server_status", FedMLServerManager, "handle_message_client_status_update", _server_receive)


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
