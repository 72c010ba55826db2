"""Frozen CLIP from open_clip, loaded by one factory, with a CoOp-style prompt text encoder.

`load_clip(model_cfg)` is the only way the project builds a backbone. It accepts
an open_clip name with a pretrained tag (`ViT-B-16` + `openai`), an open_clip name
with a local checkpoint file, or a project config (`fedpgp-tiny`) with the
checkpoint shipped in the package (`fedpgp-world`) or none (random weights).
"""
from __future__ import annotations

import hashlib
import json
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from fedpgp_ray.config import ModelConfig

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# Project checkpoints shipped in the package: (model name, tag) -> (file, sha256).
SHIPPED_WEIGHTS_FILE = WEIGHTS_DIR / "shipped.json"


class CheckpointError(ValueError):
    """A pretrained tag or checkpoint file is missing, corrupt or does not fit the model."""


def register_project_models() -> list[str]:
    """Register the project's own open_clip configs (e.g. `fedpgp-tiny`); idempotent."""
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def shipped_weights() -> dict[str, dict[str, str]]:
    """{"<model>/<tag>": {"file": ..., "sha256": ...}} for checkpoints in the package."""
    if not SHIPPED_WEIGHTS_FILE.is_file():
        return {}
    return json.loads(SHIPPED_WEIGHTS_FILE.read_text())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_pretrained(name: str, pretrained: str | None) -> str | None:
    """Map a shipped tag to its verified file; check local paths; pass other tags through."""
    if pretrained is None:
        return None
    entry = shipped_weights().get(f"{name}/{pretrained}")
    if entry is not None:
        path = WEIGHTS_DIR / entry["file"]
        if not path.is_file():
            raise CheckpointError(f"shipped checkpoint {path} is missing: reinstall the package or "
                                  f"rebuild it with `fedpgp-ray pretrain --out {path} --force`")
        if sha256_of(path) != entry["sha256"]:
            raise CheckpointError(f"shipped checkpoint {path} fails its sha256 check: reinstall the package "
                                  f"or rebuild it with `fedpgp-ray pretrain --out {path} --force`")
        return str(path)
    looks_like_path = any(s in pretrained for s in ("/", "\\")) or pretrained.endswith(
        (".pt", ".pth", ".bin", ".safetensors")) or Path(pretrained).expanduser().is_file()
    if looks_like_path:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise CheckpointError(f"checkpoint file not found: {path.absolute()} (model.pretrained must be an "
                                  f"existing file, an open_clip tag such as 'openai', or null)")
        return str(path.resolve())
    tags = open_clip.list_pretrained_tags_by_model(name) if name in open_clip.list_models() else []
    if pretrained not in tags:
        shipped = sorted(k for k in shipped_weights() if k.startswith(name + "/"))
        known = (f"open_clip knows {', '.join(tags)}" if tags else
                 f"open_clip has no tags for it; the package ships {', '.join(shipped) or 'none'} "
                 f"(project checkpoints are built by `fedpgp-ray pretrain`)")
        raise CheckpointError(f"unknown pretrained tag '{pretrained}' for model '{name}' and no file "
                              f"{Path(pretrained).absolute()}: {known}; set model.pretrained to a tag, "
                              f"a checkpoint file or null")
    return pretrained


