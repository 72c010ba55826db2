"""FedBuff (Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022): the
server's math, pure (no runtime, no I/O).

Clients train continuously; each task is sent the newest global prompt x_v (version v = server steps so
far). Its upload becomes the update delta = y - x_v. When it arrives at step t its staleness is s = t - v;
an update with s > max_staleness is dropped, the others are buffered with weight w(s). Once K updates are
buffered the server steps:

    x_{t+1} = x_t + server_lr * (1/K) * sum_i w(s_i) * delta_i

(the paper's unweighted mean over the buffer, scaled by the staleness weight). FedPGP's personal factors
never leave the client; only the algorithm's global keys are buffered.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fedpgp_ray.algorithms import Params
from fedpgp_ray.config import ExperimentConfig, FedBuffConfig


def staleness_weight(staleness: int, kind: str = "sqrt", exponent: float = 0.5) -> float:
    """w(s): "sqrt" 1/sqrt(1+s) (the paper's default), "constant" 1, "polynomial" (1+s)^-exponent."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if kind == "constant":
        return 1.0
    if kind == "sqrt":
        return 1.0 / math.sqrt(1.0 + staleness)
    if kind == "polynomial":
        return (1.0 + staleness) ** -exponent
    raise ValueError(f"unknown staleness function {kind!r}: choose sqrt, constant or polynomial")


def buffered_step(global_params: Params, weighted_deltas: list[tuple[Params, float]], server_lr: float,
                  buffer_size: int) -> Params:
    """x + server_lr * sum_i w_i delta_i / buffer_size, in float64, cast back to each tensor's dtype."""
    out = {}
    for key, value in global_params.items():
        total = sum(delta[key].double() * weight for delta, weight in weighted_deltas)
        out[key] = (value.double() + server_lr * total / buffer_size).to(value.dtype)
    return out


def server_steps(cfg: ExperimentConfig) -> int:
    """The async run's length: fedbuff.server_steps, else ceil(train.rounds * m / K) with m the clients a
    synchronous round samples: the same number of applied client updates as the synchronous run."""
    fb = cfg.fedbuff
    if fb.server_steps is not None:
        return fb.server_steps
    per_round = max(int(math.floor(cfg.federation.client_fraction * cfg.federation.num_clients)), 1)
    return max(math.ceil(cfg.train.rounds * per_round / fb.buffer_size), 1)


def eval_every_steps(cfg: ExperimentConfig) -> int:
    return cfg.fedbuff.eval_every_steps or cfg.evaluation.every


def concurrency(cfg: ExperimentConfig) -> int:
    """Clients training at once: fedbuff.concurrency, else runtime.num_actors (at most the federation)."""
    return min(cfg.fedbuff.concurrency or cfg.runtime.num_actors, cfg.federation.num_clients)


@dataclass
class Applied:
    """One buffered update: which task of which client, trained from which version, and its weight."""
    client_id: int
    task_id: int
    staleness: int
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)


class FedBuffServer:
    """The global prompt, its version (server steps so far), the versions in-flight tasks were sent, and
    the buffer. `send` before a task starts; `receive` its upload (or `forget` a lost task) exactly once.

    Only the versions an in-flight task still needs are kept (at most `concurrency` of them).
    """

    def __init__(self, params: Params, fb: FedBuffConfig, step: int = 0) -> None:
        self.params = params
        self.fb = fb
        self.step = step
        self._sent: dict[int, int] = {}  # in-flight task -> version it was sent
        self._versions: dict[int, Params] = {step: params}
        self.buffer: list[tuple[Params, Applied]] = []
        self.stale_dropped = 0  # updates dropped for staleness since the last step
        self.staleness_seen: Counter[int] = Counter()  # staleness of every received update (applied or dropped)

    def send(self, task_id: int) -> tuple[int, Params]:
        """Record that task `task_id` starts from the current global prompt; (version, params)."""
        self._sent[task_id] = self.step
        self._versions.setdefault(self.step, self.params)
        return self.step, self.params

    def forget(self, task_id: int) -> None:
        """Task `task_id` was lost (its actor died, or it failed): nothing of it is buffered."""
        self._sent.pop(task_id, None)
        self._release()

    def _release(self) -> None:
        needed = set(self._sent.values()) | {self.step}
        for version in [v for v in self._versions if v not in needed]:
            del self._versions[version]

    def receive(self, task_id: int, client_id: int, upload: Params, metrics: dict[str, float] | None = None
                ) -> list[Applied] | None:
        """Buffer task `task_id`'s upload (or drop it, too stale). Returns the buffer's updates when this one
        filled it and the server stepped, else None."""
        version = self._sent.pop(task_id)
        staleness = self.step - version
        self.staleness_seen[min(staleness, self.fb.max_staleness + 1)] += 1  # above the maximum: one bucket
        base = self._versions[version]
        self._release()
        if staleness > self.fb.max_staleness:
            self.stale_dropped += 1
            return None
        weight = staleness_weight(staleness, self.fb.staleness, self.fb.staleness_exponent)
        delta = {k: upload[k].double() - base[k].double() for k in self.params}
        self.buffer.append((delta, Applied(client_id, task_id, staleness, weight, dict(metrics or {}))))
        if len(self.buffer) < self.fb.buffer_size:
            return None
        applied = [a for _, a in self.buffer]
        self.params = buffered_step(self.params, [(d, a.weight) for d, a in self.buffer], self.fb.server_lr,
                                    self.fb.buffer_size)
        self.step += 1
        self.buffer = []
        self._versions[self.step] = self.params
        self._release()
        return applied

    def in_flight(self) -> int:
        return len(self._sent)


def staleness_summary(applied: list[Applied]) -> dict[str, float]:
    """Mean and max staleness of a step's applied updates."""
    values = [a.staleness for a in applied]
    return {"async/staleness_mean": float(sum(values) / len(values)) if values else 0.0,
            "async/staleness_max": float(max(values, default=0))}


def staleness_histogram(counts: Counter[int] | dict[Any, int], max_staleness: int) -> dict[str, float]:
    """`async/staleness_count/<s>`: how many received updates had staleness s, for each s seen up to
    max_staleness, and `async/staleness_count/dropped` for those above it (at most max_staleness + 2 keys)."""
    return {f"async/staleness_count/{int(s) if int(s) <= max_staleness else 'dropped'}": float(n)
            for s, n in sorted(counts.items(), key=lambda item: int(item[0]))}
