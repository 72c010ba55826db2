"""Client speed model (tests, benchmarks): how much slower than this machine each client runs, and
the real extra wall time that makes a slow client straggle.

A client's speed factor k >= 1 is fixed for the run by (run seed, client id). A slow client's fit first
trains as fast as the machine can, then waits (k - 1) x the measured seconds of that training: its task
takes k times as long as on a full-speed client, whatever the backbone, the shard size or the machine,
with no seconds-per-step knob to calibrate. Evaluation is never slowed: it is the experimenter's
measurement, not client work.

The waiting is where a round can end a straggler early: `RoundClosing` is told when the server stops
wanting results of a round (deadline reached, enough clients reported), and a waiting client stops at once.
No Ray, no torch: both runtimes (in-process and Ray actors) use it the same way.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from fedpgp_ray.config import ClientSpeedConfig

SPEED_STREAM = 41  # the speed model's own random stream of the run seed (never shared with training's)


class SpeedModel:
    """client id -> speed factor (>= 1: how many times slower than the machine).

    kinds: "none" (every client 1), "slow_fraction" (exactly round(slow_fraction x K) clients, picked by a
    seeded permutation, run `slowdown` times slower; the rest at 1), "lognormal" (k = max(1, exp(sigma z)),
    z ~ N(0, 1) per client: median 1, a long tail of slow clients; a client cannot run faster than the
    machine, so the faster half runs at 1). The table of K factors is drawn once per process on first use
    (numpy, O(K): about 0.4 MB for 100,000 clients), never per round.
    """

    def __init__(self, cfg: ClientSpeedConfig, seed: int, num_clients: int) -> None:
        self.cfg, self.seed, self.num_clients = cfg, seed, num_clients
        self._factors: np.ndarray | None = None

    @property
    def enabled(self) -> bool:
        return self.cfg.kind != "none"

    def factors(self) -> np.ndarray:
        """Every client's factor (float32, indexed by client id)."""
        if self._factors is None:
            self._factors = speed_factors(self.cfg, self.seed, self.num_clients)
        return self._factors

    def factor(self, client_id: int) -> float:
        return float(self.factors()[client_id]) if self.enabled else 1.0

    def extra_seconds(self, client_id: int, compute_seconds: float) -> float:
        """The wait that makes this client's task last factor x `compute_seconds`."""
        return (self.factor(client_id) - 1.0) * max(compute_seconds, 0.0)


def speed_factors(cfg: ClientSpeedConfig, seed: int, num_clients: int) -> np.ndarray:
    """The factor of each of `num_clients` clients under `cfg`, seeded by the run seed (see SpeedModel)."""
    rng = np.random.default_rng([seed, SPEED_STREAM])
    factors = np.ones(num_clients, dtype=np.float32)
    if cfg.kind == "slow_fraction":
        slow = int(round(cfg.slow_fraction * num_clients))
        factors[rng.permutation(num_clients)[:slow]] = cfg.slowdown
    elif cfg.kind == "lognormal":
        factors = np.maximum(1.0, np.exp(cfg.sigma * rng.standard_normal(num_clients))).astype(np.float32)
    return factors


class RoundClosing:
    """The newest round the server no longer wants results of, shared by the thread running client tasks
    and the one told of the closing (a Ray actor's control method, or the in-process runtime's timer)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._closed = -1

    def close(self, rnd: int) -> None:
        with self._cond:
            self._closed = max(self._closed, rnd)
            self._cond.notify_all()

    def closed(self, rnd: int) -> bool:
        with self._cond:
            return self._closed >= rnd

    def wait(self, rnd: int, seconds: float) -> float:
        """Wait `seconds`, or less if round `rnd` closes meanwhile; returns the seconds waited."""
        began = time.monotonic()
        with self._cond:
            self._cond.wait_for(lambda: self._closed >= rnd, timeout=max(seconds, 0.0))
        return time.monotonic() - began
