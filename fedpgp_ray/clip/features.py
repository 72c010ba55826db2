"""Image features computed once and reused: in memory and on disk.

Deterministic transforms give exact features, cached once per image. With CoOp-style
augmentation (random resized crop + flip) exact caching is impossible; instead
`views` augmented views per training image are encoded once and a training step
samples one of them (data.augment_views; 0 = deterministic transform only).
Cache files are keyed by model identity, transform, dataset and split, and written
atomically, so several actors may share one cache directory.
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
        tf = self.clip.preprocess if views == 0 else augmentation(self.clip)
        idx_hash = hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]
        key = cache_key(self.clip.identity, repr(tf), dataset_name, split_name, idx_hash, str(views), str(seed))
        if key in self._memory:
            return self._memory[key]
        path = self.directory / f"{key}.pt" if self.directory else None
        if path is not None and path.is_file():
            feats = torch.load(path, weights_only=True)
        else:
            if views == 0:
                feats = encode_split(self.clip, split, indices, tf, self.batch_size)
            else:
                # The augmentation draws from torch's global RNG: seed it so views are reproducible.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    feats = torch.stack([encode_split(self.clip, split, indices, tf, self.batch_size)
                                         for _ in range(views)])
            if path is not None:
                _atomic_save(feats, path)
        self._memory[key] = feats
        return feats
