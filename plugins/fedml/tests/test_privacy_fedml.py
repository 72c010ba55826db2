"""DP-FedAvg through FedML: the plugin's aggregator adds the noise, the trainer clips, epsilon per round."""
from __future__ import annotations

import copy
from collections import OrderedDict

import pytest

from _support import SMALL, max_abs_diff

PRIVACY = {"enabled": True, "seeded": True, "noise_multiplier": 1.0, "clip_norm": 0.01, "target_delta": 1e-4}


def private_config(per_round: int = 2) -> dict:
    cfg = copy.deepcopy(SMALL)
    cfg["train_args"]["client_num_per_round"] = per_round  # Poisson sampling rate q = per_round / 4
    cfg["fedpgp_args"]["fedpgp_config"]["privacy"] = dict(PRIVACY)
    return cfg


def test_dp_run_through_fedml_matches_our_own_dp_run(registered):
    """Same seed: FedML's sp loop (trainer clips, aggregator noises) = our in-process DP run."""
    import fedml
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    from fedpgp_ray.federation import run_federation
    from fedpgp_ray.run import feature_cache_dir
    from fedpgp_ray.runtime import build_runtime

    args = registered.load_arguments(private_config())
    runner = fedml.FedMLRunner(args, fedml.device.get_device(args), registered.load_data(args),
                               registered.create_model(args))
    runner.run()
    sim = runner.runner.fl_trainer
    cfg = registered.experiment_config_from_args(registered.load_arguments(private_config()))
    assert cfg.privacy.enabled and cfg.federation.client_fraction == 0.5

    ours = {}

    class Capture:
        def on_round(self, report, global_params):
            ours[report.round] = {k: v.clone() for k, v in global_params.items()}

    with build_runtime(cfg, None, feature_cache_dir()) as runtime:
        results = run_federation(cfg, runtime, None, [Capture()])
    for rnd in (1, 2):
        assert max_abs_diff(sim.aggregator.history[rnd], ours[rnd]) < 1e-6
        accountant = rdp_privacy_accountant.RdpAccountant()
        accountant.compose(dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(1.0)), rnd)
        expected = accountant.get_epsilon(1e-4)
        assert sim.history[rnd].metrics["privacy/epsilon"] == expected
        assert results["rounds"][rnd]["metrics"]["privacy/epsilon"] == expected
    assert sim.results["privacy"]["epsilon"] == results["privacy"]["epsilon"]
    assert list(sim.aggregator.get_model_params()) == ["sigma"]  # U, V never reach the aggregator


def test_aggregator_takes_a_round_without_uploads_under_dp(registered):
    """Poisson sampling may pick nobody: the DP aggregator then releases a noise-only step."""
    from fedpgp_fedml import FedPGPServerAggregator

    args = registered.load_arguments(private_config())
    agg = FedPGPServerAggregator(registered.create_model(args), args)
    before = agg.get_model_params()
    args.round_idx = 0
    after = agg.aggregate([])
    assert 0 < max_abs_diff(after, before) < 1.0
    assert agg.aggregation_metrics["privacy/epsilon"] > 0
    plain_args = registered.load_arguments(SMALL)
    plain = FedPGPServerAggregator(registered.create_model(plain_args), plain_args)
    with pytest.raises(RuntimeError, match="no client uploads"):
        plain.aggregate([])


def test_aggregator_clips_what_a_client_sends(registered):
    """A client that skips clipping still moves sigma by at most C / (q N) (noise off to see it)."""
    from fedpgp_fedml import FedPGPServerAggregator
    from fedpgp_ray import privacy as dp

    cfg = private_config()
    cfg["fedpgp_args"]["fedpgp_config"]["privacy"]["noise_multiplier"] = 0.0
    args = registered.load_arguments(cfg)
    agg = FedPGPServerAggregator(registered.create_model(args), args)
    before = agg.get_model_params()
    huge = OrderedDict((k, v + 10.0) for k, v in before.items())
    args.round_idx = 0
    after = agg.aggregate([(16, huge)])
    moved = dp.update_norm({k: after[k].double() - before[k].double() for k in before})
    assert moved == pytest.approx(0.01 / 2, rel=1e-4)  # C / (q N) = 0.01 / (0.5 * 4)


def test_cross_silo_dp_needs_every_silo_every_round(registered):
    """FedML's cross-silo server selects silos itself (not Poisson): DP there only with q = 1.

    Cross-silo refuses fewer silos per round than clients for every algorithm (a client's personal
    prompt would wander between processes), so a private config with q < 1 never reaches the
    aggregator, whose accountant would otherwise assume Poisson sampling.
    """
    from fedpgp_fedml import FedMLConfigError, FedPGPServerAggregator

    args = registered.load_arguments(private_config(per_round=2))
    args.training_type = "cross_silo"
    with pytest.raises(FedMLConfigError, match="one partition client per silo") as err:
        FedPGPServerAggregator(registered.create_model(args), args)
    assert "\n" not in str(err.value)
    every = registered.load_arguments(private_config(per_round=4))
    every.training_type = "cross_silo"
    assert FedPGPServerAggregator(registered.create_model(every), every).strategy.privacy is not None


def test_cross_silo_dp_refuses_more_rounds_than_the_budget_allows(registered):
    """FedML's cross-silo server runs comm_round rounds itself: a max_epsilon that allows fewer fails at start."""
    from fedpgp_fedml import FedMLConfigError, FedPGPServerAggregator
    from fedpgp_ray import privacy as dp

    cfg = private_config(per_round=4)  # q = 1, comm_round = 2
    cfg["fedpgp_args"]["fedpgp_config"]["privacy"]["max_epsilon"] = dp.epsilon(1.0, 1.0, 1, 1e-4)  # 1 round
    args = registered.load_arguments(cfg)
    args.training_type = "cross_silo"
    with pytest.raises(FedMLConfigError) as err:
        FedPGPServerAggregator(registered.create_model(args), args)
    msg = str(err.value)
    assert "\n" not in msg
    assert "stopping after round 1 of 2" in msg and "train_args.comm_round (train.rounds) to 1" in msg
    simulated = registered.load_arguments(cfg)  # sp stops at the budget by itself
    assert FedPGPServerAggregator(registered.create_model(simulated), simulated).strategy.num_rounds == 1


def test_secagg_is_refused_in_one_line(registered):
    from fedpgp_fedml import FedMLConfigError, experiment_config_from_args

    cfg = copy.deepcopy(SMALL)
    cfg["fedpgp_args"]["fedpgp_config"]["secagg"] = {"enabled": True}
    with pytest.raises(FedMLConfigError, match="secagg.enabled is not supported") as err:
        experiment_config_from_args(registered.load_arguments(cfg))
    assert "\n" not in str(err.value)
