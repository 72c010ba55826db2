"""Every fast path equals the naive path: the full 77-token text pass, images encoded per use.

The naive path here is CoOp's text encoder: the context spliced into all 77 token positions of
every class, open_clip's full transformer, the EOT token pooled. The fast paths are the truncated
pass (stop at the longest EOT) and the shared-prefix pass ([SOS]+ctx once per layer, per-class
suffixes attending to its cached keys/values). Features and gradients must agree within 1e-5.
"""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock

from fedpgp_ray.algorithms import FrozenEncoders, build_algorithm
from fedpgp_ray.clip.backbone import FrozenClip, PromptTextEncoder, load_clip
from fedpgp_ray.clip.features import ImageFeatureCache
from fedpgp_ray.config import AlgorithmConfig, ModelConfig
from fedpgp_ray.data.base import ImageSplit

CLASS_LISTS = {
    "mixed": ["red circle", "blue striped star", "a very long green checkered crescent name", "x"],
    "single": ["yellow dotted heart"],
    "many": [f"class {i} " + "word " * (i % 5) for i in range(12)],
}
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one torch thread is fastest, and immune to spinning threads on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(ModelConfig(name="fedpgp-tiny", pretrained=None), "cpu")


def naive_features(clip: FrozenClip, ctx: torch.Tensor, classnames: list[str]) -> torch.Tensor:
    """All 77 positions of every class through open_clip's own transformer (ctx: [n_ctx, w] or [n_cls, n_ctx, w])."""
    model = clip.model
    n_ctx = ctx.shape[-2]
    tokens = clip.tokenizer([" ".join(["X"] * n_ctx) + " " + c + "." for c in classnames])
    emb = model.token_embedding(tokens)
    ctx = ctx.unsqueeze(0).expand(len(classnames), -1, -1) if ctx.dim() == 2 else ctx
    x = torch.cat([emb[:, :1], ctx, emb[:, 1 + n_ctx:]], dim=1)
    x = model.transformer(x + model.positional_embedding, attn_mask=model.attn_mask)
    x = model.ln_final(x)[torch.arange(len(classnames)), tokens.argmax(-1)] @ model.text_projection
    return F.normalize(x, dim=-1)


