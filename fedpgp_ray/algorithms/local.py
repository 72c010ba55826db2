"""Local: CoOp trained on each client alone; its context is personal and never aggregated."""
from __future__ import annotations

import torch

from fedpgp_ray.algorithms.base import Algorithm, FrozenEncoders, Params, normal_init


class LocalCoOp(Algorithm):
    name = "local"
    personal_keys = ("ctx",)

    def init_personal(self, width: int, generator: torch.Generator) -> Params:
        return {"ctx": normal_init((self.cfg.n_ctx, width), self.cfg.init_std, generator)}

    def class_features(self, enc: FrozenEncoders, params: Params, classnames: list[str]) -> torch.Tensor:
        return enc.text.encode(params["ctx"], enc.prompts(classnames))