def _is_torchscript(path: Path) -> bool:
    """OpenAI's original CLIP files (e.g. ~/.cache/clip/ViT-B-16.pt) are TorchScript archives."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.split("/", 1)[-1].startswith("code/") for n in archive.namelist())


class FrozenClip(nn.Module):
    """A CLIP model with every parameter frozen, in eval mode, on one device.

    identity: a string naming the weights exactly (used in feature-cache keys).
    preprocess: the deterministic evaluation transform (PIL -> tensor).
    """

    def __init__(self, model: nn.Module, tokenizer, preprocess, identity: str, device: torch.device,
                 precision: str = "fp32") -> None:
        super().__init__()
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.identity = identity
        self.device = device
        self.precision = precision
        self.logit_scale = float(self.model.logit_scale.exp())

    def train(self, mode: bool = True) -> "FrozenClip":
        return super().train(False)  # frozen: never leaves eval mode

    @property
    def autocast_enabled(self) -> bool:
        """precision 'amp': bf16 autocast, on CUDA and on CPU alike (so the path runs without a GPU)."""
        return self.precision == "amp"

    def autocast(self):
        """bf16 autocast when precision is 'amp'; a no-op otherwise."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast_enabled)

    def weights_digest(self) -> str:
        """sha256 of the loaded weights (every parameter and buffer, by name): computed once, used in
        feature-cache keys, so features never outlive the weights they came from."""
        if getattr(self, "_weights_digest", None) is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                t = tensor.detach().cpu().contiguous()
                digest.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._weights_digest = digest.hexdigest()
        return self._weights_digest

    @torch.no_grad()  # not inference_mode: cached features feed autograd graphs later
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features [n, D] (fp32)."""
        with self.autocast():
            feats = self.model.encode_image(images.to(self.device))
        return F.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features [n, D] and patch tokens [n, P, D], both projected and L2-normalised (fp32).

        One forward pass of the image tower with open_clip's `output_tokens`; the pooled features
        are exactly `encode_images`'. Patch tokens are the last layer's tokens after the tower's
        final LayerNorm, mapped by the same projection as the class token (P = grid cells, the
        class token excluded). Needs a ViT image tower with class-token pooling (CLIP's).
        """
        visual = self.model.visual
        supported = (getattr(visual, "pool_type", None) == "tok" and getattr(visual, "attn_pool", None) is None
                     and not getattr(visual, "final_ln_after_pool", False) and getattr(visual, "proj", None) is not None)
        if not supported:
            raise ValueError(f"patch tokens need a ViT image tower with class-token pooling and a projection; "
                             f"{self.identity} has {type(visual).__name__}: use a ViT model (e.g. ViT-B-16)")
        previous = visual.output_tokens
        visual.output_tokens = True
        try:
            with self.autocast():
                pooled, tokens = visual(images.to(self.device))
        finally:
            visual.output_tokens = previous
        tokens = tokens.float() @ visual.proj.float()
        return F.normalize(pooled.float(), dim=-1), F.normalize(tokens, dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised features of plain texts (zero-shot prompts)."""
        tokens = self.tokenizer(texts).to(self.device)
        with self.autocast():
            feats = self.model.encode_text(tokens)
        return F.normalize(feats.float(), dim=-1)


def select_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA device is visible: set model.device: auto or cpu")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def load_clip(cfg: ModelConfig, device: torch.device | str | None = None) -> FrozenClip:
    """The single factory for the frozen backbone (see module docstring)."""
    register_project_models()
    if cfg.name not in open_clip.list_models():
        raise CheckpointError(f"unknown model '{cfg.name}': use an open_clip name such as 'ViT-B-16' "
                              f"or a project model ({', '.join(register_project_models())})")
    weights = resolve_pretrained(cfg.name, cfg.pretrained)
    is_file = bool(weights) and Path(weights).is_file()
    if is_file and _is_torchscript(Path(weights)):
        raise CheckpointError(f"checkpoint {weights} is a TorchScript archive (OpenAI's original CLIP file), "
                              f"which is not loaded as weights: use model.pretrained: openai, or convert it once "
                              f"to a state_dict and use model.name: {cfg.name.removesuffix('-quickgelu')}-quickgelu "
                              f"(see docs/DATASETS.md, 'Backbone')")
    # An open_clip tag records the activation its weights were trained with (OpenAI's: QuickGELU).
    tag_cfg = open_clip.get_pretrained_cfg(cfg.name, weights) if weights and not is_file else {}
    device = torch.device(device) if device is not None else select_device(cfg.device)
    try:
        # Random weights (pretrained null) must be identical in every process (actors, resume).
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")  # QuickGELU warnings: the tag decides (force_quick_gelu)
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(
                cfg.name, pretrained=weights, device="cpu", weights_only=True,
                force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)))
    except Exception as err:  # torch.load / load_state_dict / downloads raise many types
        detail = " ".join(str(err).split())[:400] or type(err).__name__
        if isinstance(err, pickle.UnpicklingError):  # torch's weights_only refusal: long and misleading
            detail = "not a plain torch state_dict file; torch.load(weights_only=True) refused it"
        if is_file:
            raise CheckpointError(f"checkpoint {weights} could not be loaded into model '{cfg.name}' "
                                  f"({type(err).__name__}: {detail}): it must be a state_dict saved from the "
                                  f"same architecture; set model.name to the architecture it was saved from"
                                  ) from None
        if weights:
            raise CheckpointError(f"pretrained weights '{weights}' for model '{cfg.name}' are not available "
                                  f"({detail}): open_clip looked in its Hugging Face cache and could not "
                                  f"download them; run once with internet access, or set model.pretrained "
                                  f"to a local checkpoint file") from None
        raise
    identity = cfg.name + "/" + (f"sha256:{sha256_of(Path(weights))[:16]}" if weights and Path(weights).is_file()
                                 else str(weights))
    return FrozenClip(model, open_clip.get_tokenizer(cfg.name), preprocess, identity, device, cfg.precision)


@dataclass
class ClassPrompts:
    """Tokenised "X X ... X {classname}." prompts for one class list, truncated at the last EOT.

    prefix: frozen [SOS] embedding [n_cls, 1, width]; suffix: frozen class-name, '.', [EOT]
    embeddings [n_cls, T - 1 - n_ctx, width]; placeholder: frozen "X" embeddings [n_cls, n_ctx, width];
    eot: index of each row's EOT token; length T = max(eot) + 1. The text transformer is
    causal, so tokens after T cannot change any EOT feature.
    """
    classnames: list[str]
    prefix: torch.Tensor
    placeholder: torch.Tensor
    suffix: torch.Tensor
    eot: torch.Tensor
    length: int


class PromptTextEncoder:
    """CoOp text encoder: learnable context vectors replace the n_ctx placeholder tokens.

    Two exact fast paths (CLIP's text transformer is causal, so a token's hidden state depends
    only on the tokens before it):

    - truncation: the pass stops at the longest EOT position among the classes (`ClassPrompts.length`,
      about 25 of 77 tokens with 16 context tokens); later tokens cannot change any EOT feature.
    - shared prefix (`shared_prefix`, on by default): [SOS] ctx_1 ... ctx_L is the same for every
      class, so its hidden states are identical across classes. Each layer runs that prefix once,
      and only the class-specific suffix tokens per class, attending to the prefix's keys/values
      (a key/value cache shared by all classes) plus their own causal keys. With 50 classes and
      16 context tokens this processes 17 + 50 x ~8 tokens instead of 50 x ~25.

    The shared-prefix path supports open_clip's standard text `Transformer` of `ResidualAttentionBlock`s
    (nn.MultiheadAttention, ln_1/ln_2, mlp, ls_1/ls_2) with a causal mask; other block types, or a
    per-class context, use the plain truncated pass. Both give the same features (and gradients).
    """

    def __init__(self, clip: FrozenClip, n_ctx: int, shared_prefix: bool = True) -> None:
        self.clip = clip
        self.n_ctx = n_ctx
        model = clip.model
        pool = getattr(model, "text_pool_type", "argmax")
        if pool not in ("argmax", "eos"):
            raise ValueError(f"text pool type '{pool}' is not supported: prompt learning needs an EOT-pooled "
                             f"text tower (CLIP's 'argmax' or 'eos')")
        self._pool = pool
        self.width = model.token_embedding.weight.shape[1]
        self.shared_prefix = shared_prefix
        self.supports_shared_prefix = _supports_shared_prefix(model)
        self._masks: dict[tuple[int, int, str], torch.Tensor] = {}

    def prompts(self, classnames: list[str]) -> ClassPrompts:
        """Tokenise the class list once; the returned object is reused every step."""
        model = self.clip.model
        texts = [" ".join(["X"] * self.n_ctx) + " " + name.replace("_", " ") + "." for name in classnames]
        tokens = self.clip.tokenizer(texts).to(self.clip.device)
        if self._pool == "argmax":
            eot = tokens.argmax(dim=-1)
        else:
            eot = (tokens == model.text_eos_id).int().argmax(dim=-1)
        length = int(eot.max()) + 1
        if length >= tokens.shape[1] and bool((tokens[:, -1] != 0).any()):
            raise ValueError(f"a class name is too long for {self.n_ctx} context tokens in a context length of "
                             f"{tokens.shape[1]}: shorten the class name or lower algorithm.n_ctx")
        with torch.no_grad():
            emb = model.token_embedding(tokens[:, :length]).float()
        return ClassPrompts(list(classnames), emb[:, :1], emb[:, 1:1 + self.n_ctx], emb[:, 1 + self.n_ctx:],
                            eot, length)

    def encode(self, ctx: torch.Tensor, prompts: ClassPrompts) -> torch.Tensor:
        """Normalised EOT features [n_cls, D] for context `ctx` ([n_ctx, width] shared by all classes,
        or [n_cls, n_ctx, width] per class)."""
        n_cls = prompts.prefix.shape[0]
        shared = ctx if ctx.dim() == 2 else _common_row(ctx)
        if (shared is not None and self.shared_prefix and self.supports_shared_prefix
                and _common_row(prompts.prefix) is not None):
            return self._encode_shared_prefix(shared, prompts)
        ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1) if ctx.dim() == 2 else ctx
        x = torch.cat([prompts.prefix, ctx.to(prompts.prefix.dtype), prompts.suffix], dim=1)
        return self._encode_embeddings(x, prompts)

    def encode_many(self, contexts: list[torch.Tensor], prompts: ClassPrompts) -> list[torch.Tensor]:
        """`[encode(c, prompts) for c in contexts]` for shared contexts ([n_ctx, width] each), in one
        batched shared-prefix pass: every linear layer runs one GEMM over all contexts' tokens
        (FedPGP's sigma and sigma + U V prompts), half the kernel launches of separate passes."""
        if (len(contexts) > 1 and all(c.dim() == 2 for c in contexts) and self.shared_prefix
                and self.supports_shared_prefix and _common_row(prompts.prefix) is not None):
            return list(self._encode_shared_prefix(torch.stack(contexts), prompts).unbind(0))
        return [self.encode(c, prompts) for c in contexts]

    def encode_placeholder(self, prompts: ClassPrompts) -> torch.Tensor:
        """Features of the frozen "X X ... X {c}." prompts (FedPGP's f0)."""
        with torch.no_grad():
            return self.encode(prompts.placeholder, prompts)

    def _encode_embeddings(self, x: torch.Tensor, prompts: ClassPrompts) -> torch.Tensor:
        """The plain pass over all classes' full (truncated) token sequences."""
        model = self.clip.model
        T = prompts.length
        mask = model.attn_mask[:T, :T] if model.attn_mask is not None else None
        with self.clip.autocast():
            x = x + model.positional_embedding[:T].to(x.dtype)
            x = model.transformer(x, attn_mask=mask)
            x = x[torch.arange(x.shape[0], device=x.device), prompts.eot]
            return self._project(x)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """ln_final (per token, so applied to the EOT tokens only), projection, L2 normalisation."""
        model = self.clip.model
        x = model.ln_final(x)
        proj = model.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x.float(), dim=-1)

    def _encode_shared_prefix(self, ctx: torch.Tensor, prompts: ClassPrompts) -> torch.Tensor:
        """The shared-prefix pass: [SOS]+ctx once per layer, the class suffixes against its keys/values.

        ctx: [n_ctx, width] -> features [n_cls, D]; or G contexts [G, n_ctx, width] -> [G, n_cls, D],
        all groups' tokens in one matrix (group g's suffixes attend to group g's prefix only).
        """
        model = self.clip.model
        groups = ctx.unsqueeze(0) if ctx.dim() == 2 else ctx
        G = groups.shape[0]
        n_cls, S, width = prompts.suffix.shape
        P = 1 + groups.shape[1]
        pos = model.positional_embedding[:prompts.length]
        dtype = prompts.prefix.dtype
        with self.clip.autocast():
            sos = prompts.prefix[0].expand(G, 1, width)
            head = (torch.cat([sos, groups.to(dtype)], dim=1) + pos[:P].to(dtype)).reshape(G * P, width)
            tail = (prompts.suffix + pos[P:].to(dtype)).reshape(n_cls * S, width)                 # [n_cls*S, width]
            # all tokens in one matrix: one GEMM per linear layer ([G*P prefix rows; G*n_cls*S suffix rows])
            x = torch.cat([head, tail.repeat(G, 1)])
            mask = self._suffix_mask(P, S, x.device)
            *blocks, last = model.transformer.resblocks
            for block in blocks:
                x = _shared_prefix_block(block, x, P, n_cls, S, mask, G)
            # Last layer: only the EOT tokens' outputs are read, so only they need queries, out_proj and MLP.
            out = self._project(_eot_block(last, x, P, n_cls, S, prompts.eot - P, G))
        return out if ctx.dim() == 2 else out.reshape(G, n_cls, -1)

    def _suffix_mask(self, P: int, S: int, device: torch.device) -> torch.Tensor:
        """[S, P + S] boolean: a suffix token sees the whole prefix and the suffix tokens up to itself."""
        key = (P, S, str(device))
        if key not in self._masks:
            with torch.inference_mode(False):
                causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
                self._masks[key] = torch.cat([torch.ones(S, P, dtype=torch.bool, device=device), causal], dim=1)
        return self._masks[key]


def _common_row(x: torch.Tensor) -> torch.Tensor | None:
    """x[0] when every row of x ([n, ...], no gradient) is identical, else None."""
    if x.requires_grad or x.shape[0] == 0:
        return None
    first = x[0]
    return first if bool((x == first).all()) else None


def _supports_shared_prefix(model: nn.Module) -> bool:
    """open_clip's standard causal text Transformer of plain ResidualAttentionBlocks."""
    from open_clip.transformer import ResidualAttentionBlock, Transformer
    tower = getattr(model, "transformer", None)
    if not isinstance(tower, Transformer) or type(tower).forward is not Transformer.forward:
        return False
    for block in tower.resblocks:
        attn = getattr(block, "attn", None)
        if (type(block).forward is not ResidualAttentionBlock.forward
                or type(block).attention is not ResidualAttentionBlock.attention
                or hasattr(block, "ln_1_kv") or not isinstance(attn, nn.MultiheadAttention)
                or not attn._qkv_same_embed_dim or attn.in_proj_weight is None
                or attn.bias_k is not None or attn.add_zero_attn):
            return False
    mask = getattr(model, "attn_mask", None)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or not mask.is_floating_point():
        return False
    upper = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool((torch.isneginf(mask) == upper).all() and (mask[~upper] == 0).all())


def _per_class(t: torch.Tensor, n_cls: int) -> torch.Tensor:
    """[G, H, P, hd] prefix keys/values -> [G*n_cls, H, P, hd]: each group's prefix for each of its classes."""
    G = t.shape[0]
    return t.expand(n_cls, -1, -1, -1) if G == 1 else t.unsqueeze(1).expand(-1, n_cls, -1, -1, -1).flatten(0, 1)


def _shared_prefix_block(block: nn.Module, x: torch.Tensor, P: int, n_cls: int, S: int,
                         mask: torch.Tensor, G: int = 1) -> torch.Tensor:
    """One ResidualAttentionBlock on [G prefixes (P rows each); G x n_cls suffixes (S rows each)] tokens.

    Each prefix attends causally to itself; each suffix attends to its group's prefix keys/values
    (shared, computed once) and causally to its own tokens: exactly what every class's full
    sequence would compute, without repeating the prefix per class.
    """
    attn = block.attn
    H = attn.num_heads
    width = x.shape[-1]
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)

    def heads(t: torch.Tensor, batch: int) -> torch.Tensor:  # [batch*L, width] -> [batch, H, L, hd]
        return t.reshape(batch, -1, H, width // H).transpose(1, 2)

    GP, B = G * P, G * n_cls
    qp, kp, vp = heads(q[:GP], G), heads(k[:GP], G), heads(v[:GP], G)
    out_p = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
    ks = torch.cat([_per_class(kp, n_cls), heads(k[GP:], B)], dim=2)
    vs = torch.cat([_per_class(vp, n_cls), heads(v[GP:], B)], dim=2)
    out_s = F.scaled_dot_product_attention(heads(q[GP:], B), ks, vs, attn_mask=mask)
    out = torch.cat([out_p.transpose(1, 2).reshape(GP, width), out_s.transpose(1, 2).reshape(B * S, width)])
    x = x + block.ls_1(F.linear(out, attn.out_proj.weight, attn.out_proj.bias))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _eot_block(block: nn.Module, x: torch.Tensor, P: int, n_cls: int, S: int, eot: torch.Tensor,
               G: int = 1) -> torch.Tensor:
    """The last block for the EOT tokens only ([G*n_cls, width]); eot: each class's EOT index within its suffix.

    Keys/values come from every token (the group's prefix + the class's suffix up to its EOT), queries,
    out_proj and the MLP only from the EOT token: the other tokens' last-layer outputs are never read.
    """
    attn = block.attn
    H = attn.num_heads
    width = x.shape[-1]
    hd = width // H
    GP, B = G * P, G * n_cls
    a = block.ln_1(x)
    w, b = attn.in_proj_weight, attn.in_proj_bias
    k, v = F.linear(a, w[width:], None if b is None else b[width:]).chunk(2, dim=-1)
    rows = GP + torch.arange(B, device=x.device) * S + eot.repeat(G)
    q = F.linear(a[rows], w[:width], None if b is None else b[:width])                      # [B, width]
    kp, vp = (_per_class(t[:GP].reshape(G, P, H, hd).transpose(1, 2), n_cls) for t in (k, v))
    ks, vs = (t[GP:].reshape(B, S, H, hd).transpose(1, 2) for t in (k, v))
    visible = torch.arange(S, device=x.device) <= eot.repeat(G).unsqueeze(1)                # [B, S]
    mask = torch.cat([visible.new_ones(B, P), visible], dim=1)[:, None, None, :]             # [B, 1, 1, P+S]
    out = F.scaled_dot_product_attention(q.reshape(B, 1, H, hd).transpose(1, 2), torch.cat([kp, ks], dim=2),
                                         torch.cat([vp, vs], dim=2), attn_mask=mask)
    h = x[rows] + block.ls_1(F.linear(out.reshape(B, width), attn.out_proj.weight, attn.out_proj.bias))
    return h + block.ls_2(block.mlp(block.ln_2(h)))
