"""PromptFL (one CoOp context, FedAvg'd), with an optional FedProx proximal term."""
from __future__ import annotations

import torch

from fedpgp_ray.algorithms.base import Algorithm, FrozenEncoders, LossTerms, Params, normal_init


def proximal_term(ctx: torch.Tensor, ctx_global: torch.Tensor, mu: float) -> torch.Tensor:
    """FedProx: (mu / 2) * ||ctx - ctx_global||^2."""
    return 0.5 * mu * (ctx - ctx_global.detach()).pow(2).sum()


class PromptFL(Algorithm):
    name = "promptfl"
    global_keys = ("ctx",)

    def init_global(self, width: int, generator: torch.Generator) -> Params:
        return {"ctx": normal_init((self.cfg.n_ctx, width), self.cfg.init_std, generator)}

    def class_features(self, enc: FrozenEncoders, params: Params, classnames: list[str]) -> torch.Tensor:
        return enc.text.encode(params["ctx"], enc.prompts(classnames))

    def loss(self, enc: FrozenEncoders, params: Params, image_features: torch.Tensor, labels: torch.Tensor,
             classnames: list[str], global_start: Params) -> LossTerms:
        terms = super().loss(enc, params, image_features, labels, classnames, global_start)
        if self.cfg.prox_mu > 0:
            prox = proximal_term(params["ctx"], global_start["ctx"], self.cfg.prox_mu)
            terms = LossTerms(terms.total + prox, {**terms.parts, "prox": prox})
        return terms
