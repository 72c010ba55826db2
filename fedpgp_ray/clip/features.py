"""Image features computed once per node and reused by every run and every actor: in memory and on disk.

Deterministic transforms give exact features, cached once per image. With CoOp-style
augmentation (random resized crop + flip) exact caching is impossible; instead `views`
augmented views per training image are encoded once and a training step samples one of them
(data.augment_views; 0 = deterministic transform only). View v of image i is drawn from a
stream seeded by (seed, i) alone, so it does not depend on which process encodes the image or
which other images share its cache entry.

A cache entry holds the features of one list of images (a client's training shard, a fixed
range of the test set). Its key is the sha256 of `key_fields`: the format version, the backbone
(model name, weights tag or file hash, and a hash of the loaded weights), the precision and
device type, a stable description of the transform (class names and parameters, never the
`repr` of a callable), the view count and seed, the feature kind, and the images' identity
(path, size and mtime of each file, or with `content_hash` the sha256 of its bytes; the pixel
bytes for in-memory datasets). Anything that changes a feature changes the key.

Entries live in `default_cache_dir()` (node-local; $FEDPGP_CACHE_DIR), as `<key>.pt` (the
tensor) and `<key>.json` (what it holds, for `fedpgp-ray cache`). A file lock per entry lets
one process encode it while the others wait and then read it. An unreadable, truncated or
foreign file is logged once and rebuilt. Each entry also stores the sha256 of its tensor (dtype,
shape and bytes), checked on every read: an entry whose tensor was replaced under its own key is
rebuilt too, never used (the check costs a few milliseconds per MiB; benchmarks/feature_cache.py).

Algorithms that look at image regions (FedOTP) also need the projected patch tokens [n, P, D];
`ImageFeatureCache.patch_tokens` caches them the same way (stored as float16: P times the pooled
features' size). Pooled-feature algorithms never compute them.
"""
from __future__ import annotations

import enum
import hashlib
import inspect
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from filelock import FileLock, Timeout
from torchvision import transforms as T

from fedpgp_ray.clip.backbone import FrozenClip
from fedpgp_ray.data.base import ImageSplit
from fedpgp_ray.progress import Progress

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bump when the stored layout or the encoding procedure changes (3: tensor checksum)
CACHE_ENV = "FEDPGP_CACHE_DIR"
TOKEN_DTYPE = torch.float16  # storage dtype of cached patch tokens (consumers upcast per batch)
THREADS_ENV = "FEDPGP_ENCODING_THREADS"  # torch threads while encoding on CPU (default 1; 0 = the process's)
LOAD_WORKERS = 8  # threads decoding image files (PIL releases the GIL while decoding)

_warned: set[str] = set()  # cache files and directories already reported (each logged once)


def default_cache_dir() -> Path:
    """The node-local feature cache: $FEDPGP_CACHE_DIR, else ~/.cache/fedpgp-ray/features."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedpgp-ray" / "features"


def _to_rgb(image):
    return image.convert("RGB")


def augmentation(clip: FrozenClip) -> T.Compose:
    """CoOp's training augmentation (random resized crop + horizontal flip) before CLIP's normalisation."""
    size = clip.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    normalize = [t for t in clip.preprocess.transforms if isinstance(t, T.Normalize)]
    return T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), _to_rgb, T.ToTensor(), *normalize])


def _plain(value: Any) -> Any:
    """A JSON-ready, process-independent form of a transform parameter."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if callable(value):
        return describe_transform(value)
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def describe_transform(transform: Any) -> Any:
    """A stable description of an image transform: the same in every process for the same transform.

    Compose -> list of its steps; a transform object -> its class and public attributes; a named
    function -> its qualified name; a lambda or closure -> its qualified name plus a hash of its code.
    """
    if isinstance(transform, T.Compose):
        return [describe_transform(t) for t in transform.transforms]
    if inspect.isfunction(transform) or inspect.ismethod(transform) or inspect.isbuiltin(transform):
        name = f"{transform.__module__}.{transform.__qualname__}"
        code = getattr(transform, "__code__", None)
        if code is None or ("<lambda>" not in name and "<locals>" not in name):
            return name
        body = hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:16]
        return {"function": name, "code": body}
    params = {k: _plain(v) for k, v in sorted(vars(transform).items()) if not k.startswith("_") and k != "training"}
    return {"type": f"{type(transform).__module__}.{type(transform).__qualname__}", **params}


def encoding_thread_count() -> int | None:
    """Torch threads used to encode on CPU: $FEDPGP_ENCODING_THREADS, default 1 (0: leave the process's)."""
    raw = os.environ.get(THREADS_ENV, "1").strip()
    if not raw.isdigit():
        raise ValueError(f"${THREADS_ENV}={raw!r} must be a whole number (1 = fixed single thread, 0 = as the "
                         f"process runs)")
    return int(raw) or None


