"""Client-level DP (DP-FedAvg) of the global prompt: clipping, noise, Poisson sampling, accountant, config."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from fedpgp_ray import privacy as dp
from fedpgp_ray.client import ClientWorker, FitResult
from fedpgp_ray.config import ConfigError
from fedpgp_ray.federation import build_strategy, run_federation
from fedpgp_ray.run import main, run_experiment
from fedpgp_ray.runtime.local import LocalRuntime
from fedpgp_ray.strategy import FedAvgStrategy, RoundFailedError, aggregate_weighted

from conftest import make_cfg

DP_ON = ["privacy.enabled=true", "privacy.seeded=true"]


def _rdp_epsilon(q: float, z: float, rounds: int, delta: float) -> float:
    """dp-accounting's own answer, written out here independently of fedpgp_ray.privacy."""
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), rounds)
    return accountant.get_epsilon(delta)


def _random_params(gen: torch.Generator, scale: float) -> dict[str, torch.Tensor]:
    return {"sigma": torch.randn(4, 8, generator=gen) * scale, "extra": torch.randn(3, generator=gen) * scale}


# -- the math -------------------------------------------------------------------------------------------------
def test_clip_bounds_the_joint_norm_and_keeps_small_updates():
    gen = torch.Generator().manual_seed(0)
    for scale in (0.001, 0.05, 1.0, 30.0):
        update = _random_params(gen, scale)
        clipped = dp.clip_update(update, 0.5)
        norm = dp.update_norm(update)
        assert dp.update_norm(clipped) <= 0.5 * (1 + 1e-12)
        if norm <= 0.5:  # below the bound: untouched
            assert all(torch.equal(clipped[k], update[k].double()) for k in update)
        else:  # above: same direction, norm exactly C (both tensors scaled together)
            assert dp.update_norm(clipped) == pytest.approx(0.5, rel=1e-12)
            assert torch.allclose(clipped["sigma"] / clipped["extra"].norm(), update["sigma"].double()
                                  / update["extra"].double().norm())


def test_every_aggregated_update_respects_the_clip_bound():
    """Without noise, each client moves the global params by at most C / (q N), whatever it sends."""
    gen = torch.Generator().manual_seed(1)
    glob = _random_params(gen, 1.0)
    clip, expected = 0.3, 4.0
    for scale in (0.01, 1.0, 100.0):
        update = _random_params(gen, scale)
        new = dp.dp_aggregate(glob, [update], clip, 0.0, expected, torch.Generator())
        moved = dp.update_norm({k: new[k].double() - glob[k].double() for k in glob})
        assert moved <= clip / expected * (1 + 1e-6)
        many = dp.dp_aggregate(glob, [update] * 3, clip, 0.0, expected, torch.Generator())
        assert dp.update_norm({k: many[k].double() - glob[k].double() for k in glob}) <= 3 * clip / expected * (1 + 1e-6)


def test_no_noise_and_no_clipping_is_the_unweighted_mean_of_the_same_clients():
    gen = torch.Generator().manual_seed(2)
    glob = _random_params(gen, 1.0)
    uploads = [_random_params(gen, 1.0) for _ in range(5)]
    updates = [{k: u[k].double() - glob[k].double() for k in glob} for u in uploads]
    new = dp.dp_aggregate(glob, updates, math.inf, 0.0, len(uploads), torch.Generator())
    mean = aggregate_weighted([(u, 1) for u in uploads])  # the non-DP aggregate with equal weights
    for k in glob:
        assert torch.equal(new[k], mean[k].to(glob[k].dtype))
        assert torch.allclose(new[k].double(), torch.stack([u[k].double() for u in uploads]).mean(0), atol=1e-6)


