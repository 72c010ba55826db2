"""What every prompt-learning algorithm provides, and the client-side training loop they share.

An algorithm says which prompt parameters are global (averaged by the server) and which are
personal (never leave the client), how to initialise them, its training loss, and the class
features it classifies with. Everything else (batches, optimizer, evaluation) is shared here.
This package never imports Ray, MLflow or FedML.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from fedpgp_ray.clip.backbone import ClassPrompts, FrozenClip, PromptTextEncoder
from fedpgp_ray.config import AlgorithmConfig

Params = dict[str, torch.Tensor]


class FrozenEncoders:
    """The frozen CLIP with its per-class-list caches (prompt tokens, f0, zero-shot features).

    Cached tensors are built outside inference mode (they are reused inside autograd graphs
    even when first requested during evaluation).
    """

    def __init__(self, clip: FrozenClip, n_ctx: int) -> None:
        self.clip = clip
        self.text = PromptTextEncoder(clip, n_ctx)
        self._prompts: dict[tuple[str, ...], ClassPrompts] = {}
        self._placeholder: dict[tuple[str, ...], torch.Tensor] = {}
        self._handcrafted: dict[tuple[str, ...], torch.Tensor] = {}

    @property
    def width(self) -> int:
        return self.text.width

    def prompts(self, classnames: list[str]) -> ClassPrompts:
        key = tuple(classnames)
        if key not in self._prompts:
            with torch.inference_mode(False):
                self._prompts[key] = self.text.prompts(classnames)
        return self._prompts[key]

    def placeholder_features(self, classnames: list[str]) -> torch.Tensor:
        """f0: features of the frozen "X X ... X {c}." prompts, computed once per class list."""
        key = tuple(classnames)
        if key not in self._placeholder:
            prompts = self.prompts(classnames)
            with torch.inference_mode(False):
                self._placeholder[key] = self.text.encode_placeholder(prompts)
        return self._placeholder[key]

    def handcrafted_features(self, classnames: list[str], template: str = "a photo of a {}.") -> torch.Tensor:
        """Zero-shot CLIP class features, computed once per class list."""
        key = (template, *classnames)
        if key not in self._handcrafted:
            texts = [template.format(c.replace("_", " ")) for c in classnames]
            with torch.inference_mode(False):
                self._handcrafted[key] = self.clip.encode_texts(texts)
        return self._handcrafted[key]


@dataclass
class LossTerms:
    """A training loss and its named parts (logged as loss_<name>)."""
    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class Algorithm(ABC):
    """A prompt-learning algorithm. Subclasses set `name` and implement the abstract methods.

    global_keys / personal_keys: names of the global (uploaded, aggregated) and personal
        (kept on the client) parameters. `trains` is False for zero-shot CLIP.
    """
    name: ClassVar[str]
    trains: ClassVar[bool] = True
    global_keys: ClassVar[tuple[str, ...]] = ()
    personal_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: AlgorithmConfig) -> None:
        self.cfg = cfg

    def init_global(self, width: int, generator: torch.Generator) -> Params:
        """The server's initial global parameters (same for every client)."""
        return {}

    def init_personal(self, width: int, generator: torch.Generator) -> Params:
        """A client's initial personal parameters."""
        return {}

    @abstractmethod
    def class_features(self, enc: FrozenEncoders, params: Params, classnames: list[str]) -> torch.Tensor:
        """Normalised classifier features [n_cls, D] from the merged global+personal params."""

    def loss(self, enc: FrozenEncoders, params: Params, image_features: torch.Tensor, labels: torch.Tensor,
             classnames: list[str], global_start: Params) -> LossTerms:
        """Training loss on a batch of cached image features; CE of `class_features` by default.

        global_start: the global params the client received this round (for proximal terms).
        """
        logits = enc.clip.logit_scale * image_features @ self.class_features(enc, params, classnames).t()
        ce = F.cross_entropy(logits, labels)
        return LossTerms(ce, {"ce": ce})

    def logits(self, enc: FrozenEncoders, params: Params, image_features: torch.Tensor,
               classnames: list[str]) -> torch.Tensor:
        """Evaluation logits; algorithms that use more than pooled image features override this."""
        return enc.clip.logit_scale * image_features @ self.class_features(enc, params, classnames).t()

    def global_classifier(self, global_params: Params) -> Params | None:
        """The params of the classifier the global parameters define on their own (the run's global
        model: what a client without personal training gets), or None when the algorithm's classifier
        needs personal parameters (Local, FedOTP)."""
        return dict(global_params) if not self.personal_keys else None


def normal_init(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * std
