"""FedProx on PromptFL: one FedAvg'd CoOp context plus (mu/2) ||ctx - ctx_global||^2.

mu comes from config `algorithm.prox_mu`. That key defaults to 0, which for "promptfl" means
plain PromptFL; asking for "fedprox" with prox_mu = 0 would silently be PromptFL again, so
"fedprox" then uses DEFAULT_PROX_MU = 0.01 instead (FedProx's usual small value). To run
FedProx with another mu, set algorithm.prox_mu > 0 (in `fedpgp-ray compare`, per algorithm:
`fedprox:prox_mu=0.1`, which leaves promptfl plain).
"""
from __future__ import annotations

import dataclasses

from fedpgp_ray.algorithms.promptfl import PromptFL
from fedpgp_ray.config import AlgorithmConfig

DEFAULT_PROX_MU = 0.01


def effective_prox_mu(cfg: AlgorithmConfig) -> float:
    """The mu FedProx trains with: algorithm.prox_mu when > 0, else DEFAULT_PROX_MU."""
    return cfg.prox_mu if cfg.prox_mu > 0 else DEFAULT_PROX_MU


class FedProx(PromptFL):
    """PromptFL whose loss always includes the proximal term (see module docstring for mu)."""
    name = "fedprox"

    def __init__(self, cfg: AlgorithmConfig) -> None:
        super().__init__(dataclasses.replace(cfg, prox_mu=effective_prox_mu(cfg)))
