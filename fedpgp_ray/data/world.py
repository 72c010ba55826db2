"""A procedural image world: the project's offline dataset and CLIP pretraining corpus.

Every class is a coloured shape with a surface pattern, named in plain English
("red striped circle", "blue star"): 8 colours x 8 shapes x 4 patterns = 256 classes
in the universe. A dataset uses a fixed, colour-balanced subset of `num_classes` of
them (the same subset for every seed), sorted by name.

Images are rendered in batches with numpy only (signed-distance shapes, patterns in
the object's own rotated frame, per-style backgrounds and post-processing); no
per-pixel Python loops. Each image gets a random position, size, rotation, colour
jitter, background and noise. Styles:

- pretraining styles (`PRETRAIN_STYLES`): "clean", "sketch", "cluttered", "pixel";
  the tiny CLIP (`python -m fedpgp_ray.pretrain`) is trained on captioned images of
  these, covering every class of the universe.
- "task": the federated task's shifted style, never seen in pretraining: lit,
  shaded objects under a colour cast and haze, an occluding bar, textured
  backgrounds and sensor noise. CLIP still recognises much of it zero-shot, but far from
  all, so prompt learning has something to learn.

Randomness comes from independent streams of one seed: train images, test images
and pretraining batches never share a stream, and each style has its own.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fedpgp_ray.data.base import ClassificationDataset, DataError, ImageSplit, register_dataset

# Bump whenever rendering changes: it is part of every dataset name (feature-cache key).
GENERATOR_VERSION = 2

COLOURS: dict[str, tuple[int, int, int]] = {
    "blue": (40, 90, 225),
    "brown": (125, 72, 32),
    "green": (35, 165, 55),
    "orange": (248, 140, 20),
    "pink": (248, 128, 190),
    "purple": (128, 50, 185),
    "red": (218, 30, 38),
    "yellow": (242, 218, 30),
}
SHAPES: tuple[str, ...] = ("arrow", "circle", "crescent", "cross", "heart", "square", "star", "triangle")
PATTERNS: tuple[str, ...] = ("plain", "checkered", "dotted", "striped")
PRETRAIN_STYLES: tuple[str, ...] = ("clean", "sketch", "cluttered", "pixel")
STYLES: tuple[str, ...] = PRETRAIN_STYLES + ("task",)
# How far the "task" style shifts from pretraining; it sets the zero-shot headroom (docs/WORLD.md).
# Tuned so the shipped CLIP scores ~44% zero-shot on it (2 bars, stronger cast/haze and a blur: ~27%).
TASK_SHIFT: dict = {"distractors": (0, 1), "shading": (0.2, 0.5), "bars": 1, "bar_prob": 0.4,
                    "cast": (0.85, 1.15), "haze": (0.0, 0.2), "noise": 0.03}
UNIVERSE_SIZE = len(COLOURS) * len(SHAPES) * len(PATTERNS)

_COLOUR_NAMES = tuple(COLOURS)
_COLOUR_RGB = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32) / 255.0

# Stream ids of np.random.SeedSequence([seed, stream, ...]).
STREAM_TRAIN, STREAM_TEST, STREAM_PRETRAIN = 1, 2, 3
_CHUNK = 2048  # images rendered per batch when building a split (fixed: keeps splits deterministic)
_SUBSET_SEED = 20240711  # fixes which classes a dataset of num_classes < 256 uses, for every data seed


@dataclass(frozen=True)
class WorldClass:
    colour: int
    shape: int
    pattern: int

    @property
    def name(self) -> str:
        words = [_COLOUR_NAMES[self.colour]]
        if PATTERNS[self.pattern] != "plain":
            words.append(PATTERNS[self.pattern])
        words.append(SHAPES[self.shape])
        return " ".join(words)


def universe() -> list[WorldClass]:
    """All 256 classes, sorted by name."""
    out = [WorldClass(c, s, p) for c in range(len(COLOURS)) for s in range(len(SHAPES))
           for p in range(len(PATTERNS))]
    return sorted(out, key=lambda k: k.name)


def world_classes(num_classes: int) -> list[WorldClass]:
    """A fixed, colour-balanced subset of the universe, sorted by name.

    Colours take turns; inside a colour the (shape, pattern) combinations come in a
    fixed pseudo-random order. The subset depends only on `num_classes`.
    """
    if not 1 <= num_classes <= UNIVERSE_SIZE:
        raise DataError(f"data.world.num_classes = {num_classes}: the world has {UNIVERSE_SIZE} classes "
                        f"({len(COLOURS)} colours x {len(SHAPES)} shapes x {len(PATTERNS)} patterns); "
                        f"use 1..{UNIVERSE_SIZE}")
    rng = np.random.default_rng(_SUBSET_SEED)
    per_colour = []
    for c in range(len(COLOURS)):
        combos = [(s, p) for s in range(len(SHAPES)) for p in range(len(PATTERNS))]
        order = rng.permutation(len(combos))
        per_colour.append([WorldClass(c, *combos[i]) for i in order])
    colour_order = rng.permutation(len(COLOURS))
    chosen = [per_colour[c][k] for k in range(len(SHAPES) * len(PATTERNS)) for c in colour_order]
    return sorted(chosen[:num_classes], key=lambda k: k.name)


def _attrs(classes: Sequence[WorldClass], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    table = np.array([[k.colour, k.shape, k.pattern] for k in classes], dtype=np.int64)
    rows = table[labels]
    return rows[:, 0], rows[:, 1], rows[:, 2]


# --------------------------------------------------------------------------- geometry

def _shape_sdf(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Approximate signed distance (negative inside) in the object's unit frame (circumradius ~1)."""
    if shape == "circle":
        return np.sqrt(x * x + y * y) - 0.9
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) - 0.72
    if shape == "triangle":
        d = None
        for a in (-np.pi / 2, np.pi / 6, 5 * np.pi / 6):
            e = x * np.float32(np.cos(a)) + y * np.float32(np.sin(a))
            d = e if d is None else np.maximum(d, e)
        return d - 0.5
    if shape == "star":
        r = np.sqrt(x * x + y * y)
        t = np.mod(np.arctan2(y, x) * np.float32(5 / (2 * np.pi)), 1.0)
        rad = 0.42 + 0.6 * np.abs(2 * t - 1)
        return (r - rad) * 0.6
    if shape == "cross":
        ax, ay = np.abs(x), np.abs(y)
        return np.minimum(np.maximum(ax - 0.88, ay - 0.3), np.maximum(ax - 0.3, ay - 0.88))
    if shape == "heart":
        hx, hy = x / 0.82, -(y + 0.12) / 0.82
        a = hx * hx + hy * hy - 1
        f = a * a * a - hx * hx * hy * hy * hy
        gx = 6 * hx * a * a - 2 * hx * hy * hy * hy
        gy = 6 * hy * a * a - 3 * hx * hx * hy * hy
        return 0.82 * f / (np.sqrt(gx * gx + gy * gy) + 0.05)
    if shape == "crescent":
        outer = np.sqrt(x * x + y * y) - 0.9
        inner = np.sqrt((x - 0.45) ** 2 + y * y) - 0.72
        return np.maximum(outer, -inner)
    if shape == "arrow":
        shaft = np.maximum(np.abs(x + 0.3) - 0.6, np.abs(y) - 0.2)
        head = np.maximum(0.15 - x, np.maximum(0.6 * (x - 0.95) + 0.75 * y, 0.6 * (x - 0.95) - 0.75 * y) / 0.96)
        return np.minimum(shaft, head)
    raise KeyError(shape)


