"""Zero-shot CLIP: hand-crafted "a photo of a {c}." prompts, no training."""
from __future__ import annotations

import torch

from fedpgp_ray.algorithms.base import Algorithm, FrozenEncoders, Params


class ZeroShotClip(Algorithm):
    name = "clip"
    trains = False
    template = "a photo of a {}."

    def class_features(self, enc: FrozenEncoders, params: Params, classnames: list[str]) -> torch.Tensor:
        return enc.handcrafted_features(classnames, self.template)
