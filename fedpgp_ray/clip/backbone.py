"""Frozen CLIP from open_clip, loaded by one factory, with a CoOp-style prompt text encoder.

`load_clip(model_cfg)` is the only way the project builds a backbone. It accepts
an open_clip name with a pretrained tag (`ViT-B-16` + `openai`), an open_clip name
with a local checkpoint file, or a project config (`fedpgp-tiny`) with the
checkpoint shipped in the package (`fedpgp-world`) or none (random weights).
"""
from __future__ import annotations

import hashlib
import json
import warnings
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
                                  f"rebuild it with `python -m fedpgp_ray.pretrain`")
        if sha256_of(path) != entry["sha256"]:
            raise CheckpointError(f"shipped checkpoint {path} fails its sha256 check: reinstall the package "
                                  f"or rebuild it with `python -m fedpgp_ray.pretrain`")
        return str(path)
    looks_like_path = any(s in pretrained for s in ("/", "\\")) or pretrained.endswith(
        (".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_path:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise CheckpointError(f"checkpoint file not found: {path} (model.pretrained must be an existing "
                                  f"file, an open_clip tag such as 'openai', or null)")
        return str(path.resolve())
    tags = open_clip.list_pretrained_tags_by_model(name) if name in open_clip.list_models() else []
    if tags and pretrained not in tags:
        raise CheckpointError(f"unknown pretrained tag '{pretrained}' for model '{name}': "
                              f"open_clip knows {', '.join(tags)}")
    return pretrained


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

    def autocast(self):
        """bf16 autocast on CUDA when precision is 'amp'; a no-op otherwise."""
        enabled = self.precision == "amp" and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    @torch.no_grad()  # not inference_mode: cached features feed autograd graphs later
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features [n, D] (fp32)."""
        with self.autocast():
            feats = self.model.encode_image(images.to(self.device))
        return F.normalize(feats.float(), dim=-1)

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
    device = torch.device(device) if device is not None else select_device(cfg.device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # open_clip warns about QuickGELU tags; the config decides
            model, _, preprocess = open_clip.create_model_and_transforms(
                cfg.name, pretrained=weights, device="cpu", weights_only=True)
    except RuntimeError as err:
        if weights and Path(weights).is_file():
            raise CheckpointError(f"checkpoint {weights} does not fit model '{cfg.name}': "
                                  f"{str(err).splitlines()[0]}") from None
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
    """CoOp text encoder: learnable context vectors replace the n_ctx placeholder tokens."""

    def __init__(self, clip: FrozenClip, n_ctx: int) -> None:
        self.clip = clip
        self.n_ctx = n_ctx
        model = clip.model
        pool = getattr(model, "text_pool_type", "argmax")
        if pool not in ("argmax", "eos"):
            raise ValueError(f"text pool type '{pool}' is not supported: prompt learning needs an EOT-pooled "
                             f"text tower (CLIP's 'argmax' or 'eos')")
        self._pool = pool
        self.width = model.token_embedding.weight.shape[1]

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
        """Normalised EOT features [n_cls, D] for context `ctx` ([n_ctx, width] shared by all classes)."""
        n_cls = prompts.prefix.shape[0]
        ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1) if ctx.dim() == 2 else ctx
        x = torch.cat([prompts.prefix, ctx.to(prompts.prefix.dtype), prompts.suffix], dim=1)
        return self._encode_embeddings(x, prompts)

    def encode_placeholder(self, prompts: ClassPrompts) -> torch.Tensor:
        """Features of the frozen "X X ... X {c}." prompts (FedPGP's f0)."""
        with torch.no_grad():
            return self.encode(prompts.placeholder, prompts)

    def _encode_embeddings(self, x: torch.Tensor, prompts: ClassPrompts) -> torch.Tensor:
        model = self.clip.model
        T = prompts.length
        with self.clip.autocast():
            x = x + model.positional_embedding[:T].to(x.dtype)
            x = model.transformer(x, attn_mask=model.attn_mask[:T, :T])
            x = model.ln_final(x)
            x = x[torch.arange(x.shape[0], device=x.device), prompts.eot]
            proj = model.text_projection
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x.float(), dim=-1)