def features_and_grad(fn, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ctx = ctx.detach().clone().requires_grad_(True)
    feats = fn(ctx)
    weights = torch.linspace(-1.0, 1.0, feats.numel()).reshape(feats.shape)  # a loss touching every feature
    (feats * weights).sum().backward()
    return feats.detach(), ctx.grad


@pytest.mark.parametrize("n_ctx", [1, 4, 16])
@pytest.mark.parametrize("classes", sorted(CLASS_LISTS))
@pytest.mark.parametrize("shared_prefix", [True, False], ids=["shared-prefix", "truncated"])
def test_fast_path_features_and_gradients_equal_full_pass(clip, n_ctx, classes, shared_prefix):
    names = CLASS_LISTS[classes]
    enc = PromptTextEncoder(clip, n_ctx, shared_prefix=shared_prefix)
    assert enc.supports_shared_prefix
    prompts = enc.prompts(names)
    assert prompts.length < 77
    ctx = torch.randn(n_ctx, enc.width, generator=torch.Generator().manual_seed(n_ctx)) * 0.02
    fast, fast_grad = features_and_grad(lambda c: enc.encode(c, prompts), ctx)
    slow, slow_grad = features_and_grad(lambda c: naive_features(clip, c, names), ctx)
    assert (fast - slow).abs().max() < ATOL
    assert slow_grad.abs().max() > 0
    assert (fast_grad - slow_grad).abs().max() < ATOL * max(1.0, float(slow_grad.abs().max()))


def test_paths_are_taken_as_configured(clip, monkeypatch):
    """The shared-prefix pass is what runs by default; the truncated pass when it is switched off."""
    enc = PromptTextEncoder(clip, 4)
    prompts = enc.prompts(CLASS_LISTS["mixed"])
    calls = []
    monkeypatch.setattr(enc, "_encode_embeddings", lambda x, p: calls.append("plain") or torch.zeros(1))
    enc.encode(torch.zeros(4, enc.width), prompts)
    assert calls == []
    enc.shared_prefix = False
    enc.encode(torch.zeros(4, enc.width), prompts)
    assert calls == ["plain"]


@pytest.mark.parametrize("classes", ["mixed", "single"])
def test_batched_contexts_equal_separate_passes(clip, classes):
    """encode_many (FedPGP's sigma and sigma + U V in one pass) = one full 77-token pass per context."""
    names = CLASS_LISTS[classes]
    enc = PromptTextEncoder(clip, 6)
    prompts = enc.prompts(names)
    g = torch.Generator().manual_seed(7)
    ctxs = [(torch.randn(6, enc.width, generator=g) * 0.02).requires_grad_(True) for _ in range(3)]
    passes = []
    original = enc._encode_shared_prefix
    enc._encode_shared_prefix = lambda c, p: passes.append(c.shape) or original(c, p)
    fast = enc.encode_many(ctxs, prompts)
    assert passes == [torch.Size([3, 6, enc.width])]  # one batched pass
    weights = torch.linspace(-1.0, 1.0, len(names) * fast[0].shape[-1]).reshape(fast[0].shape)
    fast_grads = torch.autograd.grad(sum((f * weights * (i + 1)).sum() for i, f in enumerate(fast)), ctxs)
    for i, ctx in enumerate(ctxs):
        slow = naive_features(clip, ctx, names)
        slow_grad, = torch.autograd.grad((slow * weights * (i + 1)).sum(), ctx)
        assert (fast[i] - slow).abs().max() < ATOL
        assert (fast_grads[i] - slow_grad).abs().max() < ATOL * max(1.0, float(slow_grad.abs().max()))


def test_per_class_context_and_placeholder(clip):
    """A per-class context takes the plain pass; identical rows without gradient (f0's "X" tokens) share."""
    names = CLASS_LISTS["mixed"]
    enc = PromptTextEncoder(clip, 8)
    prompts = enc.prompts(names)
    per_class = torch.randn(len(names), 8, enc.width) * 0.02
    fast, fast_grad = features_and_grad(lambda c: enc.encode(c, prompts), per_class)
    slow, slow_grad = features_and_grad(lambda c: naive_features(clip, c, names), per_class)
    assert (fast - slow).abs().max() < ATOL and (fast_grad - slow_grad).abs().max() < ATOL
    texts = [" ".join(["X"] * 8) + " " + c + "." for c in names]
    assert (enc.encode_placeholder(prompts) - clip.encode_texts(texts)).abs().max() < ATOL


def test_f0_computed_once_per_class_list(clip, monkeypatch):
    encoders = FrozenEncoders(clip, 4)
    calls = []
    original = encoders.text.encode_placeholder
    monkeypatch.setattr(encoders.text, "encode_placeholder", lambda p: calls.append(1) or original(p))
    first = encoders.placeholder_features(["red circle", "blue star"])
    again = encoders.placeholder_features(["red circle", "blue star"])
    assert again is first and len(calls) == 1
    encoders.placeholder_features(["blue star", "red circle"])
    assert len(calls) == 2


def test_fedpgp_loss_gradients_equal_naive(clip):
    """The whole FedPGP loss (CE on sigma+UV, contrastive with sigma and f0) on the fast paths vs 77 tokens."""
    names = CLASS_LISTS["mixed"]
    alg = build_algorithm(AlgorithmConfig(n_ctx=16))
    enc = FrozenEncoders(clip, 16)
    g = torch.Generator().manual_seed(3)
    init = {**alg.init_global(enc.width, g), **alg.init_personal(enc.width, g)}
    images = F.normalize(torch.randn(6, clip.model.visual.output_dim, generator=g), dim=-1)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])

    def grads(loss_fn):
        params = {k: v.clone().requires_grad_(True) for k, v in init.items()}
        loss = loss_fn(params)
        loss.backward()
        return float(loss.detach()), {k: p.grad for k, p in params.items()}

    def naive_loss(p):
        fp = naive_features(clip, p["sigma"] + p["U"] @ p["V"], names)
        fs = naive_features(clip, p["sigma"], names)
        with torch.no_grad():
            f0 = naive_features(clip, clip.model.token_embedding(clip.tokenizer(["X"]))[0, 1].expand(16, -1), names)
        ce = F.cross_entropy(clip.logit_scale * images @ fp.t(), labels)
        pos, neg = (fs * f0).sum(-1) / 0.5, (fs * fp).sum(-1) / 0.5
        return ce + 0.5 * -(pos - torch.logsumexp(torch.stack([pos, neg]), 0)).mean()

    fast_loss, fast = grads(lambda p: alg.loss(enc, p, images, labels, names, {}).total)
    slow_loss, slow = grads(naive_loss)
    assert abs(fast_loss - slow_loss) < ATOL
    for k in init:
        assert (fast[k] - slow[k]).abs().max() < ATOL * max(1.0, float(slow[k].abs().max())), k