def _pattern_mask(pattern: str, x: np.ndarray, y: np.ndarray, px: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Where the secondary colour shows, in [0, 1]; `px` is the size of a pixel in unit-frame units."""
    if pattern == "plain":
        return np.zeros_like(x)
    if pattern == "striped":
        period = 0.5
        s = np.sin((x / period + phase[:, None, None, 0]) * np.float32(2 * np.pi))
        return np.clip(0.5 + s * (period / (2 * np.pi) / px), 0.0, 1.0)
    if pattern == "dotted":
        period = 0.5
        cx = np.mod(x / period + phase[:, None, None, 0], 1.0) - 0.5
        cy = np.mod(y / period + phase[:, None, None, 1], 1.0) - 0.5
        d = (np.sqrt(cx * cx + cy * cy) - 0.27) * period
        return np.clip(0.5 - d / px, 0.0, 1.0)
    if pattern == "checkered":
        cell = 0.36
        sx = np.sin((x / cell + phase[:, None, None, 0]) * np.float32(np.pi))
        sy = np.sin((y / cell + phase[:, None, None, 1]) * np.float32(np.pi))
        return np.clip(0.5 + sx * sy * (cell / px), 0.0, 1.0)
    raise KeyError(pattern)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    v = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return v[None, :, None], v[None, None, :]  # (1, S, 1) rows=y, (1, 1, S) cols=x


def _frame(n: int, size: int, rng: np.random.Generator, scale: tuple[float, float], margin: float = 0.9):
    """Random placement: unit-frame coords x, y [n, S, S] and pixel size in frame units [n, 1, 1]."""
    gy, gx = _grid(size)
    radius = rng.uniform(*scale, n).astype(np.float32)
    span = np.maximum(1.0 - radius * margin, 0.0)
    cx = (rng.uniform(-1, 1, n) * span).astype(np.float32)
    cy = (rng.uniform(-1, 1, n) * span).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    dx = (gx - cx[:, None, None]) / radius[:, None, None]
    dy = (gy - cy[:, None, None]) / radius[:, None, None]
    x = dx * cos + dy * sin
    y = -dx * sin + dy * cos
    px = (2.0 / size / radius)[:, None, None].astype(np.float32)
    return x.astype(np.float32), y.astype(np.float32), px


def _sdf_batch(shape_ids: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = np.empty_like(x)
    for s in np.unique(shape_ids):
        idx = np.nonzero(shape_ids == s)[0]
        d[idx] = _shape_sdf(SHAPES[s], x[idx], y[idx])
    return d


def _pattern_batch(pattern_ids: np.ndarray, x: np.ndarray, y: np.ndarray, px: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    phase = rng.uniform(0, 1, (len(pattern_ids), 2)).astype(np.float32)
    p = np.zeros_like(x)
    for k in np.unique(pattern_ids):
        idx = np.nonzero(pattern_ids == k)[0]
        p[idx] = _pattern_mask(PATTERNS[k], x[idx], y[idx], px[idx], phase[idx])
    return p


# --------------------------------------------------------------------------- colour and texture

def _object_colours(colour_ids: np.ndarray, rng: np.random.Generator, jitter: float = 0.06):
    """Jittered fill colour and the pattern's secondary colour (the fill lightened or darkened)."""
    n = len(colour_ids)
    base = _COLOUR_RGB[colour_ids]
    col = np.clip(base * rng.uniform(0.85, 1.1, (n, 1)) + rng.normal(0, jitter, (n, 3)), 0, 1)
    light = rng.random(n) < 0.5
    target = np.where(light[:, None], 1.0, 0.0)
    col2 = col + (target - col) * 0.62
    return col.astype(np.float32), col2.astype(np.float32)


def _smooth_noise(n: int, size: int, rng: np.random.Generator, waves: int = 4, freq: tuple = (0.5, 3.0)):
    """Low-frequency random field in about [-1, 1], [n, S, S] (a sum of random plane waves)."""
    gy, gx = _grid(size)
    out = np.zeros((n, size, size), np.float32)
    for _ in range(waves):
        f = rng.uniform(*freq, n).astype(np.float32) * np.float32(np.pi)
        a = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
        ph = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
        kx, ky = (f * np.cos(a))[:, None, None], (f * np.sin(a))[:, None, None]
        out += np.sin(gx * kx + gy * ky + ph[:, None, None])
    return out / np.float32(np.sqrt(waves / 2))


def _random_colours(n: int, rng: np.random.Generator, sat: tuple = (0.0, 1.0), val: tuple = (0.0, 1.0)):
    """Random RGB colours [n, 3] with saturation/value drawn from the given ranges (HSV-like)."""
    hue = rng.random(n)
    s = rng.uniform(*sat, n)
    v = rng.uniform(*val, n)
    k = (hue[:, None] * 6 + np.array([5, 3, 1])) % 6
    rgb = v[:, None] * (1 - s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1))
    return rgb.astype(np.float32)


