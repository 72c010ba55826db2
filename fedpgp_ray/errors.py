"""Which exceptions mean bad input: printed as one `error: ...` line (exit code 2), never a traceback.

A low module: the CLI (run.py, compare.py) and the runtimes (a Ray client actor keeps such an error
to re-raise it on the driver) both import it. The error types are imported when asked for, so that
importing this module stays instant (no torch).
"""
from __future__ import annotations


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean bad input (a config, a path, a dataset, run storage, a round that failed)."""
    from fedpgp_ray.checkpoint import UnreadableCheckpoint
    from fedpgp_ray.clip.backbone import CheckpointError
    from fedpgp_ray.config import ConfigError
    from fedpgp_ray.data.base import DataError
    from fedpgp_ray.storage import StorageError
    from fedpgp_ray.strategy import RoundFailedError
    from fedpgp_ray.tracking import TrackingError

    return (ConfigError, DataError, CheckpointError, RoundFailedError, FileNotFoundError, TrackingError,
            UnreadableCheckpoint, StorageError)


__all__ = ["user_errors"]