@contextmanager
def encoding_threads(device: torch.device) -> Iterator[None]:
    """Encode on CPU with a fixed torch thread count (restored after), so a cache entry's features are
    the same whichever process, with however many threads, builds it. No-op on GPUs."""
    threads = encoding_thread_count()
    if device.type != "cpu" or threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def image_fingerprint(split: ImageSplit, indices: np.ndarray, content_hash: bool = False) -> str:
    """Identity of the images `split[indices]`, in order: pixel bytes (in-memory datasets), else each
    file's path, size and mtime, or with `content_hash` the sha256 of each file's bytes."""
    digest = hashlib.sha256()
    if isinstance(split.images, np.ndarray):
        digest.update(np.ascontiguousarray(split.images[indices]).data)
        digest.update(repr(split.images.shape[1:]).encode())
        return digest.hexdigest()
    for i in indices:
        path = split.images[int(i)]
        if content_hash:
            with open(path, "rb") as fh:
                digest.update(hashlib.sha256(fh.read()).digest())
        else:
            try:
                st = os.stat(path)
                digest.update(f"{path}\x00{st.st_size}\x00{st.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{path}\x00missing\n".encode())
    return digest.hexdigest()


def _view_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


@dataclass(frozen=True)
class FeatureRequest:
    """The features of `split[indices]` (one cache entry).

    dataset / split_name: labels shown by `fedpgp-ray cache` (the key uses the images themselves).
    views: 0 = deterministic transform ([n, D]); else `views` augmented views ([views, n, D]).
    kind: "pooled" (features) or "patch_tokens" ([..., n, P, D] float16).
    """
    dataset: str
    split_name: str
    split: ImageSplit
    indices: np.ndarray
    views: int = 0
    seed: int = 0
    kind: str = "pooled"