def _away_from(bg: np.ndarray, col: np.ndarray, min_dist: float = 0.35) -> np.ndarray:
    """Background colours [n, 3] pushed away from the object colours where they are too alike."""
    close = np.linalg.norm(bg - col, axis=1) < min_dist
    lum = col @ np.array([0.3, 0.55, 0.15], np.float32)
    flipped = np.where((lum > 0.5)[:, None], bg * 0.35, 0.65 + bg * 0.35)
    return np.where(close[:, None], flipped, bg).astype(np.float32)


def _composite(bg: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Paint `colour` ([n, 3] or [n, S, S, 3]) over bg with coverage alpha [n, S, S]."""
    if colour.ndim == 2:
        colour = colour[:, None, None, :]
    a = alpha[..., None]
    return bg * (1 - a) + colour * a


def _distractors(img: np.ndarray, count: tuple[int, int], scale: tuple[float, float],
                 rng: np.random.Generator) -> np.ndarray:
    """Paint up to count[1] small random shapes of random colours onto img (in place, returned)."""
    n, size = img.shape[0], img.shape[1]
    k = rng.integers(count[0], count[1] + 1, n)
    for j in range(count[1]):
        x, y, px = _frame(n, size, rng, scale, margin=0.0)
        d = _sdf_batch(rng.integers(0, len(SHAPES), n), x, y) / px
        alpha = np.clip(0.5 - d, 0, 1) * (j < k)[:, None, None]
        img = _composite(img, alpha, _random_colours(n, rng, (0.3, 1.0), (0.3, 1.0)))
    return img


# --------------------------------------------------------------------------- styles

def _render_style(style: str, colour_ids: np.ndarray, shape_ids: np.ndarray, pattern_ids: np.ndarray,
                  size: int, rng: np.random.Generator) -> np.ndarray:
    n = len(colour_ids)
    k = size / 32.0  # pixel-unit quantities are tuned at 32 px
    col, col2 = _object_colours(colour_ids, rng)
    if style == "sketch":
        x, y, px = _frame(n, size, rng, (0.5, 0.85))
        wobble = _smooth_noise(n, size, rng, waves=3, freq=(1.5, 4.0)) * 0.04
        d = (_sdf_batch(shape_ids, x, y) + wobble) / px
        pat = _pattern_batch(pattern_ids, x, y, px, rng)
        paper = 1.0 - rng.uniform(0, 0.12, (n, 1, 1, 1)).astype(np.float32) * rng.random((n, 1, 1, 3))
        img = np.broadcast_to(paper, (n, size, size, 3)).astype(np.float32)
        inside = np.clip(0.5 - d, 0, 1)
        img = _composite(img, inside * pat * 0.85, col)
        width = rng.uniform(0.8, 1.6, (n, 1, 1)).astype(np.float32) * k
        img = _composite(img, np.clip(width + 0.5 - np.abs(d), 0, 1), col)
        img = img + rng.normal(0, 0.015, img.shape).astype(np.float32)
        return img

    x, y, px = _frame(n, size, rng, (0.45, 0.8))
    d = _sdf_batch(shape_ids, x, y) / px
    pat = _pattern_batch(pattern_ids, x, y, px, rng)[..., None]
    fill = col[:, None, None, :] * (1 - pat) + col2[:, None, None, :] * pat
    alpha = np.clip(0.5 - d, 0, 1)

    if style == "clean":
        bg = _away_from(_random_colours(n, rng, (0.0, 0.25), (0.7, 1.0)), col)[:, None, None, :]
        img = np.broadcast_to(bg, (n, size, size, 3)).astype(np.float32)
        return _composite(img, alpha, fill)

    if style == "cluttered":
        c1 = _away_from(_random_colours(n, rng, (0.0, 0.8), (0.2, 1.0)), col)[:, None, None, :]
        c2 = _away_from(_random_colours(n, rng, (0.0, 0.8), (0.2, 1.0)), col)[:, None, None, :]
        t = (0.5 + 0.5 * _smooth_noise(n, size, rng))[..., None]
        img = c1 * (1 - t) + c2 * t
        img = _distractors(img, (1, 4), (0.12, 0.3), rng)
        img = _composite(img, alpha, fill)
        return img + rng.normal(0, 0.05, img.shape).astype(np.float32)

    if style == "pixel":
        bg = _away_from(_random_colours(n, rng, (0.0, 0.6), (0.3, 1.0)), col)[:, None, None, :]
        img = _composite(np.broadcast_to(bg, (n, size, size, 3)).astype(np.float32), alpha, fill)
        out = np.empty_like(img)
        block = rng.integers(2, 4, n)  # 2 or 3 px at 32 px: average each block, then repeat it
        for b in (2, 3):
            idx = np.nonzero(block == b)[0]
            bs = max(1, int(round(b * k)))
            starts = np.arange(0, size, bs)
            counts = np.diff(np.append(starts, size)).astype(np.float32)
            small = np.add.reduceat(np.add.reduceat(img[idx], starts, axis=1), starts, axis=2)
            small /= (counts[:, None] * counts[None, :])[None, :, :, None]
            cell = np.arange(size) // bs
            out[idx] = small[:, cell][:, :, cell]
        levels = rng.integers(5, 9, (n, 1, 1, 1)).astype(np.float32)
        return np.round(out * (levels - 1)) / (levels - 1)

    if style == "task":
        # Textured background: two colours mixed by a higher-frequency field (stripes, blotches).
        c1 = _away_from(_random_colours(n, rng, (0.0, 0.7), (0.25, 0.95)), col, 0.25)[:, None, None, :]
        c2 = _away_from(_random_colours(n, rng, (0.0, 0.7), (0.25, 0.95)), col, 0.25)[:, None, None, :]
        t = (0.5 + 0.5 * _smooth_noise(n, size, rng, waves=3, freq=(2.0, 6.0)))[..., None]
        img = c1 * (1 - t) + c2 * t
        img = _distractors(img, TASK_SHIFT["distractors"], (0.1, 0.22), rng)
        # Lit object: a linear shading ramp across it.
        gy, gx = _grid(size)
        la = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
        ramp = gx * np.cos(la)[:, None, None] + gy * np.sin(la)[:, None, None]
        shade = 1 + rng.uniform(*TASK_SHIFT["shading"], (n, 1, 1)).astype(np.float32) * ramp
        img = _composite(img, alpha, fill * shade[..., None])
        # Occluding bars across the image.
        for _ in range(TASK_SHIFT["bars"]):
            bx, by, bpx = _frame(n, size, rng, (0.5, 1.0), margin=0.3)
            half = rng.uniform(0.06, 0.16, (n, 1, 1)).astype(np.float32)
            on = (rng.random(n) < TASK_SHIFT["bar_prob"])[:, None, None]
            bar = np.clip(0.5 - (np.abs(by) - half) / bpx, 0, 1) * on
            img = _composite(img, bar, _random_colours(n, rng, (0.0, 0.6), (0.1, 0.9)))
        # Colour cast, haze, sensor noise.
        cast = rng.uniform(*TASK_SHIFT["cast"], (n, 1, 1, 3)).astype(np.float32)
        img = img * cast
        haze = rng.uniform(*TASK_SHIFT["haze"], (n, 1, 1, 1)).astype(np.float32)
        img = img * (1 - haze) + haze * _random_colours(n, rng, (0.0, 0.3), (0.5, 1.0))[:, None, None, :]
        return img + rng.normal(0, TASK_SHIFT["noise"], img.shape).astype(np.float32)

    raise DataError(f"unknown world style '{style}': use one of {', '.join(STYLES)}")


def render(colour_ids: np.ndarray, shape_ids: np.ndarray, pattern_ids: np.ndarray, style: str | Sequence[str],
           size: int, rng: np.random.Generator) -> np.ndarray:
    """Render a batch: uint8 [n, size, size, 3]. `style` is one name or one name per image."""
    colour_ids, shape_ids, pattern_ids = (np.asarray(a, dtype=np.int64) for a in (colour_ids, shape_ids,
                                                                                   pattern_ids))
    n = len(colour_ids)
    if isinstance(style, str):
        out = _render_style(style, colour_ids, shape_ids, pattern_ids, size, rng)
    else:
        styles = np.asarray(style)
        out = np.empty((n, size, size, 3), np.float32)
        for name in sorted(set(styles.tolist())):
            idx = np.nonzero(styles == name)[0]
            out[idx] = _render_style(name, colour_ids[idx], shape_ids[idx], pattern_ids[idx], size, rng)
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_classes(classes: Sequence[WorldClass], labels: np.ndarray, style: str, size: int,
                   rng: np.random.Generator, chunk: int = _CHUNK) -> np.ndarray:
    """Render images of `classes[labels]` in `style`, in fixed-size chunks (uint8 [n, S, S, 3])."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.empty((len(labels), size, size, 3), np.uint8)
    for start in range(0, len(labels), chunk):
        sl = slice(start, start + chunk)
        out[sl] = render(*_attrs(classes, labels[sl]), style, size, rng)
    return out


def stream(seed: int, *keys: int) -> np.random.Generator:
    """An independent random stream of `seed` (keys: STREAM_* and a style index)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, keys)]))


# --------------------------------------------------------------------------- pretraining corpus

CAPTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "any": ("a photo of a {c}.", "a {c}.", "a picture of a {c}.", "an image of a {c}.", "there is a {c}.",
            "a {c} shape.", "a {size} {c}.", "a photo of a {size} {c}.", "a {c} {place}."),
    "clean": ("a clean picture of a {c}.", "a rendering of a {c}.", "a {c} on a plain background."),
    "sketch": ("a drawing of a {c}.", "a sketch of a {c}.", "an outline of a {c}.", "a doodle of a {c}."),
    "cluttered": ("a cluttered photo of a {c}.", "a noisy photo of a {c}.", "a {c} among other shapes.",
                  "a photo of a {c} on a busy background."),
    "pixel": ("a pixelated {c}.", "pixel art of a {c}.", "a low resolution photo of a {c}.",
              "a blocky image of a {c}."),
}


def caption(classname: str, style: str, rng: np.random.Generator, radius_hint: float = 0.6) -> str:
    """One caption for an image of `classname` in a pretraining style (half generic, half style-specific)."""
    pool = CAPTION_TEMPLATES["any"] if rng.random() < 0.5 else CAPTION_TEMPLATES[style]
    text = pool[int(rng.integers(len(pool)))]
    size = "small" if radius_hint < 0.55 else "large" if radius_hint > 0.72 else "medium"
    place = ("in the middle", "in a picture", "on its own", "in an image")[int(rng.integers(4))]
    return text.format(c=classname, size=size, place=place)


def render_captioned_batch(n: int, size: int, rng: np.random.Generator,
                           styles: Sequence[str] = PRETRAIN_STYLES) -> tuple[np.ndarray, list[str], np.ndarray]:
    """A pretraining batch over the whole universe: uint8 images [n, S, S, 3], captions, universe labels.

    Labels are shuffled passes over the universe: any 256 images of one batch hold every
    class once (so every class of any dataset built here is pretrained, and a batch of up
    to 256 has no duplicate class). Each image gets a random pretraining style and a
    caption naming its class.
    """
    classes = universe()
    labels = np.concatenate([rng.permutation(len(classes)) for _ in range(-(-n // len(classes)))])[:n]
    style_of = np.asarray(styles)[rng.integers(0, len(styles), n)]
    images = render(*_attrs(classes, labels), style_of.tolist(), size, rng)
    captions = [caption(classes[l].name, s, rng, float(rng.uniform(0.45, 0.85)))
                for l, s in zip(labels.tolist(), style_of.tolist())]
    return images, captions, labels


# --------------------------------------------------------------------------- dataset builder

def dataset_name(num_classes: int, train_per_class: int, test_per_class: int, size: int,
                 styles: Sequence[str], seed: int) -> str:
    return (f"world-v{GENERATOR_VERSION}-c{num_classes}-tr{train_per_class}-te{test_per_class}"
            f"-px{size}-{'+'.join(styles)}-seed{seed}")


def build_split(classes: Sequence[WorldClass], per_class: int, styles: Sequence[str], size: int, seed: int,
                stream_id: int, cache_name: str | None = None) -> ImageSplit:
    """`per_class` images of every class in every style (class-balanced); domains set when several styles.
    cache_name: keep the rendered images on disk under that name (`rendered_once`)."""
    labels_one = np.repeat(np.arange(len(classes), dtype=np.int64), per_class)

    def render_all() -> np.ndarray:
        return np.concatenate([render_classes(classes, labels_one, style, size,
                                              stream(seed, stream_id, STYLES.index(style))) for style in styles])

    images = render_all() if cache_name is None else rendered_once(cache_name, render_all)
    domains = [np.full(len(labels_one), d, np.int64) for d in range(len(styles))]
    return ImageSplit(images, np.tile(labels_one, len(styles)), np.concatenate(domains) if len(styles) > 1 else None)


def rendered_once(name: str, render_all) -> np.ndarray:
    """The images of `name`, rendered once per machine: read (memory-mapped) from `<feature cache>/world/
    <name>.npy`, else rendered under a file lock (processes starting together, e.g. Ray actors, wait
    for the first) and written there. Without a writable cache directory, rendered in memory."""
    from filelock import FileLock

    from fedpgp_ray.clip.features import default_cache_dir

    folder = default_cache_dir() / "world"
    path = folder / f"{name}.npy"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder / f"{name}.lock")):
            if not path.is_file():
                tmp = folder / f"{name}.{os.getpid()}.tmp.npy"
                np.save(tmp, render_all())
                os.replace(tmp, path)
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError):  # a read-only or full disk, a damaged file: render in memory this time
        return render_all()


def _check_styles(styles: Sequence[str], key: str) -> None:
    for s in styles:
        if s not in STYLES:
            raise DataError(f"{key}: unknown world style '{s}': use one of {', '.join(STYLES)}")
    if len(set(styles)) != len(styles):
        raise DataError(f"{key}: {list(styles)} repeats a style: list each style once")


@register_dataset("world")
def build_world(cfg, seed: int) -> ClassificationDataset:
    """The procedural world from `cfg.world` (a DataConfig): category level (`style`) or domain level
    (`domains`: every split rendered in each listed style, `ImageSplit.domains` set)."""
    w = cfg.world
    domain_level = bool(w.domains)
    styles = list(w.domains) if domain_level else [w.style]
    _check_styles(styles, "data.world.domains" if domain_level else "data.world.style")
    classes = world_classes(w.num_classes)
    name = dataset_name(w.num_classes, w.train_per_class, w.test_per_class, w.image_size,
                        (["dom"] if domain_level else []) + styles, seed)
    # rendered once per image and machine (the name holds every parameter and the generator version)
    train = build_split(classes, w.train_per_class, styles, w.image_size, seed, STREAM_TRAIN, f"{name}-train")
    test = build_split(classes, w.test_per_class, styles, w.image_size, seed, STREAM_TEST, f"{name}-test")
    if domain_level and len(styles) == 1:  # one listed domain: still a domain-level dataset
        train = ImageSplit(train.images, train.labels, np.zeros(len(train), np.int64))
        test = ImageSplit(test.images, test.labels, np.zeros(len(test), np.int64))
    return ClassificationDataset(name=name, classnames=[k.name for k in classes], train=train, test=test,
                                 domains=styles if domain_level else [])
