"""Stragglers: the client speed model, and synchronous rounds with a deadline and over-selection."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fedpgp_ray.client_speed import RoundClosing, SpeedModel, speed_factors
from fedpgp_ray.config import ClientSpeedConfig, ConfigError, config_from_dict
from fedpgp_ray.federation import run_federation
from fedpgp_ray.plots import write_figures
from fedpgp_ray.runtime.local import LocalRuntime
from fedpgp_ray.strategy import FedAvgStrategy, RoundClose, RoundFailedError, sample_clients
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


def test_over_selection_samples_more_and_targets_the_first_m():
    assert sample_clients(100, 0.1, 0, 3) == sample_clients(100, 0.1, 0, 3, 0.0)  # off: the same sample as before
    assert len(sample_clients(100, 0.1, 0, 3, 0.3)) == 13 and len(sample_clients(10, 1.0, 0, 3, 0.3)) == 10
    strategy = FedAvgStrategy(100, 0.1, 1, 1, 5, 0, over_selection=0.3, round_deadline_s=None)
    assert strategy.round_close(13) == RoundClose(10, None)
    assert FedAvgStrategy(100, 0.1, 1, 1, 5, 0, round_deadline_s=7.5).round_close(10) == RoundClose(10, 7.5)
    assert FedAvgStrategy(100, 0.1, 1, 1, 5, 0).round_close(10) is None


def slow_client(cfg) -> int:
    factors = speed_factors(cfg.client_speed, cfg.seed, cfg.federation.num_clients)
    (slow,) = np.flatnonzero(factors > 1).tolist()
    return slow


STRAGGLER = ["federation.num_clients=6", "client_speed.kind=slow_fraction", "client_speed.slow_fraction=0.17",
             "client_speed.slowdown=100000", "train.rounds=1"]


def test_deadline_discards_and_counts_a_straggler_which_keeps_its_local_update(tmp_path):
    """In-process, clients in turn: one before the straggler reports; the straggler trains, waits, is cut at the
    deadline (late, trained: its personal state moved on, its upload is discarded); the next never starts."""
    cfg = make_cfg(tmp_path, STRAGGLER)
    slow = slow_client(cfg)
    before, after = (slow + 1) % 6, (slow + 2) % 6
    with LocalRuntime(cfg, None, None) as rt:
        fresh = {k: v.clone() for k, v in rt.worker.state(slow, 1).personal.items()}
        results, failures = rt.fit(1, [before, slow, after], rt.initial_global_params(), RoundClose(3, 8.0))
        kept = rt.worker.states[slow]
        assert after not in rt.worker.states  # never started: no state made for it
    by_id = {r.client_id: r for r in results}
    assert not failures and not by_id[before].late and by_id[before].params
    assert by_id[slow].late and not by_id[slow].params and by_id[slow].metrics["steps"] > 0
    assert by_id[slow].metrics["straggle_seconds"] < 1000  # cut at the deadline, not the 100000x wait
    assert by_id[after].late and "steps" not in by_id[after].metrics
    assert kept.round == 1 and any(not (kept.personal[k] == fresh[k]).all() for k in fresh)  # kept, not rolled back


def test_deadline_round_reports_late_clients_apart_from_dropped_ones(tmp_path):
    cfg = make_cfg(tmp_path, ["federation.num_clients=10", "federation.client_fraction=0.5",
                              "federation.over_selection=0.4", "train.rounds=1"])
    with LocalRuntime(cfg, None, None) as rt:
        doc = run_federation(cfg, rt)
    m = doc["rounds"][1]["metrics"]
    assert (m["clients_sampled"], m["clients_reported"], m["clients_late"], m["clients_late_trained"]) == (7, 5, 2, 0)
    assert m["clients_dropped"] == 0 and doc["dropped_clients"] == []
    assert sum("late" in c for c in doc["rounds"][1]["clients"].values()) == 2
    assert 0 < m["train_wall_seconds"] <= m["wall_seconds"]
    assert doc["rounds"][0]["metrics"]["wall_seconds"] < m["wall_seconds"]


def test_too_few_reporting_by_the_deadline_fails_the_round_loudly(tmp_path):
    cfg = make_cfg(tmp_path, STRAGGLER + ["client_speed.slow_fraction=1.0", "federation.client_fraction=0.5",
                                          "federation.round_deadline_s=3", "federation.min_reporting_clients=2"])
    with LocalRuntime(cfg, None, None) as rt, pytest.raises(RoundFailedError) as err:
        run_federation(cfg, rt)  # the first client is cut at the deadline, the others never start
    assert "only 0 clients reported, fewer than federation.min_reporting_clients=2" in str(err.value)
    assert "3 more were late (federation.round_deadline_s=3.0" in str(err.value) and "\n" not in str(err.value)


def test_a_deadline_no_round_reaches_changes_nothing(tmp_path):
    results = {}
    for name, extra in (("sync", []), ("deadline", ["federation.round_deadline_s=1000"])):
        cfg = make_cfg(tmp_path / name, ["train.rounds=2", *extra])
        with LocalRuntime(cfg, None, None) as rt:
            results[name] = run_federation(cfg, rt)
    assert results["deadline"]["final"] == results["sync"]["final"]
    assert results["deadline"]["rounds"][2]["metrics"]["clients_late"] == 0
    paths = write_figures(results["deadline"], tmp_path / "figures")
    assert (tmp_path / "figures" / "hm3_wall_time.png") in paths and paths[1].stat().st_size > 0
