"""FedML's `model` argument for our algorithms: the global prompt parameters only (FedPGP: sigma).

FedML moves `model` to a device, hands it to trainers and aggregators and may probe it; the frozen
CLIP and the personal parameters (U, V) live in each client's ClientWorker and never appear here.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from fedpgp_ray.algorithms import Params, build_algorithm
from fedpgp_ray.client import init_global_params
from fedpgp_ray.config import ExperimentConfig


def text_width(model_name: str) -> int:
    """Width of the prompt context vectors: the text tower's token-embedding width (no weights loaded)."""
    import open_clip

    from fedpgp_ray.clip.backbone import register_project_models

    register_project_models()
    cfg = open_clip.get_model_config(model_name)
    if not cfg or "text_cfg" not in cfg or "width" not in cfg["text_cfg"]:
        from fedpgp_ray.clip.backbone import load_clip
        from fedpgp_ray.config import ModelConfig
        clip = load_clip(ModelConfig(name=model_name, pretrained=None), "cpu")
        return int(clip.model.token_embedding.weight.shape[1])
    return int(cfg["text_cfg"]["width"])


class GlobalPromptModel(nn.Module):
    """The global prompt parameters of `cfg.algorithm`, seeded exactly as our runs seed them."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        algorithm = build_algorithm(cfg.algorithm)
        if not algorithm.global_keys:
            raise ValueError(f"algorithm {cfg.algorithm.name!r} has no global parameters: nothing to federate")
        self.global_keys = tuple(algorithm.global_keys)
        initial = init_global_params(algorithm, text_width(cfg.model.name), cfg.seed)
        self.prompts = nn.ParameterDict({k: nn.Parameter(v.clone(), requires_grad=False) for k, v in initial.items()})

    def global_params(self) -> "OrderedDict[str, torch.Tensor]":
        """A CPU copy, as an OrderedDict (FedML treats a plain dict as per-client models)."""
        return OrderedDict((k, self.prompts[k].detach().cpu().clone()) for k in self.global_keys)

    def load_global(self, params: Params) -> None:
        with torch.no_grad():
            for k in self.global_keys:
                self.prompts[k].copy_(params[k].to(self.prompts[k].device, self.prompts[k].dtype))

    def forward(self, *inputs: Any) -> torch.Tensor:
        raise NotImplementedError("GlobalPromptModel holds only the global prompt; classification needs the frozen "
                                  "CLIP and a client's personal prompt: use FedPGPClientTrainer.test")


def create_model(args: Any) -> GlobalPromptModel:
    """FedML's `model` for a fedpgp_fedml config (the counterpart of fedml.model.create)."""
    from fedpgp_fedml.config import experiment_config_from_args

    return GlobalPromptModel(experiment_config_from_args(args))