def test_noise_std_is_noise_multiplier_times_clip_norm():
    """2e5 draws: the std estimate's relative error is ~0.2%, so 3% tolerance fails an error of 10%."""
    z, clip, expected = 1.3, 0.7, 5.0
    glob = {"sigma": torch.zeros(200, 250, dtype=torch.float64), "ctx": torch.zeros(4, 50, dtype=torch.float64)}
    gen = torch.Generator().manual_seed(3)
    samples = []
    for _ in range(4):
        new = dp.dp_aggregate(glob, [], clip, z, expected, gen)
        samples.append(torch.cat([new[k].flatten() for k in new]) * expected)  # the noise on the sum
    noise = torch.cat(samples)
    assert noise.numel() >= 200_000
    assert abs(float(noise.mean())) < 5 * z * clip / math.sqrt(noise.numel())
    assert float(noise.std()) / (z * clip) == pytest.approx(1.0, abs=0.03)
    # a sum noised 10% too little or too much would fail the same check
    assert abs(float(noise.std() * 1.1) / (z * clip) - 1) > 0.03
    assert abs(float(noise.std() * 0.9) / (z * clip) - 1) > 0.03


def test_unseeded_noise_differs_between_runs_and_seeded_repeats():
    assert dp.noise_generator(None, 1) is None  # unseeded: the CSPRNG (AES-256-CTR keyed from os.urandom)
    a, b = dp.gaussian((5,), None), dp.gaussian((5,), None)
    assert not torch.equal(a, b)
    assert torch.equal(torch.randn(5, generator=dp.noise_generator(7, 1)), torch.randn(5, generator=dp.noise_generator(7, 1)))
    assert not torch.equal(torch.randn(5, generator=dp.noise_generator(7, 1)), torch.randn(5, generator=dp.noise_generator(7, 2)))


def test_poisson_sampling_rate_and_empty_rounds():
    counts = [len(dp.poisson_sample(200, 0.05, 0, r)) for r in range(400)]
    assert np.mean(counts) == pytest.approx(10.0, abs=0.6)
    assert np.std(counts) > 1.5  # variable size, unlike fixed-fraction sampling
    assert dp.poisson_sample(200, 0.05, 0, 3) == dp.poisson_sample(200, 0.05, 0, 3)
    assert any(len(dp.poisson_sample(20, 0.02, 0, r)) == 0 for r in range(200))


def test_epsilon_is_dp_accountings_value():
    for q, z, rounds, delta in [(0.1, 1.0, 50, 1e-5), (0.05, 2.0, 7, 1e-4), (1.0, 3.0, 3, 1e-3)]:
        assert dp.epsilon(q, z, rounds, delta) == _rdp_epsilon(q, z, rounds, delta)
    assert dp.epsilon(0.1, 0.0, 5, 1e-5) == math.inf
    assert dp.epsilon(0.1, 1.0, 0, 1e-5) == 0.0
    eps = [dp.epsilon(0.1, 1.0, r, 1e-5) for r in (1, 10, 100)]
    assert eps == sorted(eps)


# -- the strategy -----------------------------------------------------------------------------------------------
def _strategy(tmp_path, *overrides: str) -> FedAvgStrategy:
    return build_strategy(make_cfg(tmp_path, [*DP_ON, *overrides]))


def test_round_without_sampled_clients_is_a_noise_only_step(tmp_path):
    strategy = _strategy(tmp_path, "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.1",
                         "federation.client_fraction=0.2", "federation.min_reporting_clients=2")
    glob = {"sigma": torch.zeros(4, 8)}
    new, metrics = strategy.aggregate_train(1, glob, [], [])
    noise = new["sigma"].double() * (0.2 * 5)
    assert float(noise.abs().sum()) > 0
    assert metrics["privacy/epsilon"] == _rdp_epsilon(0.2, 1.0, 1, 1e-5)
    # without DP the same empty round is a failure (fixed-size sampling always picks someone)
    plain = build_strategy(make_cfg(tmp_path, ["federation.min_reporting_clients=2"]))
    with pytest.raises(RoundFailedError):
        plain.aggregate_train(1, glob, [], [])


