"""FedPGP's loss, gradients, what leaves a client, aggregation and per-client optimizer state."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedpgp_ray.algorithms import FrozenEncoders, build_algorithm
from fedpgp_ray.algorithms.fedpgp import contrastive_loss, fedpgp_loss
from fedpgp_ray.client import ClientWorker, seeded_generator
from fedpgp_ray.clip.backbone import load_clip
from fedpgp_ray.config import AlgorithmConfig, ModelConfig
from fedpgp_ray.strategy import aggregate_weighted


def _unit(*rows):
    t = torch.tensor(rows, dtype=torch.float64)
    return t / t.norm(dim=-1, keepdim=True)


def test_fedpgp_loss_matches_hand_computation():
    fs = _unit([1.0, 0.0], [0.0, 1.0])
    f0 = _unit([1.0, 1.0], [0.0, 1.0])
    fp = _unit([1.0, -1.0], [1.0, 1.0])
    img = _unit([2.0, 1.0], [0.0, 1.0], [1.0, 0.5])
    labels = torch.tensor([0, 1, 0])
    scale, mu, tau = 10.0, 0.5, 0.5

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b))
    # contrastive, by hand: per class -log(e^pos / (e^pos + e^neg))
    con = 0.0
    for c in range(2):
        pos = cos(fs[c].tolist(), f0[c].tolist()) / tau
        neg = cos(fs[c].tolist(), fp[c].tolist()) / tau
        con += -math.log(math.exp(pos) / (math.exp(pos) + math.exp(neg)))
    con /= 2
    ce = 0.0
    for i, y in enumerate(labels.tolist()):
        logits = [scale * cos(img[i].tolist(), fp[c].tolist()) for c in range(2)]
        ce += -(logits[y] - math.log(sum(math.exp(v) for v in logits)))
    ce /= 3
    terms = fedpgp_loss(scale, img, labels, fs, f0, fp, mu, tau)
    assert terms.parts["con"].item() == pytest.approx(con, rel=1e-9)
    assert terms.parts["ce"].item() == pytest.approx(ce, rel=1e-9)
    assert terms.total.item() == pytest.approx(ce + mu * con, rel=1e-9)


@pytest.fixture(scope="module")
def encoders():
    return FrozenEncoders(load_clip(ModelConfig(name="fedpgp-tiny", pretrained=None), "cpu"), n_ctx=4)


def _params(encoders, rank=2):
    algo = build_algorithm(AlgorithmConfig(name="fedpgp", n_ctx=4, rank=rank))
    g = seeded_generator(0)
    params = {**algo.init_global(encoders.width, g), **algo.init_personal(encoders.width, g)}
    return algo, {k: v.clone().requires_grad_(True) for k, v in params.items()}


def _grads(loss, params):
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)
    return {k: (g is not None and g.abs().sum().item() > 0) for k, g in zip(params, grads)}


def test_gradient_flow_of_each_term(encoders):
    algo, params = _params(encoders)
    names = ["red circle", "blue star", "green square"]
    prompts = encoders.prompts(names)
    fs = encoders.text.encode(params["sigma"], prompts)
    fp = algo.class_features(encoders, params, names)
    f0 = encoders.placeholder_features(names)
    img = F.normalize(torch.randn(4, fs.shape[1], generator=seeded_generator(1)), dim=-1)
    labels = torch.tensor([0, 1, 2, 0])
    ce = F.cross_entropy(encoders.clip.logit_scale * img @ fp.t(), labels)
    positive = ((fs * f0).sum(-1) / 0.5).sum()
    negative = ((fs * fp).sum(-1) / 0.5).sum()
    assert _grads(positive, params) == {"sigma": True, "U": False, "V": False}
    assert _grads(negative, params) == {"sigma": True, "U": True, "V": True}
    assert _grads(ce, params) == {"sigma": True, "U": True, "V": True}
    # and the full loss is exactly CE + mu * contrastive on these features
    total = algo.loss(encoders, params, img, labels, names, {}).total
    assert total.item() == pytest.approx((ce + 0.5 * contrastive_loss(fs, f0, fp, 0.5)).item(), rel=1e-5)


def test_init_is_normal_002_and_not_lora_zero(encoders):
    algo = build_algorithm(AlgorithmConfig(name="fedpgp", n_ctx=16, rank=8))
    g = seeded_generator(3)
    personal = algo.init_personal(encoders.width, g)
    sigma = algo.init_global(encoders.width, g)["sigma"]
    for t in (sigma, personal["U"], personal["V"]):
        assert t.abs().sum() > 0
        assert t.std().item() == pytest.approx(0.02, rel=0.25)
    assert personal["U"].shape == (16, 8) and personal["V"].shape == (8, encoders.width)


def test_weighted_aggregation():
    a = {"sigma": torch.full((2, 3), 1.0)}
    b = {"sigma": torch.full((2, 3), 4.0)}
    out = aggregate_weighted([(a, 10), (b, 30)])
    assert torch.allclose(out["sigma"], torch.full((2, 3), (10 * 1 + 30 * 4) / 40))
    with pytest.raises(ValueError):
        aggregate_weighted([])


def test_only_sigma_and_count_leave_the_client(tiny_cfg):
    worker = ClientWorker(tiny_cfg, device="cpu")
    result = worker.fit(0, 1, worker.global_params())
    assert set(result.params) == {"sigma"}
    assert result.params["sigma"].shape == (tiny_cfg.algorithm.n_ctx, worker.encoders.width)
    assert result.num_examples == len(worker.partition.clients[0].train_indices)
    assert set(worker.states[0].personal) == {"U", "V"}


def test_each_client_keeps_its_own_optimizer_state(tiny_cfg):
    worker = ClientWorker(tiny_cfg, device="cpu")
    g = worker.global_params()
    worker.fit(0, 1, g)
    worker.fit(1, 1, g)
    buf = lambda cid: [s["momentum_buffer"] for s in worker.states[cid].optimizer["state"].values()]
    first0 = [t.clone() for t in buf(0)]
    assert not all(torch.equal(x, y) for x, y in zip(buf(0), buf(1)))
    worker.fit(1, 2, g)  # training client 1 again must not touch client 0's momentum
    assert all(torch.equal(x, y) for x, y in zip(first0, buf(0)))


def test_clip_is_frozen_and_unchanged_by_a_round(tiny_cfg):
    worker = ClientWorker(tiny_cfg, device="cpu")
    model = worker.encoders.clip.model
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = worker.global_params()
    for cid in range(tiny_cfg.federation.num_clients):
        worker.fit(cid, 1, g)
        worker.evaluate(cid, 1, g)
    assert not model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
