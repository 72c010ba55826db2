"""SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020),
semi-honest variant: the server learns the sum of the surviving clients' vectors in Z_{2^k}, nothing else.

One round, every message between clients relayed by the server:

0. setup (server): the round's clients, a random Harary graph of degree k = O(log n)
   (`graph.py`), the threshold t, the ring and the quantisation scale.
1. advertise (client): two fresh X25519 key pairs, c (encrypts shares) and s (agrees mask seeds);
   the public halves go to the server, which forwards each client its neighbours' keys.
2. share (client): a fresh 32-byte self-mask seed b_u; t-of-k Shamir shares of b_u and of s_sk_u,
   one pair per neighbour, each AES-GCM-encrypted under the X25519 key agreed with that neighbour.
   The server relays the ciphertexts (it cannot read them). U2: the clients that shared.
3. masked input (client): y_u = x_u + PRG(b_u) + sum_{v in N(u) cap U2} sign(u, v) PRG(s_uv) mod 2^k,
   sign +1 if u < v else -1, s_uv = HKDF(X25519(s_sk_u, s_pk_v)). x_u: the quantised update plus
   the client's share of DP noise. U3: the clients whose y_u arrived.
4. unmask (client): for each neighbour v in U2, the share of b_v if v is in U3, else the share
   of s_sk_v (never both: a client refuses a request that names v as both). The server rebuilds
   b_v for v in U3 and s_sk_v for v in U2 minus U3 from t shares each, removes their masks, and the
   pairwise masks between survivors cancel: sum_{u in U3} y_u - masks = sum_{u in U3} x_u.

Fewer than `min_survivors` masked inputs, or fewer than t shares for any secret needed, abort the
round (`SecAggAbort`) with nothing unmasked. Pure code: no Ray, MLflow or FedML.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from fedpgp_ray.secagg import crypto, shamir
from fedpgp_ray.secagg.graph import default_degree, harary_neighbours, threshold_for
from fedpgp_ray.secagg.ring import from_ring, quantize, ring_add, ring_sub, to_ring

STAGES = ("advertise", "share", "masked_input", "unmask")  # the client stages, in order


class SecAggAbort(RuntimeError):
    """The round cannot be unmasked safely (too few survivors or shares); nothing was unmasked."""


@dataclass(frozen=True)
class RoundSetup:
    """What the server tells every client of the round before stage 1 (public)."""
    round: int
    clients: tuple[int, ...]
    neighbours: dict[int, tuple[int, ...]]
    threshold: int
    bits: int
    dim: int
    gamma: float               # quantisation scale: integer = round(gamma * clip(x, -r, r))
    coord_range: float         # r
    min_survivors: int         # fewest masked inputs the server may unmask (clients check it too)
    noise_variance: float = 0.0  # per-coordinate variance of each client's Skellam noise share (integer units)


def _sign(u: int, v: int) -> int:
    return 1 if u < v else -1


def _associated(rnd: int, sender: int, receiver: int) -> bytes:
    return struct.pack(">qqq", rnd, sender, receiver)


def skellam_noise(variance: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Symmetric Skellam noise Poisson(v/2) - Poisson(v/2) (variance v per coordinate), int64."""
    if variance <= 0:
        return np.zeros(size, dtype=np.int64)
    return rng.poisson(variance / 2, size).astype(np.int64) - rng.poisson(variance / 2, size).astype(np.int64)


