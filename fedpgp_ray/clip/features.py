"""Image features computed once and reused: in memory and on disk.

Deterministic transforms give exact features, cached once per image. With CoOp-style
augmentation (random resized crop + flip) exact caching is impossible; instead
`views` augmented views per training image are encoded once and a training step
samples one of them (data.augment_views; 0 = deterministic transform only).
Cache files are keyed by model identity, transform, dataset and split, and written
atomically, so several actors may share one cache directory.

Algorithms that look at image regions (FedOTP) also need the projected patch tokens
[n, P, D]; `ImageFeatureCache.patch_tokens` caches them the same way (stored as float16:
P times the pooled features' size). Pooled-feature algorithms never compute them.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms as T

from fedpgp_ray.clip.backbone import FrozenClip
from fedpgp_ray.data.base import ImageSplit

TOKEN_DTYPE = torch.float16  # storage dtype of cached patch tokens (consumers upcast per batch)


def augmentation(clip: FrozenClip) -> T.Compose:
    """CoOp's training augmentation (random resized crop + horizontal flip) before CLIP's normalisation."""
    size = clip.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    normalize = [t for t in clip.preprocess.transforms if isinstance(t, T.Normalize)]
    return T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), lambda im: im.convert("RGB"), T.ToTensor(), *normalize])


def cache_key(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


def _atomic_save(obj: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def encode_split(clip: FrozenClip, split: ImageSplit, indices: np.ndarray, transform,
                 batch_size: int = 256) -> torch.Tensor:
    """Normalised features [len(indices), D] of the given images under `transform`."""
    out = []
    for start in range(0, len(indices), batch_size):
        batch = torch.stack([transform(split.load(int(i))) for i in indices[start:start + batch_size]])
        out.append(clip.encode_images(batch).cpu())
    return torch.cat(out) if out else torch.zeros(0, clip.model.visual.output_dim)


def encode_split_tokens(clip: FrozenClip, split: ImageSplit, indices: np.ndarray, transform,
                        batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pooled features [n, D] and patch tokens [n, P, D] (float16) in one pass."""
    pooled, tokens = [], []
    for start in range(0, len(indices), batch_size):
        batch = torch.stack([transform(split.load(int(i))) for i in indices[start:start + batch_size]])
        p, t = clip.encode_image_tokens(batch)
        pooled.append(p.cpu())
        tokens.append(t.to(TOKEN_DTYPE).cpu())
    if not pooled:
        dim = clip.model.visual.output_dim
        return torch.zeros(0, dim), torch.zeros(0, 0, dim, dtype=TOKEN_DTYPE)
    return torch.cat(pooled), torch.cat(tokens)


class ImageFeatureCache:
    """Features of a split's images, computed on first use and kept in memory and on disk.

    directory: where cache files live (None: memory only).
    """

    def __init__(self, clip: FrozenClip, directory: str | Path | None, batch_size: int = 256) -> None:
        self.clip = clip
        self.directory = Path(directory) if directory else None
        self.batch_size = batch_size
        self._memory: dict[str, torch.Tensor] = {}

    def features(self, dataset_name: str, split_name: str, split: ImageSplit, indices: np.ndarray,
                 views: int = 0, seed: int = 0) -> torch.Tensor:
        """[n, D] for views == 0 (deterministic transform), else [views, n, D] augmented views.

        Only `indices` are encoded (few-shot training uses a fraction of a split); the key
        includes them so different shards never collide.
        """
        key, path = self._key("pooled", dataset_name, split_name, indices, views, seed)
        feats = self._load(key, path)
        if feats is None:
            tf = self._transform(views)
            if views == 0:
                feats = encode_split(self.clip, split, indices, tf, self.batch_size)
            else:
                # The augmentation draws from torch's global RNG: seed it so views are reproducible.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    feats = torch.stack([encode_split(self.clip, split, indices, tf, self.batch_size)
                                         for _ in range(views)])
            self._store(key, path, feats)
        return feats

    def patch_tokens(self, dataset_name: str, split_name: str, split: ImageSplit, indices: np.ndarray,
                     views: int = 0, seed: int = 0) -> torch.Tensor:
        """Projected, normalised patch tokens [n, P, D] (views == 0) or [views, n, P, D], float16.

        Same images, transform and seeded views as `features`; the pooled features of the same
        pass are cached too (they equal `features`), so asking for both encodes once.
        """
        key, path = self._key("patch_tokens", dataset_name, split_name, indices, views, seed)
        tokens = self._load(key, path)
        if tokens is None:
            tf = self._transform(views)
            if views == 0:
                pooled, tokens = encode_split_tokens(self.clip, split, indices, tf, self.batch_size)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    passes = [encode_split_tokens(self.clip, split, indices, tf, self.batch_size)
                              for _ in range(views)]
                pooled, tokens = torch.stack([p for p, _ in passes]), torch.stack([t for _, t in passes])
            self._store(key, path, tokens)
            pooled_key, pooled_path = self._key("pooled", dataset_name, split_name, indices, views, seed)
            if self._load(pooled_key, pooled_path) is None:
                self._store(pooled_key, pooled_path, pooled)
        return tokens

    def _transform(self, views: int):
        return self.clip.preprocess if views == 0 else augmentation(self.clip)

    def _key(self, kind: str, dataset_name: str, split_name: str, indices: np.ndarray, views: int,
             seed: int) -> tuple[str, Path | None]:
        idx_hash = hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]
        parts = [self.clip.identity, repr(self._transform(views)), dataset_name, split_name, idx_hash, str(views),
                 str(seed)]
        if kind != "pooled":  # pooled keys keep their original form: existing caches stay valid
            parts.append(kind)
        key = cache_key(*parts)
        return key, (self.directory / f"{key}.pt" if self.directory else None)

    def _load(self, key: str, path: Path | None) -> torch.Tensor | None:
        if key not in self._memory and path is not None and path.is_file():
            self._memory[key] = torch.load(path, weights_only=True)
        return self._memory.get(key)

    def _store(self, key: str, path: Path | None, value: torch.Tensor) -> None:
        if path is not None:
            _atomic_save(value, path)
        self._memory[key] = value
