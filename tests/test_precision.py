"""model.precision: amp runs bf16 autocast on CPU too, so dtype mistakes surface without a GPU."""
from __future__ import annotations

import math

import numpy as np
import torch

from fedpgp_ray.client import ClientWorker
from fedpgp_ray.clip.backbone import FrozenClip, PromptTextEncoder, load_clip
from fedpgp_ray.clip.features import FeatureRequest, ImageFeatureCache
from fedpgp_ray.config import ModelConfig
from fedpgp_ray.data.base import ImageSplit
from conftest import make_cfg

BF16_TOL = 0.05  # bf16 keeps 8 mantissa bits: ~0.4% per op; unit-norm features differ by a few 1e-2 at most


def _amp(clip: FrozenClip) -> FrozenClip:
    return FrozenClip(clip.model, clip.tokenizer, clip.preprocess, clip.identity, clip.device, precision="amp")


def test_amp_autocasts_on_cpu_and_encoders_stay_close_to_fp32():
    fp32 = load_clip(ModelConfig(name="fedpgp-tiny", pretrained=None), "cpu")
    amp = _amp(fp32)
    assert amp.autocast_enabled and not fp32.autocast_enabled
    with amp.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    names = ["red circle", "blue striped star", "a long green checkered crescent", "x"]
    ctx = (torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 0.02).requires_grad_(True)
    out = {}
    for label, clip in (("fp32", fp32), ("amp", amp)):
        enc = PromptTextEncoder(clip, 8)
        assert enc.supports_shared_prefix
        feats = enc.encode(ctx, enc.prompts(names))  # the shared-prefix pass under autocast
        assert feats.dtype == torch.float32 and torch.isfinite(feats).all()
        grad, = torch.autograd.grad(feats.sum(), ctx)
        assert torch.isfinite(grad).all()
        plain = PromptTextEncoder(clip, 8, shared_prefix=False)
        out[label] = (feats.detach(), plain.encode(ctx, plain.prompts(names)).detach())
    for i in range(2):
        assert (out["amp"][i] - out["fp32"][i]).abs().max() < BF16_TOL
    assert not torch.equal(out["amp"][0], out["fp32"][0])  # really ran in bf16
    images = ImageSplit(np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8), np.zeros(6))
    request = FeatureRequest("toy", "test", images, np.arange(6))
    f32 = ImageFeatureCache(fp32, None).fetch([request])[0]
    fbf = ImageFeatureCache(amp, None).fetch([request])[0]
    assert fbf.dtype == torch.float32 and (fbf - f32).abs().max() < BF16_TOL and not torch.equal(fbf, f32)
    assert ImageFeatureCache(amp, None).key(request) != ImageFeatureCache(fp32, None).key(request)


def test_fedpgp_round_under_amp_is_finite_and_close_to_fp32(tmp_path):
    results = {}
    for precision in ("fp32", "amp"):
        cfg = make_cfg(tmp_path / precision, [f"model.precision={precision}", "federation.num_clients=2",
                                              "algorithm.n_ctx=4"])
        worker = ClientWorker(cfg, cache_dir=None)
        params = worker.global_params()
        fits = [worker.fit(cid, 1, params) for cid in range(2)]
        assert all(math.isfinite(f.metrics["loss"]) and all(torch.isfinite(v).all() for v in f.params.values())
                   for f in fits)
        assert all(v.dtype == torch.float32 for f in fits for v in f.params.values())  # uploads stay fp32
        results[precision] = [worker.evaluate(cid, 1, fits[0].params).metrics for cid in range(2)]
    for a, b in zip(results["fp32"], results["amp"]):
        for key in a:
            assert abs(a[key] - b[key]) <= 5.0, (key, a[key], b[key])  # accuracy points
