"""Where the actors run: attach to (or start) Ray, size the actors' GPU share, place their bundles."""
from __future__ import annotations

import contextlib
import math
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Iterator

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
        try:
            with loopback_mode(address):
                ray.init(address=address)  # attaching: never pass num_cpus/num_gpus
        except ConnectionError as err:
            raise attach_error(address, err) from None
        return False
    need = math.ceil(num_actors * rc.num_cpus_per_actor)
    status(f"Ray: starting a local instance ({max(os.cpu_count() or 1, need)} CPUs; a few seconds)")
    if start_local_ray(max(os.cpu_count() or 1, need)):
        return True
    ray.init()  # a `ray start` cluster on this machine: attach to it
    return False


def attach_error(address: str, err: ConnectionError) -> ConfigError:
    """The one line for a cluster that answered but did not let this driver join."""
    detail = f"{err} {err.__cause__ or ''}"
    if "InvalidAuthToken" in detail or "AuthenticationError" in detail:
        return ConfigError(f"the Ray cluster at {address} refused this driver's token (InvalidAuthToken): use the "
                           f"token of the cluster (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token as on "
                           f"the machine that started it; `ray get-auth-token` prints it there)")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(f"cannot attach to the Ray cluster at {address} ({first}): check that it is the head's GCS "
                       f"address (host:port, default port 6379) and that the cluster runs Ray {ray.__version__}")


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


@contextlib.contextmanager
def loopback_mode(address: str) -> Iterator[None]:
    """Attach to a loopback address as it is: without single-node mode Ray replaces 127.0.0.1 by this
    machine's own network address, where a head started on loopback does not listen (a silent hang)."""
    host = address.rpartition(":")[0].strip("[]")
    if os.environ.get(LOOPBACK_ENV) is not None or host not in ("127.0.0.1", "localhost", "::1"):
        yield
        return
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        os.environ.pop(LOOPBACK_ENV, None)
        ray_constants.ENABLE_RAY_CLUSTER = saved


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
