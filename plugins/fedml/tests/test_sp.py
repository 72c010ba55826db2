"""Registration by name in FedML's single-process simulation, and equivalence with our own run."""
from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

import pytest

from _support import SMALL, max_abs_diff, small_config


def test_register_is_explicit_and_reversible():
    import fedml.simulation.simulator as sim

    import fedpgp_fedml

    fedpgp_fedml.unregister()
    assert fedpgp_fedml.registered() == {}
    assert not hasattr(sim.SimulatorSingleProcess.__init__, "__wrapped__")  # FedML's own constructor
    with pytest.raises(fedpgp_fedml.FedMLConfigError, match=r"call fedpgp_fedml.register\(\)"):
        fedpgp_fedml.load_arguments(SMALL)
    fedpgp_fedml.register()
    fedpgp_fedml.register()  # idempotent
    assert fedpgp_fedml.registered() == {"FedPGP": "fedpgp"}
    assert sim.SimulatorSingleProcess.__init__.__wrapped__ is not None  # our narrow hook
    with pytest.raises(fedpgp_fedml.FedMLConfigError, match="FedML already has"):
        fedpgp_fedml.register("FedAvg")


def test_fedpgp_runs_by_name_through_fedmlrunner(sp_run):
    from fedpgp_fedml import FedPGPClientTrainer, FedPGPServerAggregator, FedPGPSimulator

    sim = sp_run["simulator"]
    assert isinstance(sim, FedPGPSimulator)
    assert isinstance(sim.trainer, FedPGPClientTrainer) and isinstance(sim.aggregator, FedPGPServerAggregator)
    assert [r.round for r in sim.history] == [0, 1, 2]
    assert sorted(sim.aggregator.history) == [0, 1, 2]
    final = sim.results["final"]
    assert set(final) >= {"local", "base", "novel", "hm3", "hm2"}
    assert all(0.0 <= final[k] <= 100.0 for k in ("local", "base", "novel"))
    # only the global prompt is on the wire; U, V stay in the trainer's worker, one state per client
    wire = sim.aggregator.get_model_params()
    assert list(wire) == ["sigma"] and type(wire) is not dict
    states = sim.trainer.worker.states
    assert sorted(states) == [0, 1, 2, 3] and all(set(s.personal) == {"U", "V"} for s in states.values())
    moved = max_abs_diff(sim.aggregator.history[1], sim.aggregator.history[0])
    assert moved > 0, "round 1 did not change sigma"
    print(f"\nFedML sp run (4 clients, 2 rounds): {sp_run['seconds']:.1f}s, final {final}")


def test_same_sigma_as_our_own_run(sp_run, own_run):
    """Same seed and partitions: FedML's sp loop with our classes reproduces our in-process run."""
    fedml_sigma = sp_run["simulator"].aggregator.history
    ours = own_run["params"]
    diffs = {rnd: max_abs_diff(fedml_sigma[rnd], ours[rnd]) for rnd in (0, 1, 2)}
    print(f"\nmax |sigma_fedml - sigma_ours| per round: {diffs} "
          f"(|sigma| max {float(ours[1]['sigma'].abs().max()):.4f}); our run {own_run['seconds']:.1f}s")
    assert diffs[0] == 0.0
    assert diffs[1] <= 1e-6 and diffs[2] <= 1e-6
    ours_final = own_run["results"]["final"]
    for key, value in sp_run["simulator"].results["final"].items():
        assert value == pytest.approx(ours_final[key], abs=1e-4), key


def test_no_network_no_home_writes_logging_untouched(registered, root, monkeypatch):
    """One round, with non-loopback connections refused: FedML's cloud is never contacted."""
    import fedml

    attempts = []
    real_connect = socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else str(address)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError(f"test: network access to {address} refused")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    before = (sys.stdout, sys.stderr, sys.excepthook, list(logging.root.handlers), logging.root.level)
    home = root / "fedml-home-check"
    args = registered.load_arguments(small_config(comm_round=1, frequency_of_the_test=5),
                                     fedpgp_fedml_home=str(home))
    dataset, model = registered.load_data(args), registered.create_model(args)
    fedml.FedMLRunner(args, fedml.device.get_device(args), dataset, model).run()
    after = (sys.stdout, sys.stderr, sys.excepthook, list(logging.root.handlers), logging.root.level)
    assert attempts == []
    assert before == after
    assert (home / ".fedml" / "fedml_trace" / str(os.getpid())).is_file()
    assert not (Path(os.environ["HOME"]) / ".fedml").exists()
    assert not (Path.home() / "fedml_log").exists()
