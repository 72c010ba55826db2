"""Where a workspace keeps its MLflow store when no store is named (docs/TRACKING.md, "Store").

The workspace is the directory commands run from. Every entry point (`fedpgp-ray run`,
`run --algorithms`, `compare`, `mlflow run`) resolves the same store there:

- output_dir inside the current directory (`runs/quickstart`): `<CWD>/mlflow.db`, which is also
  MLflow's own default, so `mlflow run`, `mlflow ui` and `models:/` URIs find it without settings;
- output_dir elsewhere (an absolute path outside the CWD): `<parent of output_dir>/mlflow.db`, so
  runs under one folder share a store;
- output_dir a URI (s3://, gs://), or inside a working directory that is Ray's temporary job
  package (`ray job submit --working-dir`, deleted with the job): `~/.fedpgp-ray/mlflow.db` on the
  driver's node, a place that outlives the job.

This module only computes the location; it imports nothing heavy.
"""
from __future__ import annotations

from pathlib import Path

from fedpgp_ray.storage import is_uri

DB_FILE = "mlflow.db"
PERSISTENT_HOME = Path("~/.fedpgp-ray")  # expanded on use: the driver's home, not the importer's
RAY_JOB_MARKERS = ("_ray_pkg_", "runtime_resources")  # path parts of Ray's per-job copies


def in_ray_job_package(path: str | Path) -> bool:
    """True for a path inside a Ray job's temporary package (deleted with the job, shared by
    every job with the same working_dir)."""
    return any(marker in part for part in Path(path).parts for marker in RAY_JOB_MARKERS)


def persistent_store_path() -> Path:
    """`~/.fedpgp-ray/mlflow.db` on this (the driver's) node."""
    return PERSISTENT_HOME.expanduser() / DB_FILE


def default_store_path(output_dir: str | Path, cwd: Path | None = None) -> Path:
    """The SQLite file of the default tracking store for a run writing into `output_dir`."""
    cwd = (cwd or Path.cwd()).resolve()
    if is_uri(output_dir):
        return persistent_store_path()
    out = Path(output_dir).expanduser()
    out = (cwd / out).resolve() if not out.is_absolute() else out.resolve()
    if out != cwd and out.is_relative_to(cwd):
        return persistent_store_path() if in_ray_job_package(cwd) else cwd / DB_FILE
    return out.parent / DB_FILE
