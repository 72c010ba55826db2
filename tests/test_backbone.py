"""The frozen CLIP factory and the CoOp prompt text encoder (exact against the full 77-token pass)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedpgp_ray.clip.backbone import CheckpointError, PromptTextEncoder, load_clip
from fedpgp_ray.clip.features import ImageFeatureCache
from fedpgp_ray.config import ModelConfig
from fedpgp_ray.data.base import ImageSplit


@pytest.fixture(scope="module")
def clip():
    return load_clip(ModelConfig(name="fedpgp-tiny", pretrained=None), "cpu")


def naive_prompt_features(clip, ctx, classnames):
    """Reference: splice ctx into the full-length token embeddings and run open_clip's full text pass."""
    model = clip.model
    n_ctx = ctx.shape[0]
    tokens = clip.tokenizer([" ".join(["X"] * n_ctx) + " " + c + "." for c in classnames])
    x = model.token_embedding(tokens)
    x = torch.cat([x[:, :1], ctx.unsqueeze(0).expand(len(classnames), -1, -1), x[:, 1 + n_ctx:]], dim=1)
    x = model.transformer(x + model.positional_embedding, attn_mask=model.attn_mask)
    x = model.ln_final(x)[torch.arange(len(classnames)), tokens.argmax(-1)] @ model.text_projection
    return F.normalize(x, dim=-1)


@pytest.mark.parametrize("n_ctx", [1, 4, 16])
def test_prompt_encoder_equals_full_pass(clip, n_ctx):
    names = ["red circle", "blue striped star", "a very long green checkered crescent name"]
    enc = PromptTextEncoder(clip, n_ctx)
    prompts = enc.prompts(names)
    assert prompts.length < 77, "truncated at the longest EOT"
    ctx = torch.randn(n_ctx, enc.width) * 0.02
    with torch.no_grad():
        fast = enc.encode(ctx, prompts)
        slow = naive_prompt_features(clip, ctx, names)
    assert torch.allclose(fast, slow, atol=1e-5)
    # the frozen "X X ... X c." placeholder prompt (FedPGP's f0) equals plain encode_text
    texts = [" ".join(["X"] * n_ctx) + " " + c + "." for c in names]
    assert torch.allclose(enc.encode_placeholder(prompts), clip.encode_texts(texts), atol=1e-5)


def test_every_clip_parameter_frozen_and_eval(clip):
    assert all(not p.requires_grad for p in clip.parameters())
    clip.train()
    assert not clip.model.training


def test_missing_checkpoint_and_unknown_model_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint file not found: .*nope.pt"):
        load_clip(ModelConfig(name="fedpgp-tiny", pretrained=str(tmp_path / "nope.pt")))
    with pytest.raises(CheckpointError, match="unknown model 'ViT-Q-99'"):
        load_clip(ModelConfig(name="ViT-Q-99", pretrained=None))


def test_image_feature_cache_is_exact_and_reused(clip, tmp_path):
    rng = np.random.default_rng(0)
    split = ImageSplit(rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8), np.arange(6))
    cache = ImageFeatureCache(clip, tmp_path)
    feats = cache.features("toy", "test", split, np.arange(6))
    direct = clip.encode_images(torch.stack([clip.preprocess(split.load(i)) for i in range(6)]))
    assert torch.allclose(feats, direct, atol=1e-6)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    again = ImageFeatureCache(clip, tmp_path).features("toy", "test", split, np.arange(6))
    assert torch.equal(again, feats)
    views = cache.features("toy", "train", split, np.arange(6), views=3, seed=1)
    assert views.shape == (3, 6, feats.shape[1])
    assert not torch.allclose(views[0], views[1])
