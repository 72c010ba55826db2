"""Shared fixtures: a tiny, fast experiment config on the procedural world with a random tiny CLIP."""
from __future__ import annotations

import os

import pytest

from fedpgp_ray.config import ExperimentConfig, config_from_dict

# One token for every Ray session a test process starts: Ray's driver reads the token once per process,
# so a second local instance started with another token would refuse that driver (Failed to start GCS).
RAY_SESSION_TOKEN = os.urandom(16).hex()

TINY = {
    "seed": 0,
    "model": {"name": "fedpgp-tiny", "pretrained": None},
    "data": {"dataset": "world", "shots": 4, "world": {"num_classes": 40, "train_per_class": 8, "test_per_class": 6}},
    "train": {"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.002},
    "federation": {"num_clients": 5},
    "tracking": {"mlflow": False},
}


@pytest.fixture(autouse=True, scope="session")
def _feature_cache(tmp_path_factory):
    """Image features are cached on disk: keep the tests' cache out of the user's home."""
    os.environ.setdefault("FEDPGP_CACHE_DIR", str(tmp_path_factory.mktemp("feature-cache")))


@pytest.fixture
def tiny_cfg(tmp_path) -> ExperimentConfig:
    return config_from_dict({**TINY, "output_dir": str(tmp_path / "run")})


def make_cfg(tmp_path, overrides: list[str] = ()) -> ExperimentConfig:
    return config_from_dict({**TINY, "output_dir": str(tmp_path / "run")}, list(overrides))
