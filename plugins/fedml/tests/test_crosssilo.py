"""Cross-silo over loopback: one server and two clients (GRPC on 127.0.0.1), the same two FedML classes."""
from __future__ import annotations

import time

import pytest
import torch
import yaml

from _support import max_abs_diff, small_config

pytestmark = pytest.mark.slow


def test_cross_silo_two_rounds_over_loopback(registered, root, tmp_path):
    from fedpgp_fedml.crosssilo import free_ports, launch_loopback, write_grpc_ipconfig

    cfg = small_config(training_type="cross_silo", client_num_in_total=2, client_num_per_round=2,
                       comm_round=2, frequency_of_the_test=1)
    cfg["common_args"]["scenario"] = "horizontal"
    cfg["comm_args"] = {"backend": "GRPC",
                        "grpc_ipconfig_path": str(write_grpc_ipconfig(tmp_path / "grpc.csv", free_ports(3)))}
    cfg["fedpgp_args"]["fedpgp_output_dir"] = str(tmp_path / "out")
    cfg["fedpgp_args"]["fedpgp_config"]["runtime"] = {"threads_per_worker": 1}
    config = tmp_path / "cross_silo.yaml"
    config.write_text(yaml.safe_dump(cfg))
    home = tmp_path / "fedml-home"
    began = time.perf_counter()
    codes = launch_loopback(config, 2, tmp_path / "logs", timeout=420,
                            env={"FEDPGP_FEDML_HOME": str(home), "FEDPGP_FEDML_LOG": "INFO"})
    seconds = time.perf_counter() - began
    logs = {p.name: p.read_text()[-3000:] for p in (tmp_path / "logs").glob("*.log")}
    assert codes == [0, 0, 0], logs
    saved = {r: torch.load(tmp_path / "out" / f"global_round_{r}.pt") for r in (1, 2)}
    assert all(list(p) == ["sigma"] for p in saved.values())
    assert "round 2: aggregated 2 uploads" in logs["rank0.log"]
    assert "round 2 client 0" in logs["rank1.log"] and "round 2 client 1" in logs["rank2.log"]
    assert len(list((home / ".fedml" / "fedml_trace").iterdir())) == 3  # FedML's trace files, not in ~/.fedml
    assert not (root / "home" / ".fedml").exists()

    # the same experiment in our own process: cross-silo gives the same sigma
    from fedpgp_ray.federation import run_federation
    from fedpgp_ray.runtime import build_runtime
    from fedpgp_ray.run import feature_cache_dir
    args = registered.load_arguments(small_config(client_num_in_total=2, client_num_per_round=2, comm_round=2,
                                                  frequency_of_the_test=2))
    ours = {}

    class Capture:
        def on_round(self, report, params):
            ours[report.round] = {k: v.clone() for k, v in params.items()}

    own_cfg = registered.experiment_config_from_args(args)
    with build_runtime(own_cfg, None, feature_cache_dir()) as runtime:
        run_federation(own_cfg, runtime, None, [Capture()])
    diffs = {r: max_abs_diff(saved[r], ours[r]) for r in (1, 2)}
    print(f"\ncross-silo (1 server + 2 clients, GRPC loopback, 2 rounds): {seconds:.1f}s; "
          f"max |sigma_cross_silo - sigma_ours|: {diffs}")
    assert diffs[1] <= 1e-5 and diffs[2] <= 1e-5
