"""Plugin tests: run in the FedML environment (`.venv-fedml/bin/python -m pytest plugins/fedml/tests`).

Before anything imports FedML: HOME, the feature cache and FedML's home folder point at a temporary
directory, so nothing is written under ~/.fedml or ~/.cache.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest

_ROOT = Path(tempfile.mkdtemp(prefix="fedpgp-fedml-tests-"))
os.environ["HOME"] = str(_ROOT / "home")
os.environ["FEDPGP_CACHE_DIR"] = str(_ROOT / "features")
os.environ["FEDPGP_FEDML_HOME"] = str(_ROOT / "fedml-home")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
(_ROOT / "home").mkdir(parents=True)

try:  # only the FedML environment (make fedml-env) can run these tests: elsewhere they fail, never skip
    with warnings.catch_warnings():  # FedML 0.9.6's own deprecation noise (pkg_resources, pydantic v1, ...)
        warnings.simplefilter("ignore")
        import fedml as _fedml  # noqa: F401
except ImportError as err:
    raise pytest.UsageError(f"plugins/fedml/tests need FedML ({err}): run them in the FedML environment, "
                            f"`make fedml-env && .venv-fedml/bin/python -m pytest plugins/fedml/tests`") from None


@pytest.fixture(scope="session")
def root() -> Path:
    return _ROOT


@pytest.fixture(scope="session", autouse=True)
def fixed_backbone():
    """A seeded random fedpgp-tiny checkpoint used as model.pretrained by every test config.

    With `pretrained: null` each process (and each Ray actor) draws its own random CLIP weights from
    torch's unseeded global RNG, so runs in different processes could not be compared; a checkpoint
    file gives every process the same backbone.
    """
    import open_clip
    import torch

    import _support
    from fedpgp_ray.clip.backbone import register_project_models

    register_project_models()
    path = _ROOT / "fedpgp-tiny-seed0.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(_support.SMALL["model_args"]["model"], pretrained=None)
    torch.save(model.state_dict(), path)
    _support.SMALL["fedpgp_args"]["fedpgp_config"]["model"]["pretrained"] = str(path)
    return path


@pytest.fixture(scope="session")
def registered():
    """fedpgp_fedml.register() for the session (unregistered at the end)."""
    import fedpgp_fedml
    fedpgp_fedml.register()
    yield fedpgp_fedml
    fedpgp_fedml.unregister()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_ROOT, ignore_errors=True)


class _Capture:
    """RoundListener keeping the global params after every round."""

    def __init__(self):
        self.params = {}

    def on_round(self, report, global_params):
        self.params[report.round] = {k: v.detach().cpu().clone() for k, v in global_params.items()}


@pytest.fixture(scope="session")
def sp_run(registered):
    """FedPGP through FedMLRunner by name (backend sp, fedpgp_runtime local) on SMALL."""
    import time

    import fedml
    from _support import SMALL
    args = registered.load_arguments(SMALL)
    dataset, model = registered.load_data(args), registered.create_model(args)
    began = time.perf_counter()
    runner = fedml.FedMLRunner(args, fedml.device.get_device(args), dataset, model)
    runner.run()
    return {"args": args, "runner": runner, "simulator": runner.runner.fl_trainer,
            "seconds": time.perf_counter() - began}


@pytest.fixture(scope="session")
def own_run(registered):
    """Our own in-process run (run_federation + local runtime) of the same experiment as sp_run."""
    import time

    from fedpgp_ray.federation import run_federation
    from fedpgp_ray.runtime import build_runtime
    from fedpgp_ray.run import feature_cache_dir
    from _support import SMALL
    cfg = registered.experiment_config_from_args(registered.load_arguments(SMALL))
    assert cfg.runtime.kind == "local"
    capture = _Capture()
    began = time.perf_counter()
    with build_runtime(cfg, None, feature_cache_dir()) as runtime:
        results = run_federation(cfg, runtime, None, [capture])
    return {"cfg": cfg, "results": results, "params": capture.params, "seconds": time.perf_counter() - began}
