"""Baselines beside FedPGP: FedProx's proximal term, FedKgCoOp's knowledge-guided term, FedOTP's
unbalanced optimal transport and its private local prompt, and the patch tokens FedOTP needs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fedpgp_ray.algorithms.fedotp as fedotp
from fedpgp_ray.algorithms import ALGORITHMS, FrozenEncoders, build_algorithm
from fedpgp_ray.algorithms.fedkgcoop import kg_term
from fedpgp_ray.algorithms.fedotp import ot_logits, unbalanced_sinkhorn
from fedpgp_ray.algorithms.fedprox import DEFAULT_PROX_MU
from fedpgp_ray.algorithms.promptfl import proximal_term
from fedpgp_ray.checkpoint import CheckpointStore
from fedpgp_ray.client import ClientWorker, seeded_generator
from fedpgp_ray.clip.backbone import FrozenClip, load_clip
from fedpgp_ray.clip.features import ImageFeatureCache
from fedpgp_ray.config import AlgorithmConfig, ModelConfig
from fedpgp_ray.data.base import ImageSplit
from fedpgp_ray.federation import run_federation
from fedpgp_ray.runtime.local import LocalRuntime

from conftest import make_cfg

NAMES = ["red circle", "blue star", "green square"]


@pytest.fixture(scope="module")
def encoders():
    return FrozenEncoders(load_clip(ModelConfig(name="fedpgp-tiny", pretrained=None), "cpu"), n_ctx=4)


def _trainable(algo, encoders, seed=0):
    g = seeded_generator(seed)
    params = {**algo.init_global(encoders.width, g), **algo.init_personal(encoders.width, g)}
    return {k: v.clone().requires_grad_(True) for k, v in params.items()}


def _batch(encoders, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(n, encoders.clip.model.visual.output_dim, generator=g), dim=-1)
    return feats, torch.arange(n) % len(NAMES)


def test_registry_has_every_baseline():
    assert {"clip", "local", "promptfl", "fedprox", "fedkgcoop", "fedotp", "fedpgp"} <= set(ALGORITHMS)


# -- FedProx ---------------------------------------------------------------------------------------------
def test_proximal_term_value_and_gradient():
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(4, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    ctx_global = torch.randn(4, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    mu = 0.3
    term = proximal_term(ctx, ctx_global, mu)
    assert term.item() == pytest.approx(mu / 2 * ((ctx - ctx_global) ** 2).sum().item(), rel=1e-12)
    term.backward()
    assert torch.allclose(ctx.grad, mu * (ctx - ctx_global).detach(), atol=1e-12)
    assert ctx_global.grad is None  # the received global context is a constant


@pytest.mark.parametrize("prox_mu, expected", [(0.0, DEFAULT_PROX_MU), (0.25, 0.25)])
def test_fedprox_loss_gradient_is_promptfl_plus_mu_times_drift(encoders, prox_mu, expected):
    fedprox = build_algorithm(AlgorithmConfig(name="fedprox", n_ctx=4, prox_mu=prox_mu))
    promptfl = build_algorithm(AlgorithmConfig(name="promptfl", n_ctx=4))
    assert fedprox.cfg.prox_mu == expected
    start = _trainable(promptfl, encoders)
    global_start = {"ctx": start["ctx"].detach().clone()}
    drifted = {"ctx": (start["ctx"].detach() + 0.05 * torch.randn_like(start["ctx"])).requires_grad_(True)}
    feats, labels = _batch(encoders)
    grads = []
    for algo in (fedprox, promptfl):
        params = {"ctx": drifted["ctx"].detach().clone().requires_grad_(True)}
        terms = algo.loss(encoders, params, feats, labels, NAMES, global_start)
        terms.total.backward()
        grads.append(params["ctx"].grad)
    assert "prox" in fedprox.loss(encoders, drifted, feats, labels, NAMES, global_start).parts
    diff = drifted["ctx"].detach() - global_start["ctx"]
    assert torch.allclose(grads[0] - grads[1], expected * diff, atol=1e-6)


# -- FedKgCoOp --------------------------------------------------------------------------------------------
def test_kg_term_value_on_fixed_tensors():
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])  # not unit length: normalised inside
    clip_features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    # cosines 1, 0, 1/sqrt(2): W * (1 - mean)
    expected = 8.0 * (1.0 - (1.0 + 0.0 + 1.0 / math.sqrt(2.0)) / 3.0)
    assert kg_term(features, clip_features, 8.0).item() == pytest.approx(expected, rel=1e-6)
    assert kg_term(clip_features, clip_features, 8.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kg_term(features, clip_features, 0.0).item() == 0.0


def test_fedkgcoop_loss_is_ce_plus_kg_towards_handcrafted_features(encoders):
    algo = build_algorithm(AlgorithmConfig(name="fedkgcoop", n_ctx=4))
    assert algo.cfg.kg_weight == 8.0
    params = _trainable(algo, encoders)
    feats, labels = _batch(encoders)
    terms = algo.loss(encoders, params, feats, labels, NAMES, {"ctx": params["ctx"].detach()})
    fc = algo.class_features(encoders, params, NAMES)
    clip_fc = encoders.handcrafted_features(NAMES, "a photo of a {}.")
    assert terms.parts["kg"].item() == pytest.approx(kg_term(fc, clip_fc, 8.0).item(), rel=1e-5)
    ce = F.cross_entropy(encoders.clip.logit_scale * feats @ fc.t(), labels)
    assert terms.parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert terms.total.item() == pytest.approx(ce.item() + terms.parts["kg"].item(), rel=1e-5)
    terms.total.backward()
    assert params["ctx"].grad is not None and params["ctx"].grad.abs().sum() > 0


# -- FedOTP: the transport plan --------------------------------------------------------------------------
def _random_cost(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    sim = (torch.randn(*shape, generator=g, dtype=dtype) * 0.2 + 0.2).clamp(-1, 1)
    return 1.0 - sim


@pytest.mark.parametrize("mass", [0.5, 0.8, 1.0])
def test_ot_plan_marginals_when_converged(mass):
    m, n = 16, 2
    cost = _random_cost(3, 4, m, n)
    plan = unbalanced_sinkhorn(cost, eps=0.05, iters=2000, mass=mass)
    assert plan.shape == cost.shape and plan.dtype == cost.dtype and bool((plan >= 0).all())
    rows, cols = plan.sum(-1), plan.sum(-2)
    assert float(rows.max()) <= 1.0 / m + 1e-12                              # patches: at most 1/M each
    assert torch.allclose(cols, torch.full_like(cols, mass / n), atol=1e-8)  # prompts: exactly mass/N each
    assert torch.allclose(plan.sum((-2, -1)), torch.full((3, 4), mass, dtype=cost.dtype), atol=1e-8)
    if mass == 1.0:  # balanced: both marginals uniform
        assert torch.allclose(rows, torch.full_like(rows, 1.0 / m), atol=1e-8)
    else:  # unbalanced: some patches are left (partly) out
        assert float(rows.min()) < 1.0 / m - 1e-4


def test_ot_plan_at_fedotp_defaults_keeps_the_bounds():
    """eps 0.01, 100 iterations, mass 0.8: the row bound holds exactly, the total never exceeds the mass."""
    m, n = 64, 2
    cost = _random_cost(5, 7, m, n, seed=3, dtype=torch.float32)
    plan = unbalanced_sinkhorn(cost, eps=0.01, iters=100, mass=0.8)
    assert plan.dtype == torch.float32 and bool(torch.isfinite(plan).all())
    assert float(plan.sum(-1).max()) <= 1.0 / m * (1 + 1e-5)
    totals = plan.sum((-2, -1))
    assert float(totals.max()) <= 0.8 * (1 + 1e-5) and float(totals.min()) > 0.5
    assert float((plan.sum(-2) - 0.4).abs().max()) < 0.1  # columns close to mass/N, not yet exact


def test_balanced_plan_equals_textbook_sinkhorn():
    m, n, eps = 10, 3, 0.1
    cost = _random_cost(m, n, seed=5)
    k = torch.exp(-cost / eps)
    a, b = torch.full((m,), 1.0 / m, dtype=cost.dtype), torch.full((n,), 1.0 / n, dtype=cost.dtype)
    u = torch.ones(m, dtype=cost.dtype)
    for _ in range(3000):
        v = b / (k.t() @ u)
        u = a / (k @ v)
    expected = u[:, None] * k * v[None, :]
    assert torch.allclose(unbalanced_sinkhorn(cost, eps, 3000, 1.0), expected, atol=1e-10)


def test_unbalanced_plan_transports_the_cheapest_patches():
    m, n = 8, 2
    cost = torch.ones(m, n, dtype=torch.float64)
    cost[: m // 2] = 0.0  # half of the patches fit both prompts perfectly
    plan = unbalanced_sinkhorn(cost, eps=0.05, iters=500, mass=0.5)
    rows = plan.sum(-1)
    assert torch.allclose(rows[: m // 2], torch.full((m // 2,), 1.0 / m, dtype=cost.dtype), atol=1e-6)
    assert float(rows[m // 2:].max()) < 1e-6


def test_log_domain_and_scaling_paths_agree(monkeypatch):
    cost = _random_cost(4, 12, 2, seed=7)
    scaling = unbalanced_sinkhorn(cost, eps=0.02, iters=100, mass=0.8)
    monkeypatch.setattr(fedotp, "SCALING_RANGE", 0.0)  # force the log-domain path
    log_domain = unbalanced_sinkhorn(cost, eps=0.02, iters=100, mass=0.8)
    assert torch.allclose(scaling, log_domain, atol=1e-10)
    tiny_eps = unbalanced_sinkhorn(cost, eps=1e-4, iters=50, mass=0.8)  # range / eps far beyond float64's exp
    assert bool(torch.isfinite(tiny_eps).all()) and float(tiny_eps.sum(-1).max()) <= 1 / 12 + 1e-9
    narrow = 1.0 + 0.2 * (cost - 1.0)  # range / eps small enough for the float32 path
    in_float32 = unbalanced_sinkhorn(narrow.float(), eps=0.02, iters=100, mass=0.8)
    assert in_float32.dtype == torch.float32
    assert torch.allclose(in_float32.double(), unbalanced_sinkhorn(narrow, 0.02, 100, 0.8), atol=1e-7)


def test_ot_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mass"):
        unbalanced_sinkhorn(torch.zeros(3, 2), 0.1, 10, 1.5)
    with pytest.raises(ValueError, match="eps"):
        unbalanced_sinkhorn(torch.zeros(3, 2), 0.0, 10, 0.8)


def test_ot_logits_plan_is_a_constant_for_autograd():
    g = torch.Generator().manual_seed(0)
    tokens = F.normalize(torch.randn(3, 5, 8, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(2, 4, 8, generator=g, dtype=torch.float64), dim=-1).requires_grad_(True)
    logits = ot_logits(10.0, tokens, text, eps=0.05, iters=50, mass=0.8)
    assert logits.shape == (3, 4)
    sim = torch.einsum("bmd,ncd->bcmn", tokens, text)
    plan = unbalanced_sinkhorn(1.0 - sim.detach(), 0.05, 50, 0.8)
    weights = plan / plan.sum((-2, -1), keepdim=True)
    assert torch.allclose(logits.double(), 10.0 * (weights * sim).sum((-2, -1)), atol=1e-5)
    (grad,) = torch.autograd.grad(logits.sum(), text)
    (expected,) = torch.autograd.grad((10.0 * (weights * sim).sum((-2, -1))).sum(), text)
    assert torch.allclose(grad.double(), expected, atol=1e-5)


# -- FedOTP: the algorithm ---------------------------------------------------------------------------------
def test_fedotp_keys_and_needs_patch_tokens(encoders):
    algo = build_algorithm(AlgorithmConfig(name="fedotp", n_ctx=4))
    assert algo.global_keys == ("ctx_global",) and algo.personal_keys == ("ctx_local",)
    assert algo.uses_patch_tokens and (algo.cfg.ot_eps, algo.cfg.ot_iters, algo.cfg.ot_mass) == (0.01, 100, 0.8)
    params = _trainable(algo, encoders)
    feats, labels = _batch(encoders, n=4)
    with pytest.raises(ValueError, match="patch tokens"):
        algo.loss(encoders, params, feats, labels, NAMES, {})
    tokens = F.normalize(torch.randn(4, 9, feats.shape[1]), dim=-1)
    terms = algo.loss(encoders, params, feats, labels, NAMES, {}, patch_tokens=tokens)
    terms.total.backward()
    assert params["ctx_global"].grad.abs().sum() > 0 and params["ctx_local"].grad.abs().sum() > 0
    assert algo.logits(encoders, params, feats, NAMES, patch_tokens=tokens).shape == (4, len(NAMES))


def test_fedotp_local_prompt_never_leaves_a_client(tmp_path):
    cfg = make_cfg(tmp_path, ["algorithm.name=fedotp", "algorithm.n_ctx=4", "algorithm.ot_iters=10",
                              "train.rounds=1", "federation.num_clients=2", "runtime.threads_per_worker=1"])
    store = CheckpointStore(tmp_path / "checkpoints")
    runtime = LocalRuntime(cfg, store, None)
    worker = runtime.worker
    initial_global = runtime.initial_global_params()
    initial_local = {cid: worker.state(cid, 1).personal["ctx_local"].clone() for cid in (0, 1)}
    result = worker.fit(0, 1, initial_global)
    assert set(result.params) == {"ctx_global"}                       # the upload: the global prompt only
    assert not torch.equal(worker.states[0].personal["ctx_local"], initial_local[0])  # trained, kept here

    worker.states.clear()  # start the federation from scratch
    doc = run_federation(cfg, runtime, store)
    server = store.latest_server()
    assert set(server["global_params"]) == {"ctx_global"}            # the server never holds a local prompt
    assert not torch.equal(server["global_params"]["ctx_global"], initial_global["ctx_global"])
    width = initial_global["ctx_global"].shape[1]
    assert doc["rounds"][1]["metrics"]["bytes_uploaded"] == 2 * 4 * width * 4  # 2 clients x ctx_global (fp32)
    locals_ = [store.load_client(cid, 1)["personal"]["ctx_local"] for cid in (0, 1)]
    assert not torch.equal(locals_[0], locals_[1])                   # one private prompt per client
    assert doc["final"]["local"] is not None and doc["final"]["novel"] is not None


# -- patch tokens -------------------------------------------------------------------------------------------
def test_clip_patch_tokens_are_projected_normalised_and_pooled_matches(encoders):
    clip = encoders.clip
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pooled, tokens = clip.encode_image_tokens(images)
    grid = clip.model.visual.grid_size
    assert tokens.shape == (3, grid[0] * grid[1], clip.model.visual.output_dim)
    assert torch.allclose(tokens.norm(dim=-1), torch.ones(tokens.shape[:2]), atol=1e-5)
    assert torch.allclose(pooled, clip.encode_images(images), atol=1e-6)
    assert clip.model.visual.output_tokens is False  # the tower is left as it was
    # by hand: LayerNorm'd last-layer tokens (class token dropped), then the image projection
    visual = clip.model.visual
    with torch.no_grad():
        x = visual.ln_post(visual.transformer(visual._embeds(images)))[:, 1:] @ visual.proj
    assert torch.allclose(tokens, F.normalize(x, dim=-1), atol=1e-5)


def _split(n=5, size=32):
    rng = np.random.default_rng(0)
    return ImageSplit(rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8), np.zeros(n, dtype=np.int64))


def test_patch_token_cache_is_on_disk_and_shares_the_pass_with_pooled(encoders, tmp_path, monkeypatch):
    split, idx = _split(), np.arange(5)
    cache = ImageFeatureCache(encoders.clip, tmp_path)
    tokens = cache.patch_tokens("toy", "test", split, idx)
    assert tokens.dtype == torch.float16 and tokens.shape[:2] == (5, 64)
    direct = ImageFeatureCache(encoders.clip, None).features("toy", "test", split, idx)
    assert torch.equal(cache.features("toy", "test", split, idx), direct)  # cached by the token pass, exact

    def refuse(*_args, **_kwargs):
        raise AssertionError("encoded again")
    monkeypatch.setattr(FrozenClip, "encode_image_tokens", refuse)
    monkeypatch.setattr(FrozenClip, "encode_images", refuse)
    again = ImageFeatureCache(encoders.clip, tmp_path)  # a new process: from disk
    assert torch.equal(again.patch_tokens("toy", "test", split, idx), tokens)
    assert torch.equal(again.features("toy", "test", split, idx), direct)


def test_pooled_feature_algorithms_never_compute_patch_tokens(tmp_path, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("patch tokens computed for a pooled-feature algorithm")
    monkeypatch.setattr(FrozenClip, "encode_image_tokens", refuse)
    cfg = make_cfg(tmp_path, ["algorithm.name=fedkgcoop", "algorithm.n_ctx=4", "federation.num_clients=2"])
    worker = ClientWorker(cfg, cache_dir=None)
    worker.prepare()
    worker.fit(0, 1, worker.global_params())
    assert worker._train_tokens == {} and worker._test_tokens is None
