"""Which exceptions mean bad input: printed as one `error: ...` line (exit code 2), never a traceback.

A low module: the CLI (run.py, compare.py) and the runtimes (a Ray client actor keeps such an error
to re-raise it on the driver) both import it. The error types are imported when asked for, so that
importing this module stays instant (no torch).
"""
from __future__ import annotations


# Exceptions of torch-backed modules that mean bad input: (module, name). Looked up only in modules
# already imported (one that is not cannot have raised), so a config error is reported without torch.
_USER_ERRORS = (("fedpgp_ray.checkpoint", "UnreadableCheckpoint"), ("fedpgp_ray.clip.backbone", "CheckpointError"),
                ("fedpgp_ray.data.base", "DataError"), ("fedpgp_ray.strategy", "RoundFailedError"),
                ("fedpgp_ray.tracking", "TrackingError"))


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean bad input (a config, a path, a dataset, run storage, a round that failed)."""
    import sys

    from fedpgp_ray.config import ConfigError
    from fedpgp_ray.storage import StorageError

    loaded = [getattr(sys.modules[module], name) for module, name in _USER_ERRORS if module in sys.modules]
    return (ConfigError, FileNotFoundError, StorageError, *loaded)


__all__ = ["user_errors"]