def test_dp_ignores_sample_counts(tmp_path):
    strategy = _strategy(tmp_path, "privacy.noise_multiplier=0", "privacy.clip_norm=null")
    glob = {"sigma": torch.zeros(2, 2)}
    results = [FitResult(0, {"sigma": torch.ones(2, 2)}, 1), FitResult(1, {"sigma": 3 * torch.ones(2, 2)}, 99)]
    new, _ = strategy.aggregate_train(1, glob, results, [])
    assert torch.allclose(new["sigma"], torch.full((2, 2), 4.0 / 5))  # (1 + 3) / (q N = 5), not weighted


def test_max_epsilon_cuts_the_rounds_with_a_message(tmp_path):
    strategy = _strategy(tmp_path, "train.rounds=40", "federation.client_fraction=0.2",
                         "privacy.noise_multiplier=1.0", "privacy.max_epsilon=3.0")
    allowed = strategy.num_rounds
    assert 0 < allowed < 40
    assert _rdp_epsilon(0.2, 1.0, allowed, 1e-5) <= 3.0 < _rdp_epsilon(0.2, 1.0, allowed + 1, 1e-5)
    assert f"stopping after round {allowed} of 40" in strategy.stop_message
    with pytest.raises(ConfigError, match="privacy.max_epsilon"):
        _strategy(tmp_path, "privacy.noise_multiplier=0.5", "privacy.max_epsilon=0.01")


