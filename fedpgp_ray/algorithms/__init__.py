"""Algorithm registry: config `algorithm.name` -> Algorithm class."""
from __future__ import annotations

from fedpgp_ray.algorithms.base import Algorithm, FrozenEncoders, LossTerms, Params
from fedpgp_ray.algorithms.fedkgcoop import FedKgCoOp
from fedpgp_ray.algorithms.fedotp import FedOTP
from fedpgp_ray.algorithms.fedpgp import FedPGP
from fedpgp_ray.algorithms.fedprox import FedProx
from fedpgp_ray.algorithms.local import LocalCoOp
from fedpgp_ray.algorithms.promptfl import PromptFL
from fedpgp_ray.algorithms.zeroshot import ZeroShotClip
from fedpgp_ray.config import AlgorithmConfig, ConfigError

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (
    ZeroShotClip, LocalCoOp, PromptFL, FedProx, FedKgCoOp, FedOTP, FedPGP)}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Add an algorithm class to the registry under `cls.name` (usable as a decorator)."""
    ALGORITHMS[cls.name] = cls
    return cls


def build_algorithm(cfg: AlgorithmConfig) -> Algorithm:
    if cfg.name not in ALGORITHMS:
        raise ConfigError(f"config key 'algorithm.name' = {cfg.name!r} is unknown: choose one of "
                          f"{', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[cfg.name](cfg)


__all__ = ["ALGORITHMS", "Algorithm", "FrozenEncoders", "LossTerms", "Params", "build_algorithm",
           "register_algorithm"]
