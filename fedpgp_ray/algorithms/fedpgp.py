"""FedPGP: a global prompt sigma plus a personal low-rank term U V (SPEC.md).

Client i classifies with C_i = sigma + U_i V_i. The loss is CE on that classifier plus
mu times a prompt-wise contrastive term that pulls sigma's class features towards the
frozen CLIP features f0 and away from the personalised ones fp. Only sigma is global.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fedpgp_ray.algorithms.base import Algorithm, FrozenEncoders, LossTerms, Params, normal_init


def contrastive_loss(fs: torch.Tensor, f0: torch.Tensor, fp: torch.Tensor, tau: float) -> torch.Tensor:
    """mean_c -log(e^pos / (e^pos + e^neg)), pos = cos(fs, f0)/tau, neg = cos(fs, fp)/tau.

    All inputs are [n_cls, D] and already L2-normalised, so the dot product is the cosine.
    """
    pos = (fs * f0).sum(-1) / tau
    neg = (fs * fp).sum(-1) / tau
    return -(pos - torch.logsumexp(torch.stack([pos, neg]), dim=0)).mean()


def fedpgp_loss(logit_scale: float, image_features: torch.Tensor, labels: torch.Tensor, fs: torch.Tensor,
                f0: torch.Tensor, fp: torch.Tensor, mu: float, tau: float) -> LossTerms:
    """L = CE(scale * g(x) fp^T, y) + mu * contrastive(fs, f0, fp)."""
    ce = F.cross_entropy(logit_scale * image_features @ fp.t(), labels)
    con = contrastive_loss(fs, f0, fp, tau)
    return LossTerms(ce + mu * con, {"ce": ce, "con": con})


class FedPGP(Algorithm):
    name = "fedpgp"
    global_keys = ("sigma",)
    personal_keys = ("U", "V")

    def init_global(self, width: int, generator: torch.Generator) -> Params:
        return {"sigma": normal_init((self.cfg.n_ctx, width), self.cfg.init_std, generator)}

    def init_personal(self, width: int, generator: torch.Generator) -> Params:
        std, r = self.cfg.init_std, self.cfg.rank
        return {"U": normal_init((self.cfg.n_ctx, r), std, generator),
                "V": normal_init((r, width), std, generator)}

    def class_features(self, enc: FrozenEncoders, params: Params, classnames: list[str]) -> torch.Tensor:
        ctx = params["sigma"] + params["U"] @ params["V"]
        return enc.text.encode(ctx, enc.prompts(classnames))

    def global_classifier(self, global_params: Params) -> Params:
        """sigma alone: U = 0 and V = 0 make the personal term exactly zero (ctx = sigma)."""
        sigma = global_params["sigma"]
        return {"sigma": sigma, "U": sigma.new_zeros(sigma.shape[0], self.cfg.rank),
                "V": sigma.new_zeros(self.cfg.rank, sigma.shape[1])}

    def loss(self, enc: FrozenEncoders, params: Params, image_features: torch.Tensor, labels: torch.Tensor,
             classnames: list[str], global_start: Params) -> LossTerms:
        if self.cfg.mu == 0:  # ablation: no contrastive term, so no sigma-only pass either
            return super().loss(enc, params, image_features, labels, classnames, global_start)
        # sigma + U V and sigma in one batched text pass (same features as two passes)
        sigma = params["sigma"]
        fp, fs = enc.text.encode_many([sigma + params["U"] @ params["V"], sigma], enc.prompts(classnames))
        f0 = enc.placeholder_features(classnames)
        return fedpgp_loss(enc.clip.logit_scale, image_features, labels, fs, f0, fp, self.cfg.mu, self.cfg.tau)