class ImageFeatureCache:
    """Features of images, computed on first use and kept in memory and on disk (see module docstring).

    directory: where cache files live (None: memory only).
    content_hash: identify image files by the sha256 of their bytes instead of path, size and mtime.
    encoded_images: image passes through the image tower by this object (views count separately).
    """

    def __init__(self, clip: FrozenClip, directory: str | Path | None, batch_size: int = 256,
                 content_hash: bool = False) -> None:
        self.clip = clip
        self.directory = Path(directory).expanduser() if directory else None
        self.batch_size = batch_size
        self.content_hash = content_hash
        self.encoded_images = 0
        self.keys_used: list[str] = []
        self._memory: dict[str, torch.Tensor] = {}
        self._transform_cache: dict[int, tuple[Any, Any]] = {}

    # -- public ---------------------------------------------------------------------------------
    def features(self, dataset_name: str, split_name: str, split: ImageSplit, indices: np.ndarray,
                 views: int = 0, seed: int = 0) -> torch.Tensor:
        """[n, D] for views == 0 (deterministic transform), else [views, n, D] augmented views."""
        return self.fetch([FeatureRequest(dataset_name, split_name, split, np.asarray(indices), views, seed)])[0]

    def patch_tokens(self, dataset_name: str, split_name: str, split: ImageSplit, indices: np.ndarray,
                     views: int = 0, seed: int = 0) -> torch.Tensor:
        """Projected, normalised patch tokens [n, P, D] (views == 0) or [views, n, P, D], float16.

        Same images, transform and views as `features`; the pooled features of the same pass are
        cached too (they equal `features`), so asking for both encodes once.
        """
        request = FeatureRequest(dataset_name, split_name, split, np.asarray(indices), views, seed, "patch_tokens")
        return self.fetch([request])[0]

    def fetch(self, requests: list[FeatureRequest]) -> list[torch.Tensor]:
        """The tensors of several entries. Entries no other process is encoding are encoded first; then
        this process waits for (and reads) those another process was encoding, so processes sharing
        the directory split the work and each entry is encoded once."""
        out: list[torch.Tensor | None] = [None] * len(requests)
        waiting = []
        for i, request in enumerate(requests):
            out[i] = self._get(request, wait=False)
            if out[i] is None:
                waiting.append(i)
        for i in waiting:
            out[i] = self._get(requests[i], wait=True)
        return out  # type: ignore[return-value]

    def key_fields(self, request: FeatureRequest) -> dict[str, Any]:
        """Everything that changes the features of `request`; the entry's key is their sha256."""
        transform, description = self._transform(request.views)
        return {
            "format": FORMAT_VERSION,
            "backbone": self.clip.identity,
            "weights_sha256": self.clip.weights_digest(),
            "precision": self.clip.precision,
            "autocast": self.clip.autocast_enabled,
            "device_type": self.clip.device.type,
            "encoding_threads": encoding_thread_count() if self.clip.device.type == "cpu" else None,
            "transform": description,
            "views": int(request.views),
            "augmentation_seed": int(request.seed) if request.views else None,
            "kind": request.kind,
            "images": len(request.indices),
            "image_identity": "content-sha256" if self.content_hash else "path-size-mtime",
            "images_sha256": image_fingerprint(request.split, request.indices, self.content_hash),
        }

    def key(self, request: FeatureRequest) -> str:
        return _digest(self.key_fields(request))

    # -- entries ----------------------------------------------------------------------------------
    def _get(self, request: FeatureRequest, wait: bool) -> torch.Tensor | None:
        fields = self.key_fields(request)
        key = _digest(fields)
        if key not in self.keys_used:
            self.keys_used.append(key)
        if key in self._memory:
            return self._memory[key]
        if self.directory is None:
            return self._encode_and_store(request, fields)
        value = self._read(key, fields)
        if value is not None:
            return value
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # e.g. a read-only home: run on, without the disk cache
            _warn_once(str(self.directory), "feature cache: cannot use %s (%s); features are kept in memory "
                       "only: set $FEDPGP_CACHE_DIR to a writable folder", self.directory, err)
            return self._encode_and_store(request, fields)
        lock = FileLock(str(self.directory / f"{key}.lock"))
        try:
            lock.acquire(timeout=-1 if wait else 0)
        except Timeout:
            return None  # another process is encoding it: come back for it later
        except OSError as err:  # a read-only cache folder (shared, read-only mount) missing this entry
            _warn_once(str(self.directory), "feature cache: cannot write to %s (%s); entries missing there are "
                       "encoded and kept in memory only: make it writable or set $FEDPGP_CACHE_DIR to a writable "
                       "folder", self.directory, err)
            return self._encode_and_store(request, fields)
        try:
            value = self._read(key, fields)  # it may have been written while we waited
            return value if value is not None else self._encode_and_store(request, fields)
        finally:
            lock.release()

    def _read(self, key: str, fields: dict[str, Any]) -> torch.Tensor | None:
        path = self.directory / f"{key}.pt"
        if not path.is_file():
            return None
        try:
            # memory-mapped: pages are read when rows are used (a process holds its clients' rows, not the file)
            data = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
            value = data["value"] if isinstance(data, dict) and data.get("key") == key else None
            rows = None if value is None else value.shape[-3 if fields["kind"] == "patch_tokens" else -2]
            if value is None or rows != fields["images"]:
                raise ValueError("not an entry of this key")
            if data.get("sha256") != tensor_sha256(value):
                raise ValueError("its tensor does not match its checksum")
        except Exception as err:  # truncated, foreign or other-version files raise many types
            _warn_once(str(path), "feature cache: %s is unreadable or not this entry (%s: %s); rebuilding it",
                       path, type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
            return None
        self._memory[key] = value.to(TOKEN_DTYPE) if fields["kind"] == "patch_tokens" else value
        return self._memory[key]

    def _encode_and_store(self, request: FeatureRequest, fields: dict[str, Any]) -> torch.Tensor:
        pooled, tokens = self._encode(request)
        if request.kind == "patch_tokens":
            pooled_request = FeatureRequest(request.dataset, request.split_name, request.split, request.indices,
                                            request.views, request.seed, "pooled")
            pooled_fields = self.key_fields(pooled_request)
            self._store(_digest(pooled_fields), pooled_fields, pooled, request)
            return self._store(_digest(fields), fields, tokens, request)
        return self._store(_digest(fields), fields, pooled, request)

    def _store(self, key: str, fields: dict[str, Any], value: torch.Tensor, request: FeatureRequest) -> torch.Tensor:
        self._memory[key] = value
        if self.directory is None or not self.directory.is_dir():
            return value
        # Plain files, temp file + rename (not the run storage, whose errors are about the run's own files)
        tag = f"{os.getpid()}.{time.monotonic_ns()}.tmp"
        tmp_pt, tmp_json = self.directory / f"{key}.pt.{tag}", self.directory / f"{key}.json.{tag}"
        try:
            torch.save({"format": FORMAT_VERSION, "key": key, "value": value, "sha256": tensor_sha256(value)}, tmp_pt)
            os.replace(tmp_pt, self.directory / f"{key}.pt")
            about = {"key": key, "dataset": request.dataset, "split": request.split_name,
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "fields": fields}
            tmp_json.write_text(json.dumps(about, indent=1))
            os.replace(tmp_json, self.directory / f"{key}.json")
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
            # a full or read-only disk costs a re-encoding next run, never this run
            _warn_once(str(self.directory), "feature cache: cannot write to %s (%s); features are kept in "
                       "memory only", self.directory, err)
            for tmp in (tmp_pt, tmp_json):
                try:
                    tmp.unlink(missing_ok=True)
                except OSError:
                    pass
        return value

    # -- encoding ---------------------------------------------------------------------------------
    def _transform(self, views: int) -> tuple[Any, Any]:
        slot = 0 if views == 0 else 1
        if slot not in self._transform_cache:
            tf = self.clip.preprocess if views == 0 else augmentation(self.clip)
            self._transform_cache[slot] = (tf, describe_transform(tf))
        return self._transform_cache[slot]

    def _encode(self, request: FeatureRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled features ([n, D] or [views, n, D]) and, for kind patch_tokens, the float16 tokens."""
        transform, _ = self._transform(request.views)
        views = max(request.views, 1)
        indices = [int(i) for i in request.indices]
        per_batch = max(self.batch_size // views, 1)
        want_tokens = request.kind == "patch_tokens"
        pooled, tokens = [], []
        label = f"encoding {request.dataset} {request.split_name} ({len(indices)} images x {views} view(s))"
        with Progress(len(indices) * views, label) as bar, ThreadPoolExecutor(LOAD_WORKERS) as pool, \
                encoding_threads(self.clip.device), torch.random.fork_rng(devices=[]):
            for start in range(0, len(indices), per_batch):
                chunk = indices[start:start + per_batch]
                images = list(pool.map(request.split.load, chunk))
                batch = torch.stack([self._views(transform, image, index, request)
                                     for image, index in zip(images, chunk)])       # [b, views, C, H, W]
                flat = batch.flatten(0, 1)
                if want_tokens:
                    p, t = self.clip.encode_image_tokens(flat)
                    tokens.append(t.to(TOKEN_DTYPE).cpu().unflatten(0, (len(chunk), views)))
                else:
                    p = self.clip.encode_images(flat)
                pooled.append(p.cpu().unflatten(0, (len(chunk), views)))
                self.encoded_images += len(flat)
                bar.update(len(flat))
        dim = self.clip.model.visual.output_dim
        p = torch.cat(pooled) if pooled else torch.zeros(0, views, dim)                  # [n, views, D]
        p = p[:, 0] if request.views == 0 else p.transpose(0, 1).contiguous()
        if not want_tokens:
            return p, None
        t = torch.cat(tokens) if tokens else torch.zeros(0, views, 0, dim, dtype=TOKEN_DTYPE)
        t = t[:, 0] if request.views == 0 else t.transpose(0, 1).contiguous()
        return p, t

    @staticmethod
    def _views(transform: Any, image: Any, index: int, request: FeatureRequest) -> torch.Tensor:
        """[views, C, H, W]: the deterministic transform once, or `views` augmentations seeded by (seed, index)."""
        if request.views == 0:
            return transform(image).unsqueeze(0)
        torch.manual_seed(_view_seed(request.seed, index))
        return torch.stack([transform(image) for _ in range(request.views)])


def tensor_sha256(value: torch.Tensor) -> str:
    """sha256 of a CPU tensor's dtype, shape and bytes (a cache entry's checksum)."""
    digest = hashlib.sha256(f"{value.dtype}{tuple(value.shape)}".encode())
    digest.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _warn_once(what: str, message: str, *args: Any) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning(message, *args)


def _digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


# -- `fedpgp-ray cache` ---------------------------------------------------------------------------

def cache_entries(directory: Path) -> list[dict[str, Any]]:
    """One row per cached entry: key, size in bytes, and what it holds (from its .json record)."""
    if not directory.is_dir():
        return []
    rows = []
    for path in sorted(directory.glob("*.pt")):
        about: dict[str, Any] = {}
        try:
            about = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            pass
        fields = about.get("fields", {})
        rows.append({"key": path.stem, "bytes": path.stat().st_size, "dataset": about.get("dataset", "?"),
                     "split": about.get("split", "?"), "kind": fields.get("kind", "?"),
                     "images": fields.get("images"), "views": fields.get("views"),
                     "precision": fields.get("precision"), "backbone": fields.get("backbone", "?"),
                     "created": about.get("created", "?")})
    return rows


def clear_cache(directory: Path) -> tuple[int, int]:
    """Delete every entry (and its record and lock) in `directory`; returns (entries, bytes) removed."""
    entries, size = 0, 0
    if not directory.is_dir():
        return 0, 0
    for path in directory.iterdir():
        if path.suffix in (".pt", ".json", ".lock", ".tmp") and path.is_file():
            if path.suffix == ".pt":
                entries += 1
            size += path.stat().st_size
            path.unlink(missing_ok=True)
    return entries, size
