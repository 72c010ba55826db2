"""Where the actors run: attach to (or start) Ray, size the actors' GPU share, place their bundles."""
from __future__ import annotations

import math
import os
import warnings

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from fedpgp_ray.config import ConfigError, ExperimentConfig, RuntimeConfig
from fedpgp_ray.runtime.base import status


class PlacementError(ConfigError):
    """The client actors' resources cannot be placed on the Ray cluster (in time)."""


class GpuFallbackWarning(RuntimeWarning):
    """GPUs were requested for client actors but they run on CPU."""


def connect(rc: RuntimeConfig, num_actors: int) -> bool:
    """Attach to (or start) Ray; True when this call started the instance it uses."""
    if ray.is_initialized():
        return False
    address = rc.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        status(f"Ray: attaching to the cluster at {address}")
        ray.init(address=address)  # attaching: never pass num_cpus/num_gpus
        return False
    need = math.ceil(num_actors * rc.num_cpus_per_actor)
    status(f"Ray: starting a local instance ({max(os.cpu_count() or 1, need)} CPUs; a few seconds)")
    try:
        # Starts a local instance, unless `ray start` left a cluster address on this machine,
        # in which case Ray refuses num_cpus and we attach to that cluster instead.
        ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False)
        return True
    except ValueError as err:
        if "num_cpus" not in str(err):
            raise
        ray.init()
        return False


def gpus_per_actor(cfg: ExperimentConfig) -> float:
    """Requested GPU share per actor; 0 (one warning) when the cluster has no GPU: Ray would
    leave GPU actors pending forever."""
    want = cfg.runtime.num_gpus_per_actor if cfg.model.device != "cpu" else 0.0
    have = ray.cluster_resources().get("GPU", 0)
    if want > 0 and have <= 0:
        if cfg.model.device == "cuda":
            raise ConfigError("model.device is 'cuda' but the Ray cluster has no GPU: use model.device: auto "
                              "(CPU fallback) or add GPU nodes")
        warnings.warn(f"runtime.num_gpus_per_actor={want} but the Ray cluster has no GPU: client actors run "
                      f"on CPU", GpuFallbackWarning, stacklevel=3)
        return 0.0
    return want


def actor_bundle(rc: RuntimeConfig, gpus: float) -> dict[str, float]:
    """The resources of one client actor (one placement-group bundle)."""
    bundle = {"CPU": float(rc.num_cpus_per_actor)}
    if gpus > 0:
        bundle["GPU"] = float(gpus)
    return bundle


def place_actors(rc: RuntimeConfig, num_actors: int, bundle: dict[str, float]) -> PlacementGroup:
    """A placement group of `num_actors` bundles, or PlacementError within runtime.placement_timeout_s."""
    status(f"Ray: placing {num_actors} client actors ({bundle} each)")
    pg = placement_group([dict(bundle) for _ in range(num_actors)], strategy="PACK")
    if not pg.wait(timeout_seconds=rc.placement_timeout_s):
        total = {k: v * num_actors for k, v in bundle.items()}
        have = {k: ray.cluster_resources().get(k, 0) for k in bundle}
        free = {k: ray.available_resources().get(k, 0) for k in bundle}
        remove_placement_group(pg)
        raise PlacementError(
            f"cannot place {num_actors} client actors with {bundle} each (total {total}) within "
            f"runtime.placement_timeout_s={rc.placement_timeout_s:g}s: the Ray cluster has {have} "
            f"({free} free). Lower runtime.num_actors, runtime.num_cpus_per_actor or "
            f"runtime.num_gpus_per_actor, add nodes, free resources held by other jobs, or raise "
            f"runtime.placement_timeout_s if the cluster is busy or autoscaling")
    return pg
