"""Stragglers: the client speed model, and synchronous rounds with a deadline and over-selection."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fedpgp_ray.client_speed import RoundClosing, SpeedModel, speed_factors
from fedpgp_ray.config import ClientSpeedConfig, ConfigError, config_from_dict
from fedpgp_ray.runtime.local import LocalRuntime
from tests.conftest import make_cfg


def test_slow_fraction_makes_exactly_that_share_slow_seeded_by_the_run_seed():
    cfg = ClientSpeedConfig(kind="slow_fraction", slow_fraction=0.1, slowdown=10.0)
    factors = speed_factors(cfg, seed=0, num_clients=100)
    assert sorted(set(factors.tolist())) == [1.0, 10.0] and int((factors == 10.0).sum()) == 10
    assert np.array_equal(factors, speed_factors(cfg, seed=0, num_clients=100))
    assert not np.array_equal(factors, speed_factors(cfg, seed=1, num_clients=100))
    model = SpeedModel(cfg, 0, 100)
    slow = int(np.flatnonzero(factors == 10.0)[0])
    assert model.factor(slow) == 10.0 and model.extra_seconds(slow, 0.5) == pytest.approx(4.5)
    big = speed_factors(cfg, seed=0, num_clients=100_000)  # one numpy draw, not a loop over clients
    assert int((big == 10.0).sum()) == 10_000


def test_lognormal_spread_has_median_one_and_a_slow_tail():
    factors = speed_factors(ClientSpeedConfig(kind="lognormal", sigma=1.0), seed=3, num_clients=100_000)
    assert factors.min() == 1.0
    assert np.median(factors) == pytest.approx(1.0, abs=0.02)
    assert np.percentile(factors, 90) == pytest.approx(np.exp(1.2816), rel=0.05)  # exp(sigma z_0.9)


def test_speed_model_is_off_by_default_and_its_settings_need_a_kind():
    cfg = config_from_dict({})
    assert cfg.client_speed.kind == "none" and not SpeedModel(cfg.client_speed, 0, 10).enabled
    assert cfg.federation.round_deadline_s is None and cfg.federation.over_selection == 0.0
    with pytest.raises(ConfigError, match="client_speed.slowdown' is set but client_speed.kind is 'none'"):
        config_from_dict({}, ["client_speed.slowdown=5"])


@pytest.mark.parametrize("knob", ["federation.round_deadline_s=5", "federation.over_selection=0.3"])
@pytest.mark.parametrize("private", ["privacy.enabled=true", "secagg.enabled=true"])
def test_deadline_mode_is_refused_under_dp_and_secagg_in_one_line(knob, private):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"federation": {"num_clients": 10}}, [knob, private])
    assert knob.split("=")[0] in str(err.value) and "\n" not in str(err.value)


def test_a_closing_round_ends_a_waiting_straggler_at_once():
    closing = RoundClosing()
    threading.Timer(0.2, closing.close, args=(4,)).start()
    assert closing.wait(4, 60.0) < 30.0 and closing.closed(4) and closing.closed(3) and not closing.closed(5)
    assert closing.wait(5, 0.05) >= 0.05  # a later round is not closed: the full wait


def test_a_slow_client_takes_slowdown_times_its_training_time(tmp_path):
    cfg = make_cfg(tmp_path, ["client_speed.kind=slow_fraction", "client_speed.slow_fraction=1.0",
                              "client_speed.slowdown=3", "train.rounds=1"])
    with LocalRuntime(cfg, None, None) as rt:
        began = time.perf_counter()
        results, failures = rt.fit(1, [0, 1], rt.initial_global_params())
        elapsed = time.perf_counter() - began
    assert not failures and all(not r.late and r.params for r in results)
    for r in results:  # waited (slowdown - 1) x its own measured training time
        assert r.metrics["straggle_seconds"] >= 2 * r.metrics["fit_seconds"] * 0.99
    assert elapsed >= sum(3 * r.metrics["fit_seconds"] for r in results) * 0.99
