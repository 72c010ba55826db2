"""Where the actors run: attach to (or start) Ray, size the actors' GPU share, place their bundles."""
from __future__ import annotations

import math
import os
import socket
import time
import warnings
from pathlib import Path

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
        check_reachable(address, rc.connect_timeout_s)
        ray.init(address=address)  # attaching: never pass num_cpus/num_gpus
        return False
    need = math.ceil(num_actors * rc.num_cpus_per_actor)
    status(f"Ray: starting a local instance ({max(os.cpu_count() or 1, need)} CPUs; a few seconds)")
    if start_local_ray(max(os.cpu_count() or 1, need)):
        return True
    ray.init()  # a `ray start` cluster on this machine: attach to it
    return False


def check_reachable(address: str, timeout_s: float) -> None:
    """ConnectionError-free start: Ray retries an address where nothing listens for ever, so first wait (at
    most `timeout_s`, runtime.connect_timeout_s) for its GCS port to accept a TCP connection; else one line."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():  # "auto", ray://..., a bare host: Ray's own rules
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ConfigError(f"cannot reach the Ray cluster at {address} (runtime.address or RAY_ADDRESS) "
                                  f"within runtime.connect_timeout_s={timeout_s:g}s ({err.strerror or err}): start "
                                  f"the cluster (`ray start --head`), fix the address (host:port of its GCS, "
                                  f"default port 6379), or leave it unset to start a local Ray") from None
            time.sleep(1.0)


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-node mode, every port on 127.0.0.1


def start_local_ray(num_cpus: int) -> bool:
    """Start a local single-node Ray whose ports all listen on 127.0.0.1 only (Ray's single-node mode,
    unless the user set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER); False (nothing started) when a `ray start`
    cluster on this machine exists, which Ray then attaches to instead (it refuses num_cpus)."""
    from ray._private import ray_constants

    saved = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    if saved[0] is None:  # read by this process (node address) and by the GCS and raylet it starts
        os.environ[LOOPBACK_ENV] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    except ValueError as err:
        if "num_cpus" not in str(err):
            raise
        return False
    finally:  # the started processes keep it; a later attach from this process must not
        if saved[0] is None:
            os.environ.pop(LOOPBACK_ENV, None)
            ray_constants.ENABLE_RAY_CLUSTER = saved[1]
    protect_token_file()
    return True


def protect_token_file() -> None:
    """Ray writes the token of a new local instance readable by everyone (0644): make it the user's only."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        if path.is_file() and path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except OSError:  # not ours to change: leave it (docs/RAY.md says how)
        pass


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
