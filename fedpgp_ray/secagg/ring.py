"""Fixed-point encoding of float updates into the ring Z_{2^k}, and back.

A client's update x (float) is clipped coordinate-wise to [-r, r], scaled by gamma and rounded
*stochastically* to an integer (unbiased: E[round(v)] = v, and |round(v) - v| < 1), then taken
mod 2^k. Sums of such integers over n clients are exact as long as |sum| < 2^(k-1), which the
scale guarantees: `ring_scale` picks the largest gamma with n (gamma r + 1) (plus headroom for
distributed-DP noise) below 2^(k-1).
"""
from __future__ import annotations

import math

import numpy as np

NOISE_TAIL = 12.0  # headroom for DP noise: 12 standard deviations of the summed noise per coordinate


def ring_scale(bits: int, clients: int, coord_range: float, noise_multiplier: float = 0.0,
               min_survivors: int = 2) -> float:
    """gamma such that n clients' values in [-r, r] (and the noise DDP adds) sum without wrap-around.

    With noise (z > 0) each coordinate of the sum also carries noise of std at most
    z (gamma r + sqrt(d)) sqrt(n / (M - 1)) <= 2 z gamma r sqrt(n / (M - 1)) (secagg.ddp; gamma r >= sqrt(d)
    is checked by `check_resolution`); NOISE_TAIL of those fit too. Independent of the dimension d.
    """
    half = 2.0 ** (bits - 1) - 1
    spread = 2 * NOISE_TAIL * noise_multiplier * math.sqrt(max(clients / max(min_survivors - 1, 1), 1.0))
    gamma = (half - clients) / (coord_range * (clients + spread))
    if gamma * coord_range < 1.0:
        raise ValueError(f"secagg: a ring of 2^{bits} cannot hold the sum of {clients} clients: raise secagg.bits")
    return gamma


def check_resolution(gamma: float, coord_range: float, dim: int, bits: int) -> None:
    """gamma r >= sqrt(d): rounding error (< sqrt(d) in L2) stays below the clip bound (ring_scale needs it)."""
    if gamma * coord_range < math.sqrt(dim):
        raise ValueError(f"secagg: a ring of 2^{bits} leaves {gamma * coord_range:.0f} quantisation levels for a "
                         f"{dim}-dimensional update (needs >= sqrt(d) = {math.sqrt(dim):.0f}): raise secagg.bits")


def quantize(values: np.ndarray, coord_range: float, gamma: float, rng: np.random.Generator) -> np.ndarray:
    """clip(values, -r, r) * gamma, stochastically rounded to int64."""
    scaled = np.clip(np.asarray(values, dtype=np.float64), -coord_range, coord_range) * gamma
    low = np.floor(scaled)
    return (low + (rng.random(scaled.shape) < (scaled - low))).astype(np.int64)


def to_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers -> their residues mod 2^k (uint64)."""
    return values.astype(np.int64).view(np.uint64) & np.uint64((1 << bits) - 1)


def ring_add(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    return (a + b) & np.uint64((1 << bits) - 1)  # uint64 arithmetic wraps mod 2^64, a multiple of 2^k


def ring_sub(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    return (a - b) & np.uint64((1 << bits) - 1)


def from_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """Residues mod 2^k -> the signed integers in [-2^(k-1), 2^(k-1)) they stand for (int64)."""
    v = values.astype(np.uint64) & np.uint64((1 << bits) - 1)
    signed = v.astype(np.int64)
    if bits < 64:
        signed = np.where(signed >= (1 << (bits - 1)), signed - (1 << bits), signed)
    return signed


def dequantize(values: np.ndarray, gamma: float) -> np.ndarray:
    return values.astype(np.float64) / gamma
