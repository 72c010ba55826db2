"""FedKgCoOp: PromptFL plus KgCoOp's knowledge-guided term.

    L = CE + W * (1 - mean_c cos(f_c, f_c^clip))

f_c: the learned context's class feature; f_c^clip: zero-shot CLIP's feature of the
hand-crafted "a photo of a {c}." (frozen, cached once per class list). The term keeps the
learned class features close to CLIP's general knowledge, which is what helps on unseen
classes. W = config `algorithm.kg_weight` (default 8). The context is global (FedAvg'd)
exactly as in PromptFL; a prox_mu > 0 in the config adds PromptFL's proximal term too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fedpgp_ray.algorithms.base import FrozenEncoders, LossTerms, Params
from fedpgp_ray.algorithms.promptfl import PromptFL, proximal_term

TEMPLATE = "a photo of a {}."


def kg_term(features: torch.Tensor, clip_features: torch.Tensor, weight: float) -> torch.Tensor:
    """W * (1 - mean_c cos(f_c, f_c^clip)) for [n_cls, D] features (normalised here, not assumed)."""
    cos = (F.normalize(features, dim=-1) * F.normalize(clip_features.detach(), dim=-1)).sum(-1)
    return weight * (1.0 - cos.mean())


class FedKgCoOp(PromptFL):
    name = "fedkgcoop"

    def loss(self, enc: FrozenEncoders, params: Params, image_features: torch.Tensor, labels: torch.Tensor,
             classnames: list[str], global_start: Params) -> LossTerms:
        features = self.class_features(enc, params, classnames)
        logits = enc.clip.logit_scale * image_features @ features.t()
        ce = F.cross_entropy(logits, labels)
        kg = kg_term(features, enc.handcrafted_features(classnames, TEMPLATE), self.cfg.kg_weight)
        total, parts = ce + kg, {"ce": ce, "kg": kg}
        if self.cfg.prox_mu > 0:
            prox = proximal_term(params["ctx"], global_start["ctx"], self.cfg.prox_mu)
            total, parts = total + prox, {**parts, "prox": prox}
        return LossTerms(total, parts)
