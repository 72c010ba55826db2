"""fedpgp_runtime: ray -- the FedML sp runner drives our Ray runtime (client actors + server actor)."""
from __future__ import annotations

import pytest

from _support import max_abs_diff, small_config

pytestmark = pytest.mark.slow  # Ray is a dependency of fedpgp-ray: missing, this fails


def test_ray_runtime_driven_by_fedmlrunner(registered, own_run):
    import fedml

    cfg = small_config()
    cfg["fedpgp_args"]["fedpgp_runtime"] = "ray"
    cfg["fedpgp_args"]["fedpgp_config"]["runtime"] = {"num_actors": 2, "num_cpus_per_actor": 1,
                                                      "num_gpus_per_actor": 0.0, "threads_per_worker": 1}
    args = registered.load_arguments(cfg)
    dataset, model = registered.load_data(args), registered.create_model(args)
    runner = fedml.FedMLRunner(args, fedml.device.get_device(args), dataset, model)
    runner.run()
    sim = runner.runner.fl_trainer
    assert sim.results["runtime"] == "ray" and [r.round for r in sim.history] == [0, 1, 2]
    diffs = {r: max_abs_diff(sim.aggregator.history[r], own_run["params"][r]) for r in (1, 2)}
    print(f"\nray runtime via FedMLRunner: max |sigma_ray - sigma_ours| {diffs}")
    assert diffs[1] <= 1e-5 and diffs[2] <= 1e-5


def test_ray_runtime_refuses_foreign_data(registered):
    from fedpgp_fedml import FedPGPSimulator

    cfg = small_config()
    cfg["fedpgp_args"]["fedpgp_runtime"] = "ray"
    args = registered.load_arguments(cfg)
    with pytest.raises(registered.FedMLConfigError, match="fedpgp_runtime: ray runs on our datasets"):
        FedPGPSimulator(args, "cpu", [0, 0, None, None, {}, {}, {}, 4], registered.create_model(args))
