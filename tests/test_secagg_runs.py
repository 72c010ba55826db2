"""SecAgg in the federation: in-process runs, dropouts, what the server side receives, DP under SecAgg,
and the privacy leaks closed around DP (counts only, no global momentum kept, config refusals)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy import stats

from fedpgp_ray import privacy as dp
from fedpgp_ray.config import ConfigError
from fedpgp_ray.federation import build_strategy, run_federation, secure_aggregation
from fedpgp_ray.run import main
from fedpgp_ray.runtime.local import LocalRuntime
from fedpgp_ray.secagg.ring import from_ring
from fedpgp_ray.strategy import RoundFailedError

from conftest import make_cfg

SECAGG = ["secagg.enabled=true", "secagg.clip_range=1.0"]
IDS = [0, 1, 2, 3, 4]


def _spy(runtime: LocalRuntime, drop: dict[str, set[int]] | None = None):
    """Instrument a LocalRuntime's clients: keep each client's SecAgg state (for the test's eyes only) and make
    the clients in drop[stage] fail from that stage on (a client process dying mid-protocol)."""
    worker, kept, dead = runtime.worker, {}, set()
    step = type(worker).secagg_step.__get__(worker)  # the real one (not an earlier test's spy)

    def spy(cid, rnd, stage, request):
        dead.update((drop or {}).get(stage, set()))
        if cid in dead:
            raise RuntimeError("injected dropout")
        out = step(cid, rnd, stage, request)
        if stage == "masked_input":
            kept[cid] = worker._secagg_clients[cid]
        return out
    worker.secagg_step = spy
    return kept


def _server_spy(server):
    """Record every message the server receives from clients, by stage."""
    received: dict[str, dict] = {}
    step = server.secagg_step

    def spy(stage, responses):
        received[stage] = dict(responses)
        return step(stage, responses)
    server.secagg_step = spy
    return received


def _round(runtime, cfg, drop=None):
    strategy = build_strategy(cfg)
    server = runtime.make_server(strategy, None, False)
    received = _server_spy(server)
    kept = _spy(runtime, drop)
    start = server.global_params()
    results, failures = runtime.fit(1, IDS, start)
    secure_aggregation(1, server, runtime, [r.client_id for r in results])
    metrics = server.aggregate_train(1, results, failures)
    return start, server, results, metrics, received, kept


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secagg")
    secure = LocalRuntime(make_cfg(tmp / "a", SECAGG), None, None)
    plain = LocalRuntime(make_cfg(tmp / "b"), None, None)
    return secure, plain


def test_server_sees_only_masked_vectors_and_unmasks_the_exact_sum(runtimes, tmp_path):
    secure, plain = runtimes
    cfg = secure.worker.cfg
    start, server, results, metrics, received, kept = _round(secure, cfg)
    # strategy / server inputs: no FitResult carries parameters; per-client vectors are masked
    assert all(r.params == {} for r in results)
    bits = cfg.secagg.bits
    for cid, y in received["masked_input"].items():
        frac = y.astype(np.float64) / 2.0 ** bits
        assert stats.kstest(frac, "uniform").pvalue > 1e-5
        assert stats.kstest(from_ring(kept[cid].quantised, bits) / 2.0 ** (bits - 1) + 0.5, "uniform").pvalue < 1e-6
    # the unmasked sum is exactly the sum of the clients' quantised updates
    total = np.sum([from_ring(kept[c].quantised, bits) for c in IDS], axis=0)
    gamma = kept[0].setup.gamma
    new = server.global_params()
    step = dp.flat_update(new, start) * len(IDS) * gamma
    assert np.allclose(step, total, atol=1e-3 * gamma)
    # and equals the plain unweighted mean of the updates up to rounding (each client < 1 / gamma per coordinate)
    uploads, _ = plain.fit(1, IDS, start)
    mean = np.mean([dp.flat_update(r.params, start) for r in uploads], axis=0)
    assert np.max(np.abs(dp.flat_update(new, start) - mean)) < 1.0 / gamma + 1e-6
    assert metrics["secagg/survivors"] == 5


@pytest.mark.parametrize("stage", ["advertise", "share", "masked_input", "unmask"])
def test_a_client_dying_at_each_stage(runtimes, stage):
    secure, _ = runtimes
    cfg = secure.worker.cfg
    start, server, results, metrics, received, kept = _round(secure, cfg, {stage: {3}})
    survivors = [c for c in IDS if c != 3] if stage != "unmask" else IDS
    assert metrics["secagg/survivors"] == len(survivors)
    total = np.sum([from_ring(kept[c].quantised, cfg.secagg.bits) for c in survivors], axis=0)
    step = dp.flat_update(server.global_params(), start) * len(survivors) * kept[0].setup.gamma
    assert np.allclose(step, total, atol=1e-3 * kept[0].setup.gamma)


def test_too_few_survivors_fail_the_round_with_nothing_unmasked(runtimes):
    secure, _ = runtimes
    cfg = secure.worker.cfg
    server = secure.make_server(build_strategy(cfg), None, False)
    _spy(secure, {"masked_input": {0, 1, 2, 3}})
    start = server.global_params()
    results, failures = secure.fit(1, IDS, start)
    with pytest.raises(RoundFailedError, match="min_survivors"):
        secure_aggregation(1, server, secure, IDS)
    assert server.secagg is None
    with pytest.raises(RoundFailedError, match="did not complete"):
        server.aggregate_train(1, results, failures)
    assert all(torch.equal(server.global_params()[k], start[k]) for k in start)


def test_secagg_with_distributed_dp_run(tmp_path, caplog):
    cfg = make_cfg(tmp_path, ["secagg.enabled=true", "secagg.min_survivors=2", "privacy.enabled=true",
                              "privacy.seeded=true", "privacy.noise_multiplier=1.0", "federation.client_fraction=0.8",
                              "federation.num_clients=5"])
    with caplog.at_level(logging.INFO), LocalRuntime(cfg, None, None) as runtime:
        doc = run_federation(cfg, runtime)
    assert doc["privacy"]["mode"].startswith("distributed") and doc["privacy"]["epsilon"] > 0
    for rnd in doc["rounds"][1:]:
        assert rnd["metrics"]["privacy/epsilon"] == pytest.approx(build_strategy(cfg).epsilon(rnd["round"]))
        # no per-client training entries: which clients trained is not recorded (counts only)
        assert all(not any(k.startswith("train_") for k in m) for m in rnd["clients"].values())
        assert rnd["metrics"]["clients_reported"] >= 0
    assert "client 0" not in caplog.text and "client 1 " not in caplog.text


def test_dp_keeps_no_global_momentum(tmp_path):
    cfg = make_cfg(tmp_path, ["privacy.enabled=true", "privacy.seeded=true"])
    with LocalRuntime(cfg, None, None) as runtime:
        start = runtime.initial_global_params()
        runtime.fit(1, [0], start)
        state = runtime.worker.states[0].optimizer["state"]
    keys = list({**start, **runtime.worker.states[0].personal})
    assert state and all(keys[i] not in runtime.worker.algorithm.global_keys for i in state)


@pytest.mark.parametrize("override", ["privacy.noise_multiplier=1.5", "privacy.clip_norm=0.2", "privacy.seeded=true",
                                      "secagg.bits=40", "secagg.min_survivors=3"])
def test_settings_of_a_disabled_feature_are_refused_in_one_line(tmp_path, capsys, override):
    with pytest.raises(ConfigError, match="enabled is false") as err:
        make_cfg(tmp_path, [override])
    assert "\n" not in str(err.value)
    assert main(["--no-progress", "--set", f"output_dir={tmp_path / 'cli'}", "--set", override]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