@dataclass
class SecAggClient:
    """One client's side of one round. `rng` draws the rounding and the noise (secret to the client)."""
    client_id: int
    setup: RoundSetup
    update: np.ndarray                       # the float update to aggregate (float64, dim)
    rng: np.random.Generator
    _c_sk: bytes = b""
    _s_sk: bytes = b""
    _b: bytes = b""
    _keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)    # neighbour -> (c_pk, s_pk)
    _inbox: dict[int, bytes] = field(default_factory=dict)                # neighbour -> ciphertext to me
    quantised: np.ndarray | None = None      # x_u in the ring (kept for tests; never sent in the clear)

    def advertise(self) -> tuple[bytes, bytes]:
        self._c_sk, self._s_sk = crypto.new_private_key(), crypto.new_private_key()
        return crypto.public_key(self._c_sk), crypto.public_key(self._s_sk)

    def share(self, keys: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Encrypted shares of b_u and s_sk_u for each neighbour that advertised keys."""
        s = self.setup
        self._keys = {v: k for v, k in keys.items() if v in s.neighbours[self.client_id]}
        if len(self._keys) < s.threshold:
            raise SecAggAbort(f"client {self.client_id}: only {len(self._keys)} neighbours advertised keys, "
                              f"fewer than the threshold t={s.threshold}")
        self._b = crypto.new_private_key()  # 32 random bytes from the OS
        peers = sorted(self._keys)
        xs = [v + 1 for v in peers]  # share point of neighbour v: v + 1 (never 0)
        b_shares = shamir.split(shamir.to_int(self._b), s.threshold, xs)
        s_shares = shamir.split(shamir.to_int(self._s_sk), s.threshold, xs)
        out = {}
        for v, (_, yb), (_, ys) in zip(peers, b_shares, s_shares):
            key = crypto.agree(self._c_sk, self._keys[v][0], b"fedpgp secagg shares")
            plain = yb.to_bytes(66, "big") + ys.to_bytes(66, "big")
            out[v] = crypto.encrypt(key, plain, _associated(s.round, self.client_id, v))
        return out

    def masked_input(self, ciphertexts: dict[int, bytes]) -> np.ndarray:
        """y_u: quantised update + noise share + self mask + pairwise masks with the neighbours that shared."""
        s = self.setup
        self._inbox = {v: c for v, c in ciphertexts.items() if v in self._keys}
        x = quantize(self.update, s.coord_range, s.gamma, self.rng)
        x = x + skellam_noise(s.noise_variance, s.dim, self.rng)
        self.quantised = to_ring(x, s.bits)
        y = ring_add(self.quantised, crypto.prg_words(self._b, s.dim), s.bits)
        for v in sorted(self._inbox):
            mask = crypto.prg_words(crypto.agree(self._s_sk, self._keys[v][1], b"fedpgp secagg mask"), s.dim)
            y = ring_add(y, mask, s.bits) if _sign(self.client_id, v) > 0 else ring_sub(y, mask, s.bits)
        return y

    def unmask(self, survivors: list[int], dropped: list[int]) -> dict[int, tuple[str, int]]:
        """For each neighbour: ("b", share of b_v) if it survived, ("s", share of s_sk_v) if it dropped."""
        s = self.setup
        if set(survivors) & set(dropped):
            raise SecAggAbort(f"client {self.client_id}: the server asked for both secrets of "
                              f"{sorted(set(survivors) & set(dropped))}; refusing")
        if len(survivors) + 1 < s.threshold:  # Bell et al.: a neighbourhood with fewer than t survivors stops
            raise SecAggAbort(f"client {self.client_id}: only {len(survivors)} surviving neighbours announced, "
                              f"fewer than t - 1 = {s.threshold - 1}")
        out = {}
        for v in sorted(set(survivors) | set(dropped)):
            if v not in self._inbox:
                continue
            key = crypto.agree(self._c_sk, self._keys[v][0], b"fedpgp secagg shares")
            plain = crypto.decrypt(key, self._inbox[v], _associated(s.round, v, self.client_id))
            yb, ys = int.from_bytes(plain[:66], "big"), int.from_bytes(plain[66:], "big")
            out[v] = ("b", yb) if v in survivors else ("s", ys)
        return out


class SecAggServer:
    """The server's side of one round: relays messages, then unmasks the sum."""

    def __init__(self, setup: RoundSetup) -> None:
        self.setup = setup
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.shared: dict[int, dict[int, bytes]] = {}   # U2: sender -> {receiver: ciphertext}
        self.masked: dict[int, np.ndarray] = {}         # U3
        self.total: np.ndarray | None = None            # the unmasked sum (ring), after stage 4
        self.survivors: list[int] = []

    def requests(self, stage: str) -> dict[int, Any]:
        """The message the server sends each client at the start of `stage`."""
        s = self.setup
        if stage == "advertise":
            return {u: s for u in s.clients}
        if stage == "share":
            return {u: {v: self.keys[v] for v in s.neighbours[u] if v in self.keys} for u in self.keys}
        if stage == "masked_input":
            return {u: {v: c[u] for v, c in self.shared.items() if u in c} for u in self.shared}
        if stage == "unmask":
            gone = set(self.shared) - set(self.masked)
            return {u: ([v for v in s.neighbours[u] if v in self.masked], [v for v in s.neighbours[u] if v in gone])
                    for u in self.masked}
        raise ValueError(f"unknown SecAgg stage {stage!r}")

    def receive(self, stage: str, responses: dict[int, Any]) -> None:
        """Take the clients' answers to `stage` (clients missing from `responses` dropped out)."""
        s = self.setup
        if stage == "advertise":
            self.keys = dict(responses)
        elif stage == "share":
            self.shared = {u: r for u, r in responses.items() if u in self.keys}
        elif stage == "masked_input":
            self.masked = {u: r for u, r in responses.items() if u in self.shared}
            if len(self.masked) < s.min_survivors:
                raise SecAggAbort(f"round {s.round}: only {len(self.masked)} masked inputs arrived, fewer than "
                                  f"secagg.min_survivors={s.min_survivors}: nothing unmasked")
        elif stage == "unmask":
            self.total = self._unmask(responses)
            self.survivors = sorted(self.masked)
        else:
            raise ValueError(f"unknown SecAgg stage {stage!r}")

    def _reconstruct(self, owner: int, kind: str, responses: dict[int, dict[int, tuple[str, int]]]) -> bytes:
        shares = [(u + 1, r[owner][1]) for u, r in responses.items() if owner in r and r[owner][0] == kind]
        if len(shares) < self.setup.threshold:
            raise SecAggAbort(f"round {self.setup.round}: only {len(shares)} shares to unmask a client, fewer "
                              f"than the threshold t={self.setup.threshold}: nothing unmasked")
        return shamir.to_bytes(shamir.combine(shares[:self.setup.threshold]))

    def _unmask(self, responses: dict[int, dict[int, tuple[str, int]]]) -> np.ndarray:
        s = self.setup
        responses = {u: r for u, r in responses.items() if u in self.masked}
        seeds = {u: self._reconstruct(u, "b", responses) for u in self.masked}          # self masks of survivors
        gone = [v for v in self.shared if v not in self.masked]
        exposed = [v for v in gone if any(w in self.masked for w in s.neighbours[v])]
        mask_keys = {v: self._reconstruct(v, "s", responses) for v in exposed}          # mask keys of dropouts
        total = np.zeros(s.dim, dtype=np.uint64)
        for u in sorted(self.masked):
            total = ring_add(total, self.masked[u], s.bits)
            total = ring_sub(total, crypto.prg_words(seeds[u], s.dim), s.bits)
        for v in exposed:
            for w in s.neighbours[v]:
                if w in self.masked and v in self.shared.get(w, {}) and w in self.shared.get(v, {}):
                    # w masked against v with sign(w, v) * PRG(s_wv), and s_wv = s_vw
                    mask = crypto.prg_words(crypto.agree(mask_keys[v], self.keys[w][1], b"fedpgp secagg mask"), s.dim)
                    total = ring_sub(total, mask, s.bits) if _sign(w, v) > 0 else ring_add(total, mask, s.bits)
        return total

    def signed_sum(self) -> np.ndarray:
        """The unmasked sum as signed integers (int64)."""
        return from_ring(self.total, self.setup.bits)


def make_setup(rnd: int, clients: list[int], dim: int, bits: int, gamma: float, coord_range: float,
               min_survivors: int, threshold_fraction: float, rng: np.random.Generator,
               degree: int | None = None, noise_variance: float = 0.0) -> RoundSetup:
    """The round's public parameters: a random Harary graph over `clients` and its threshold."""
    clients = sorted(clients)
    k = default_degree(len(clients)) if degree is None else min(degree, len(clients) - 1)
    neighbours = harary_neighbours(clients, k, rng)
    t = threshold_for(min(len(v) for v in neighbours.values()) if neighbours else 0, threshold_fraction)
    return RoundSetup(rnd, tuple(clients), {c: tuple(v) for c, v in neighbours.items()}, t, bits, dim, gamma,
                      coord_range, min_survivors, noise_variance)


Exchange = Callable[[str, dict[int, Any]], dict[int, Any]]


def run_round(server: SecAggServer, exchange: Exchange) -> np.ndarray:
    """Drive the four stages: the server's requests go out through `exchange` (stage, {client: request})
    -> {client: response} (dropouts absent), the answers come back to the server. Returns the signed sum."""
    for stage in STAGES:
        server.receive(stage, exchange(stage, server.requests(stage)))
    return server.signed_sum()


def client_step(client: SecAggClient, stage: str, request: Any) -> Any:
    """Run one stage on a client (the runtimes call this wherever the client lives)."""
    if stage == "advertise":
        return client.advertise()
    if stage == "share":
        return client.share(request)
    if stage == "masked_input":
        return client.masked_input(request)
    if stage == "unmask":
        return client.unmask(*request)
    raise ValueError(f"unknown SecAgg stage {stage!r}")


def message_bytes(message: Any) -> int:
    """Bytes of a protocol message on the wire (keys, ciphertexts, ring vectors packed to ceil(k/8) B
    per coordinate are counted by the caller; here: the raw payload sizes)."""
    if message is None:
        return 0
    if isinstance(message, bytes):
        return len(message)
    if isinstance(message, np.ndarray):
        return message.nbytes
    if isinstance(message, int):
        return max(math.ceil(message.bit_length() / 8), 1)
    if isinstance(message, str):
        return len(message)
    if isinstance(message, dict):
        return sum(8 + message_bytes(v) for v in message.values())
    if isinstance(message, (tuple, list)):
        return sum(message_bytes(v) for v in message)
    raise TypeError(f"message_bytes: unexpected {type(message).__name__}")
