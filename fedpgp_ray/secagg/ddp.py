"""Distributed DP under SecAgg: the Skellam mechanism (Agarwal, Kairouz, Liu, NeurIPS 2021).

Each surviving client adds integer noise Sk = Poisson(v/2) - Poisson(v/2) (variance v per coordinate)
to its quantised update before masking; the sum of independent Skellams is Skellam, so the unmasked
sum carries variance m v for m contributing clients. Each client's share is v = (z Delta2)^2 / (M - 1),
M = secagg.min_survivors: a round unmasks only with >= M survivors, so even without the protected
client's own share the others add variance >= (z Delta2)^2, the configured noise.

Sensitivity in integer units: a client's update has L2 norm <= C (clipped), scaled by gamma and
rounded stochastically (each coordinate moves by < 1), so Delta2 <= gamma C + sqrt(d) and
Delta1 <= sqrt(d) Delta2. The noise is calibrated to this Delta2 (the discretisation costs utility,
not privacy: the Gaussian part of the RDP is exactly alpha / (2 z^2)).

Accounting (dp-accounting has no Skellam event, so the bound is assembled here and documented):
* Skellam RDP, Agarwal et al. Thm 3.5 with variance mu = (z Delta2)^2 per coordinate, integer alpha:
  eps(alpha) <= alpha Delta2^2 / (2 mu) + min(((2 alpha - 1) Delta2^2 + 6 Delta1) / (4 mu^2), 3 Delta1 / (2 mu));
  evaluated at the smallest gamma any round can use (all N clients sampled), where it is largest,
  and bounded free of d (see `epsilon`).
* Poisson subsampling with rate q: the general upper bound of Zhu & Wang (ICML 2019, Thm 6) for any
  mechanism, at integer orders 2..256, and never more than the unsampled eps(alpha).
* rounds compose additively; (eps, delta) by dp-accounting's `compute_epsilon` (its RDP conversion).
"""
from __future__ import annotations

import math

import numpy as np

ORDERS = list(range(2, 65)) + list(range(72, 257, 8))
ACCOUNTANT = ("Skellam RDP (Agarwal et al. 2021, Thm 3.5) + Poisson subsampling bound (Zhu & Wang 2019, Thm 6) "
              "+ dp-accounting compute_epsilon")


def sensitivity(gamma: float, clip_norm: float, dim: int) -> tuple[float, float]:
    """(Delta2, Delta1) of one client's rounded, scaled update in integer units."""
    d2 = gamma * clip_norm + math.sqrt(dim)
    return d2, math.sqrt(dim) * d2


def client_noise_variance(noise_multiplier: float, gamma: float, clip_norm: float, dim: int,
                          min_survivors: int) -> float:
    """Per-coordinate variance of each client's Skellam share: (z Delta2)^2 / (M - 1)."""
    d2, _ = sensitivity(gamma, clip_norm, dim)
    return (noise_multiplier * d2) ** 2 / max(min_survivors - 1, 1)


def skellam_rdp(alpha: int, d2: float, d1: float, mu: float) -> float:
    return alpha * d2 ** 2 / (2 * mu) + min(((2 * alpha - 1) * d2 ** 2 + 6 * d1) / (4 * mu ** 2), 3 * d1 / (2 * mu))


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def subsampled_rdp(alpha: int, q: float, eps) -> float:
    """Zhu & Wang 2019, Thm 6: RDP at integer alpha >= 2 of a Poisson-q-subsampled mechanism with RDP eps(.)."""
    if q >= 1:
        return eps(alpha)
    terms = [(alpha - 1) * math.log1p(-q) + math.log(alpha * q - q + 1),
             _log_comb(alpha, 2) + 2 * math.log(q) + (alpha - 2) * math.log1p(-q) + eps(2)]
    for j in range(3, alpha + 1):
        terms.append(math.log(3) + _log_comb(alpha, j) + j * math.log(q) + (alpha - j) * math.log1p(-q)
                     + (j - 1) * eps(j))
    top = max(terms)
    log_sum = top + math.log(sum(math.exp(t - top) for t in terms))
    return min(log_sum / (alpha - 1), eps(alpha))


def epsilon(sampling_rate: float, noise_multiplier: float, rounds: int, delta: float, gamma: float,
            clip_norm: float) -> float:
    """epsilon at delta after `rounds` rounds of the Poisson-subsampled distributed Skellam mechanism.

    gamma: the smallest quantisation scale any round uses. Free of the dimension d: with
    mu = (z Delta2)^2 the first Skellam term is alpha / (2 z^2), and since Delta2 >= gamma C and
    Delta1 <= sqrt(d) Delta2 <= Delta2^2, the correction is at most (2 alpha + 5) / (4 z^4 (gamma C)^2).
    """
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon  # seconds of imports non-DP runs skip

    z, scaled = noise_multiplier, gamma * clip_norm
    rdp = lambda a: a / (2 * z * z) + (2 * a + 5) / (4 * z ** 4 * scaled ** 2)
    per_round = [subsampled_rdp(a, sampling_rate, rdp) for a in ORDERS]
    eps, _ = compute_epsilon(ORDERS, list(np.asarray(per_round) * rounds), delta)
    return float(eps)