def test_inference_mode_first_then_training(clip):
    """Evaluation (inference mode) may come first; later training on the same encoder still backpropagates."""
    enc = PromptTextEncoder(clip, 4)
    prompts = enc.prompts(CLASS_LISTS["mixed"])
    ctx = torch.randn(4, enc.width) * 0.02
    with torch.inference_mode():
        evaluated = enc.encode(ctx, prompts)
    trained, grad = features_and_grad(lambda c: enc.encode(c, prompts), ctx)
    assert (evaluated - trained).abs().max() < 1e-6 and grad.abs().max() > 0


class _CustomBlock(ResidualAttentionBlock):
    """A block type the shared-prefix path does not know (its forward is not open_clip's)."""

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        return super().forward(q_x, k_x, v_x, attn_mask)


def test_unsupported_block_falls_back_to_truncated_pass(clip):
    model = open_clip.create_model("fedpgp-tiny", pretrained=None)
    for block in model.transformer.resblocks:
        block.__class__ = _CustomBlock
    other = FrozenClip(model, clip.tokenizer, clip.preprocess, "custom", torch.device("cpu"))
    enc = PromptTextEncoder(other, 4)
    assert not enc.supports_shared_prefix
    names = CLASS_LISTS["mixed"]
    ctx = torch.randn(4, enc.width) * 0.02
    fast, fast_grad = features_and_grad(lambda c: enc.encode(c, enc.prompts(names)), ctx)
    slow, slow_grad = features_and_grad(lambda c: naive_features(other, c, names), ctx)
    assert (fast - slow).abs().max() < ATOL and (fast_grad - slow_grad).abs().max() < ATOL


@pytest.mark.parametrize("batch_first", [True, False])
def test_shared_prefix_with_layer_scale_and_quickgelu(batch_first):
    """Other standard-block options: LayerScale (ls_1/ls_2), QuickGELU, sequence-first transformer."""
    torch.manual_seed(1)
    model = open_clip.CLIP(64, {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
                           {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3,
                            "ls_init_value": 0.5}, quick_gelu=True)
    if not batch_first:
        model.transformer.batch_first = False
        for block in model.transformer.resblocks:
            block.attn.batch_first = False
    assert isinstance(model.transformer.resblocks[0].ls_1, open_clip.transformer.LayerScale)
    tiny = FrozenClip(model, open_clip.get_tokenizer("fedpgp-tiny"), None, "ls-test", torch.device("cpu"))
    enc = PromptTextEncoder(tiny, 6)
    assert enc.supports_shared_prefix
    names = CLASS_LISTS["mixed"]
    ctx = torch.randn(6, enc.width) * 0.02
    fast, fast_grad = features_and_grad(lambda c: enc.encode(c, enc.prompts(names)), ctx)
    slow, slow_grad = features_and_grad(lambda c: naive_features(tiny, c, names), ctx)
    assert (fast - slow).abs().max() < ATOL and (fast_grad - slow_grad).abs().max() < ATOL


def test_image_feature_cache_reused_from_disk(clip, tmp_path, monkeypatch):
    """Features are encoded once, equal direct encoding, and a new cache on the same directory reads them."""
    rng = np.random.default_rng(0)
    split = ImageSplit(rng.integers(0, 255, (10, 32, 32, 3), dtype=np.uint8), np.arange(10) % 3)
    encoded = []
    original = clip.encode_images
    monkeypatch.setattr(clip, "encode_images", lambda x: encoded.append(len(x)) or original(x))
    idx = np.arange(2, 9)
    feats = ImageFeatureCache(clip, tmp_path, batch_size=4).features("toy", "train", split, idx)
    assert sum(encoded) == len(idx)
    with torch.no_grad():
        direct = original(torch.stack([clip.preprocess(split.load(int(i))) for i in idx]))
    assert (feats - direct).abs().max() < ATOL
    # a fresh cache object (another run, another actor) on the same directory: read from disk, not encoded
    again = ImageFeatureCache(clip, tmp_path).features("toy", "train", split, idx)
    assert torch.equal(again, feats) and sum(encoded) == len(idx)
    # another index set, transform (augmented views) or model identity is another key: encoded anew
    ImageFeatureCache(clip, tmp_path).features("toy", "train", split, idx[:3])
    views = ImageFeatureCache(clip, tmp_path).features("toy", "train", split, idx, views=2, seed=0)
    assert views.shape == (2, len(idx), feats.shape[1]) and not torch.equal(views[0], views[1])
    renamed = FrozenClip(clip.model, clip.tokenizer, clip.preprocess, clip.identity + "-other", clip.device)
    monkeypatch.setattr(renamed, "encode_images", lambda x: encoded.append(len(x)) or original(x))
    ImageFeatureCache(renamed, tmp_path).features("toy", "train", split, idx)
    assert sum(encoded) == len(idx) + 3 + 2 * len(idx) + len(idx)
    assert len(list(tmp_path.glob("*.pt"))) == 4
