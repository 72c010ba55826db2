"""The sparse communication graph of SecAgg+ (Bell et al., CCS 2020).

Each client shares its secrets with, and masks against, only its k neighbours, k = O(log n), instead
of all n - 1 others: a Harary graph H(n, k) (client at position i is joined to positions i +- 1 ..
i +- k/2 mod n) over a random permutation of the round's clients. Cost per client grows as log n,
in total as n log n.
"""
from __future__ import annotations

import math

import numpy as np

DEGREE_PER_LOG2 = 3  # k = 3 log2(n) (rounded up to even), Bell et al.'s regime of k = O(log n)


def default_degree(n: int) -> int:
    """k for n clients: every other client when n is small, else the even number >= 3 log2(n)."""
    if n <= 1:
        return 0
    k = int(math.ceil(DEGREE_PER_LOG2 * math.log2(n)))
    k += k % 2
    return min(k, n - 1)


def threshold_for(degree: int, fraction: float) -> int:
    """t = floor(fraction * k) + 1 shares (of a client's k) reconstruct its secrets; fraction 0.5: a majority."""
    return min(max(int(math.floor(fraction * degree)) + 1, 1), max(degree, 1))


def harary_neighbours(clients: list[int], degree: int, rng: np.random.Generator) -> dict[int, list[int]]:
    """Neighbour lists of a random Harary graph on `clients` (symmetric; degree k, or k+1 for odd k, n even)."""
    n = len(clients)
    order = [clients[i] for i in rng.permutation(n)]
    out: dict[int, set[int]] = {c: set() for c in clients}
    if degree >= n - 1:
        return {c: sorted(set(clients) - {c}) for c in clients}
    half = degree // 2
    for i, c in enumerate(order):
        for step in range(1, half + 1):
            for j in (i + step, i - step):
                out[c].add(order[j % n])
        if degree % 2:  # odd degree: also the opposite client
            out[c].add(order[(i + n // 2) % n])
            out[order[(i + n // 2) % n]].add(c)
    return {c: sorted(v) for c, v in out.items()}
