"""One local Ray instance for several runs of one command (`run --algorithms`, `compare`).

Without a cluster to attach to, each run's RayRuntime would start and stop its own local Ray
(several seconds each, more on a loaded machine); started once here, every run attaches to it.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Iterator

from fedpgp_ray.config import ExperimentConfig


def start_ray_once(cfg: ExperimentConfig) -> bool:
    """With runtime.kind=ray and no cluster to attach to, start one local Ray for all runs (each run's
    runtime attaches to it instead of starting and stopping its own). True when started here."""
    if cfg.runtime.kind != "ray":
        return False
    import ray

    if ray.is_initialized() or cfg.runtime.address or os.environ.get("RAY_ADDRESS"):
        return False
    need = math.ceil(cfg.runtime.num_actors * cfg.runtime.num_cpus_per_actor)
    print(f"Ray: starting a local instance for all runs ({max(os.cpu_count() or 1, need)} CPUs; a few seconds)",
          file=sys.stderr, flush=True)
    from fedpgp_ray.runtime.ray.placement import start_local_ray

    return start_local_ray(max(os.cpu_count() or 1, need))  # False: a `ray start` cluster each run attaches to


@contextlib.contextmanager
def one_ray_for_all_runs(cfgs: list[ExperimentConfig]) -> Iterator[None]:
    """Within this block the runs of `cfgs` share one local Ray instance (when they run on Ray)."""
    started = start_ray_once(cfgs[0]) if len(cfgs) > 1 else False
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()
