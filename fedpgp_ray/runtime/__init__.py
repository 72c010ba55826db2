"""Runtime registry: config `runtime.kind` -> a Runtime factory (imported lazily: Ray is optional here)."""
from __future__ import annotations

import importlib

from fedpgp_ray.checkpoint import CheckpointStore
from fedpgp_ray.config import ConfigError, ExperimentConfig
from fedpgp_ray.runtime.base import Runtime

RUNTIMES: dict[str, str] = {
    "local": "fedpgp_ray.runtime.local:LocalRuntime",
    "ray": "fedpgp_ray.runtime.ray:RayRuntime",
}


def build_runtime(cfg: ExperimentConfig, store: CheckpointStore | None, cache_dir: str | None) -> Runtime:
    target = RUNTIMES.get(cfg.runtime.kind)
    if target is None:
        raise ConfigError(f"config key 'runtime.kind' = {cfg.runtime.kind!r} is unknown: choose one of "
                          f"{', '.join(RUNTIMES)}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(cfg, store, cache_dir)


__all__ = ["RUNTIMES", "Runtime", "build_runtime"]
