"""Client-level differential privacy for the global prompt parameters (DP-FedAvg).

McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models": each round
every client is sampled independently with probability q (Poisson sampling); a sampled client's
update (its uploaded global params minus the global params it received) is clipped to L2 norm C
over all global tensors jointly; the server adds the clipped updates, adds Gaussian noise with
standard deviation z * C to the sum and divides by the fixed expected number of clients q * N.
One client changes the sum by at most C, so each round is a Gaussian mechanism with noise
multiplier z, subsampled with rate q; the privacy accountant of `dp-accounting` (RDP) turns
(q, z, rounds) into epsilon at delta. Pure functions: no Ray, MLflow or FedML. See docs/PRIVACY.md.
"""
from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch

from fedpgp_ray.secagg.crypto import prg_words

Params = dict[str, torch.Tensor]

ACCOUNTANT = "RDP (dp-accounting RdpAccountant, Poisson-subsampled Gaussian)"


def update_norm(update: Params) -> float:
    """L2 norm of all tensors of `update` taken together (float64)."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))


def clip_update(update: Params, clip_norm: float) -> Params:
    """`update` scaled by min(1, clip_norm / ||update||) (float64); clip_norm = inf keeps it whole."""
    norm = update_norm(update)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    return {k: v.double() * scale for k, v in update.items()}


def clip_upload(upload: Params, received: Params, clip_norm: float) -> Params:
    """A client's upload replaced by received + clip(upload - received): what a DP client sends.

    Float64, so that with clip_norm = inf the upload is unchanged up to rounding.
    """
    delta = {k: upload[k].double() - received[k].double() for k in received}
    clipped = clip_update(delta, clip_norm)
    return {k: (received[k].double() + clipped[k]).to(upload[k].dtype) for k in received}


def noise_generator(seed: int | None, rnd: int) -> torch.Generator | None:
    """The noise stream of round `rnd`: None (unseeded) means the cryptographically secure source of
    `gaussian`; with a seed, torch's generator from (seed, round): reproducible, and so subtractable by
    anyone who knows the seed.
    """
    if seed is None:
        return None
    state = np.random.SeedSequence([int(seed), 17, int(rnd)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def secure_normal(shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal float64 samples from a CSPRNG: the AES-256-CTR keystream of a fresh key from
    os.urandom (the `cryptography` package), 53-bit uniforms, Box-Muller."""
    count = int(np.prod(shape, dtype=np.int64))
    words = prg_words(os.urandom(32), 2 * max(count, 1))
    u1 = ((words[0::2] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53  # (0, 1]: log is finite
    u2 = (words[1::2] >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    normal = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return torch.from_numpy(normal[:count].reshape(shape))


def gaussian(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """N(0, 1) float64 samples: from `generator` when seeded, else from `secure_normal`."""
    if generator is None:
        return secure_normal(tuple(shape))
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def flat_update(upload: Params, received: Params) -> np.ndarray:
    """upload - received over the keys of `received` (sorted), concatenated, float64: what SecAgg sums."""
    return np.concatenate([(upload[k].double() - received[k].double()).reshape(-1).numpy() for k in sorted(received)])


def unflatten(vector: np.ndarray, like: Params) -> Params:
    """The inverse of flat_update's layout: float64 tensors shaped like `like` (sorted keys)."""
    out, start = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = torch.from_numpy(np.asarray(vector[start:start + n], dtype=np.float64).copy()).reshape(like[k].shape)
        start += n
    return out


def dp_aggregate(global_params: Params, updates: list[Params], clip_norm: float, noise_multiplier: float,
                 expected_clients: float, generator: torch.Generator | None) -> Params:
    """global + (sum_i clip(update_i) + N(0, (noise_multiplier * clip_norm)^2 I)) / expected_clients.

    Updates are clipped again here (a no-op for honest clients, which clipped already), so the
    sensitivity bound holds whatever a client sends. No updates: a noise-only step.
    """
    if expected_clients <= 0:
        raise ValueError(f"dp_aggregate: expected_clients must be > 0, got {expected_clients}")
    if noise_multiplier > 0 and math.isinf(clip_norm):
        raise ValueError("dp_aggregate: noise needs a finite clip_norm")
    clipped = [clip_update({k: update[k] for k in global_params}, clip_norm) for update in updates]
    std = noise_multiplier * clip_norm if noise_multiplier > 0 else 0.0
    out = {}
    for k, v in global_params.items():
        g = v.double()
        # = g + sum_i clipped_i / E, written as sum_i (g + clipped_i) / E + g (1 - m / E), m = len(clipped):
        # the arithmetic of the weighted mean, so that without noise and clipping, E clients with equal
        # counts reproduce the non-DP aggregate bit for bit.
        new = sum((g + c[k]) * (1.0 / expected_clients) for c in clipped) + g * (1.0 - len(clipped) / expected_clients)
        if std:
            new = new + gaussian(tuple(v.shape), generator) * (std / expected_clients)
        out[k] = new.to(v.dtype)
    return out


def poisson_sample(num_clients: int, rate: float, seed: int | None, rnd: int) -> list[int]:
    """Each client independently with probability `rate` (may be none), from (seed, round) or the OS."""
    rng = np.random.default_rng(None if seed is None else [int(seed), 13, int(rnd)])
    return np.flatnonzero(rng.random(num_clients) < rate).tolist()


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting logs a warning per fractional RDP order it drops (a valid, conservative bound)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def epsilon(sampling_rate: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    """epsilon at `delta` after `rounds` Poisson-subsampled Gaussian rounds (dp-accounting RDP).

    inf without noise; 0 after no rounds.
    """
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from dp_accounting import dp_event  # imported here: seconds of scipy/absl imports that non-DP runs skip
    from dp_accounting.rdp import rdp_privacy_accountant

    event = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(sampling_rate, dp_event.GaussianDpEvent(noise_multiplier)), rounds)
    accountant = rdp_privacy_accountant.RdpAccountant()
    with _quiet_absl():
        accountant.compose(event)
        return float(accountant.get_epsilon(delta))


def rounds_within(sampling_rate: float, noise_multiplier: float, delta: float, max_epsilon: float,
                  rounds: int, epsilon_of: Callable[[int], float] | None = None) -> int:
    """The most rounds (<= `rounds`) whose epsilon stays <= max_epsilon (epsilon grows with rounds).

    epsilon_of: epsilon after r rounds (default: central DP's `epsilon` of these parameters)."""
    eps = epsilon_of or (lambda r: epsilon(sampling_rate, noise_multiplier, r, delta))
    lo, hi = 0, rounds
    while lo < hi:  # binary search: largest r in [0, rounds] with epsilon(r) <= max_epsilon
        mid = (lo + hi + 1) // 2
        if eps(mid) <= max_epsilon:
            lo = mid
        else:
            hi = mid - 1
    return lo