# -- config ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, needle", [
    ("privacy.noise_multiplier=-0.5", "privacy.noise_multiplier"),
    ("privacy.clip_norm=0", "privacy.clip_norm"),
    ("privacy.target_delta=1", "privacy.target_delta"),
    ("privacy.target_delta=2.5", "privacy.target_delta"),
    ("privacy.target_delta=0", "privacy.target_delta"),
    ("privacy.clip_norm=null", "privacy.clip_norm"),  # noise without a clip bound protects nothing
])
def test_config_errors_are_one_line(tmp_path, capsys, override, needle):
    with pytest.raises(ConfigError) as err:
        make_cfg(tmp_path, ["privacy.enabled=true", override])
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert main(["--no-progress", "--set", f"output_dir={tmp_path / 'cli'}", "--set", "privacy.enabled=true",
                 "--set", override]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert not (tmp_path / "cli").exists()


# -- runs ----------------------------------------------------------------------------------------------------------
def _sigma_and_final(cfg) -> tuple[torch.Tensor, dict]:
    with LocalRuntime(cfg, None, None) as runtime:
        server_params = {}

        class Keep:
            def on_round(self, report, global_params):
                server_params["sigma"] = global_params["sigma"].clone()

        doc = run_federation(cfg, runtime, None, [Keep()])
    return server_params["sigma"], doc


@pytest.mark.slow
def test_run_with_no_noise_and_no_clipping_equals_non_dp_fedpgp(tmp_path):
    """All clients every round (q = 1, so Poisson sampling picks exactly the non-DP sample) with equal
    sample counts (so the unweighted mean is the weighted one) and SGD without momentum (DP keeps no
    momentum of the global prompt between rounds): the DP path must reproduce FedPGP."""
    plain = make_cfg(tmp_path, ["train.rounds=2", "train.momentum=0"])
    private = make_cfg(tmp_path, ["train.rounds=2", "train.momentum=0", *DP_ON, "privacy.noise_multiplier=0",
                                  "privacy.clip_norm=null"])
    worker = ClientWorker(plain, device="cpu")
    assert len({len(c.train_indices) for c in worker.partition.clients}) == 1  # equal n_i: a fair comparison
    sigma_plain, doc_plain = _sigma_and_final(plain)
    sigma_dp, doc_dp = _sigma_and_final(private)
    assert torch.equal(sigma_plain, sigma_dp)
    assert doc_plain["final"] == doc_dp["final"]
    assert doc_dp["privacy"]["epsilon"] is None and doc_dp["privacy"]["rounds"] == 2  # no noise: no guarantee
    assert "privacy" not in doc_plain


def test_clipping_happens_on_the_client_and_only_sigma_leaves(tmp_path):
    cfg = make_cfg(tmp_path, [*DP_ON, "privacy.clip_norm=0.001", "privacy.noise_multiplier=0"])
    worker = ClientWorker(cfg, device="cpu")
    glob = worker.global_params()
    result = worker.fit(0, 1, glob)
    assert set(result.params) == {"sigma"}  # U and V never leave the client
    assert set(worker.states[0].personal) == {"U", "V"}
    assert dp.update_norm({"sigma": result.params["sigma"].double() - glob["sigma"].double()}) <= 0.001 * (1 + 1e-5)
    unclipped = ClientWorker(make_cfg(tmp_path), device="cpu").fit(0, 1, glob)
    assert dp.update_norm({"sigma": unclipped.params["sigma"] - glob["sigma"]}) > 0.001  # clipping did bite


@pytest.mark.slow
def test_logged_epsilon_matches_the_accountant_and_reaches_mlflow(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = make_cfg(tmp_path, [*DP_ON, "train.rounds=3", "federation.client_fraction=0.4", "privacy.noise_multiplier=1.1",
                              "privacy.clip_norm=0.05", "privacy.target_delta=1.0e-4", "tracking.mlflow=true",
                              f"tracking.uri={uri}"])
    doc = run_experiment(cfg, progress=False)
    expected = [_rdp_epsilon(0.4, 1.1, r, 1e-4) for r in (1, 2, 3)]
    logged = [r["metrics"]["privacy/epsilon"] for r in doc["rounds"] if r["round"] > 0]
    assert logged == expected
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["privacy"]["epsilon"] == expected[-1] and saved["privacy"]["delta"] == 1e-4
    client = MlflowClient(uri)
    run_id = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0].info.run_id
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "privacy/epsilon"))
    assert history == [(r, pytest.approx(e)) for r, e in zip((1, 2, 3), expected)]
    params = client.get_run(run_id).data.params
    assert params["cfg.privacy.noise_multiplier"] == "1.1" and params["cfg.privacy.clip_norm"] == "0.05"
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_run_stops_at_max_epsilon(tmp_path, caplog):
    cfg = make_cfg(tmp_path, [*DP_ON, "train.rounds=30", "federation.client_fraction=0.6",
                              "privacy.noise_multiplier=2.0", "privacy.max_epsilon=2.0"])
    doc = run_experiment(cfg, progress=False)
    done = max(r["round"] for r in doc["rounds"])
    assert 0 < done < 30 and doc["privacy"]["stopped_by_budget"]
    assert doc["privacy"]["epsilon"] <= 2.0 < _rdp_epsilon(0.6, 2.0, done + 1, 1e-5)
    assert "local" in doc["rounds"][-1]["metrics"]  # the last round run is evaluated
    assert any("privacy budget: stopping after round" in r.message for r in caplog.records)


def test_results_table_shows_epsilon_only_for_dp_runs():
    from fedpgp_ray.run import format_table

    plain = {"algorithm": "fedpgp", "final": {"local": 50.0}}
    private = {"algorithm": "fedpgp", "final": {"local": 48.0}, "privacy": {"epsilon": 2.345, "delta": 1e-5}}
    no_noise = {"algorithm": "fedpgp", "final": {"local": 49.0}, "privacy": {"epsilon": None, "delta": 1e-5}}
    assert "EPSILON" not in format_table([plain])
    lines = format_table([plain, private, no_noise]).splitlines()
    assert lines[0].split()[-1] == "EPSILON"
    assert [line.split()[-1] for line in lines[1:4]] == ["-", "2.35", "inf"]
    assert "delta=1e-05" in lines[-1]


def test_secure_normal_is_standard_normal():
    from scipy import stats
    sample = dp.secure_normal((20000,)).numpy()
    assert stats.kstest(sample, "norm").pvalue > 1e-4
    assert dp.secure_normal((3, 4)).shape == (3, 4)
