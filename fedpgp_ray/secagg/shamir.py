"""Shamir secret sharing over a prime field (Shamir 1979), for SecAgg's mask seeds and mask keys.

A secret s in [0, p) is the constant term of a random polynomial f of degree t - 1 over GF(p);
share i is (i, f(i)) for i = 1..n. Any t shares give s back by Lagrange interpolation at 0; fewer
reveal nothing about it. The default field is GF(2^521 - 1) (a Mersenne prime), so 32-byte secrets
(X25519 private keys, 256-bit seeds) fit as field elements. Coefficients come from `secrets`.
"""
from __future__ import annotations

import secrets

PRIME = 2**521 - 1

Share = tuple[int, int]  # (x, f(x)), x >= 1


def split(secret: int, threshold: int, xs: list[int], prime: int = PRIME,
          coefficients: list[int] | None = None) -> list[Share]:
    """Shares (x, f(x)) of `secret` for each x of `xs`; any `threshold` of them reconstruct it.

    coefficients: f's coefficients a_1..a_{t-1} (tests with known vectors); default: uniform random.
    """
    if not 0 <= secret < prime:
        raise ValueError("shamir.split: the secret must lie in [0, prime)")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"shamir.split: threshold {threshold} must be in [1, {len(xs)}] (the number of shares)")
    if len(set(xs)) != len(xs) or any(not 0 < x < prime for x in xs):
        raise ValueError("shamir.split: share points must be distinct and in [1, prime)")
    coeffs = [secret] + (list(coefficients) if coefficients is not None
                         else [secrets.randbelow(prime) for _ in range(threshold - 1)])
    if len(coeffs) != threshold:
        raise ValueError(f"shamir.split: {threshold - 1} coefficients needed, got {len(coeffs) - 1}")
    out = []
    for x in xs:
        y = 0
        for a in reversed(coeffs):  # Horner
            y = (y * x + a) % prime
        out.append((x, y))
    return out


def combine(shares: list[Share], prime: int = PRIME) -> int:
    """f(0) from shares (Lagrange interpolation); correct when len(shares) >= the threshold."""
    if not shares:
        raise ValueError("shamir.combine: no shares")
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs):
        raise ValueError("shamir.combine: duplicate share points")
    secret = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (-xj) % prime
                den = den * (xi - xj) % prime
        secret = (secret + yi * num * pow(den, -1, prime)) % prime
    return secret


def to_int(data: bytes) -> int:
    return int.from_bytes(data, "big")


def to_bytes(value: int, length: int = 32) -> bytes:
    return value.to_bytes(length, "big")
