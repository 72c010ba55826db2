"""A FedML config that cannot run FedPGP fails early, with a message that says what to change."""
from __future__ import annotations

import pytest

from _support import SMALL, small_config


def _load(registered, cfg, **overrides):
    return registered.load_arguments(cfg, **overrides)


def test_wrong_algorithm_name_in_yaml(registered):
    with pytest.raises(registered.FedMLConfigError) as err:
        _load(registered, small_config(federated_optimizer="FedPGB"))
    msg = str(err.value)
    assert "train_args.federated_optimizer" in msg and "'FedPGB'" in msg and "Did you mean 'FedPGP'" in msg
    assert "FedAvg" in msg  # names FedML's own choices too


def test_wrong_algorithm_name_through_fedmlrunner(registered):
    """FedML's own dispatch raises a bare Exception('Exception'); after register() it is a clear error."""
    import fedml

    args = _load(registered, SMALL)
    args.federated_optimizer = "fedpgp"
    with pytest.raises(registered.FedMLConfigError, match=r"Did you mean 'FedPGP'"):
        fedml.FedMLRunner(args, "cpu", [0] * 8, None)


@pytest.mark.parametrize("field", ["comm_round", "client_num_in_total", "learning_rate", "dataset"])
def test_missing_field(registered, field):
    with pytest.raises(registered.FedMLConfigError, match=f"missing .*{field}") as err:
        _load(registered, small_config(**{field: None}))
    assert "_args." in str(err.value)  # names the YAML section


def test_missing_yaml_file(registered, tmp_path):
    with pytest.raises(registered.FedMLConfigError, match="not found"):
        registered.load_arguments(tmp_path / "nope.yaml")


def test_section_that_is_not_a_mapping(registered, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("common_args: simulation\n")
    with pytest.raises(registered.FedMLConfigError, match="section 'common_args' must be a mapping"):
        registered.load_arguments(path)


@pytest.mark.parametrize("changes, pattern", [
    ({"comm_round": "two"}, r"train_args.comm_round"),
    ({"client_num_per_round": 9}, r"client_num_per_round = 9 is larger"),
    ({"client_optimizer": "adam"}, r"client_optimizer = 'adam'"),
    ({"enable_tracking": True}, r"enable_tracking is on"),
    ({"enable_wandb": True}, r"enable_wandb is on"),
])
def test_bad_values(registered, changes, pattern):
    with pytest.raises(registered.FedMLConfigError, match=pattern):
        _load(registered, small_config(**changes))


def test_unknown_fedpgp_config_key(registered):
    cfg = small_config()
    cfg["fedpgp_args"]["fedpgp_config"]["algorithm"] = {"rnak": 4}
    with pytest.raises(registered.FedMLConfigError, match=r"unknown config key 'algorithm.rnak'"):
        _load(registered, cfg)


@pytest.mark.parametrize("key, value", [("round_deadline_s", 10), ("over_selection", 0.3)])
def test_deadline_mode_is_refused_in_one_line(registered, key, value):
    cfg = small_config()
    cfg["fedpgp_args"]["fedpgp_config"]["federation"] = {key: value}
    with pytest.raises(registered.FedMLConfigError, match="round_deadline_s / over_selection are not supported") as err:
        _load(registered, cfg)
    assert "\n" not in str(err.value)


def test_mpi_backend_is_refused_clearly(registered):
    import fedml

    with pytest.raises(registered.FedMLConfigError, match="backend sp only"):
        _load(registered, small_config(backend="MPI"))
    args = _load(registered, SMALL)
    args.backend = "MPI"
    with pytest.raises(registered.FedMLConfigError, match="MPI simulation hard-codes FedAvg"):
        fedml.FedMLRunner(args, "cpu", [0] * 8, None)


def test_builtin_fedavg_still_dispatches_to_fedml(registered):
    """The hook is narrow: a FedML built-in name still reaches FedML's own simulator."""
    from fedml.simulation.simulator import SimulatorSingleProcess
    from fedml.simulation.sp.fedavg import FedAvgAPI

    seen = {}

    def fake_init(self, args, device, dataset, model):
        seen["called"] = True

    original = FedAvgAPI.__init__
    FedAvgAPI.__init__ = fake_init
    try:
        args = _load(registered, small_config(federated_optimizer="FedAvg"))
        sim = SimulatorSingleProcess(args, "cpu", [0] * 8, None)
    finally:
        FedAvgAPI.__init__ = original
    assert seen == {"called": True} and isinstance(sim.fl_trainer, FedAvgAPI)


def test_cross_silo_server_refuses_an_unusable_tracking_store_before_training(registered, monkeypatch, tmp_path):
    """The cross-silo server opens its MLflow run when built: a dead store fails then, not after round 1."""
    from fedpgp_fedml import FedPGPServerAggregator
    from fedpgp_fedml.crosssilo import free_ports
    from fedpgp_ray.tracking import TrackingError

    uri = f"http://127.0.0.1:{free_ports(1)[0]}"  # nobody listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = small_config()
    cfg["fedpgp_args"]["fedpgp_output_dir"] = str(tmp_path / "out")
    cfg["fedpgp_args"]["fedpgp_config"]["tracking"] = {"mlflow": True}
    args = _load(registered, cfg)
    args.training_type = "cross_silo"
    with pytest.raises(TrackingError, match=f"{uri} cannot be reached"):
        FedPGPServerAggregator(registered.create_model(args), args)
    simulated = _load(registered, cfg)  # sp: the simulator builds the report, not the aggregator
    assert FedPGPServerAggregator(registered.create_model(simulated), simulated).server_report is None


def test_cross_silo_with_more_partition_clients_than_silos_is_refused_in_one_line(registered):
    """FedML would hand silos different partition clients in different rounds (personal state split,
    clients never trained): refused before anything starts."""
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[1] / "examples" / "cross_silo_config.yaml").read_text())
    cfg["train_args"].update(client_num_in_total=4, client_num_per_round=2)
    with pytest.raises(registered.FedMLConfigError) as err:
        _load(registered, cfg)
    msg = str(err.value)
    assert "\n" not in msg and "one partition client per silo" in msg
    assert "client_num_in_total = 4" in msg and "client_num_per_round = 2" in msg
    cfg["train_args"].update(client_num_in_total=2, client_num_per_round=2)  # one per silo: accepted
    assert _load(registered, cfg).client_num_in_total == 2
