"""What a tracked run records besides its metrics: the data it used as an MLflow dataset input
(`mlflow.data`), and, when asked for, system metrics (`tracking.system_metrics`). Driver only;
imports mlflow only when called (tracking on)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fedpgp_ray.config import ExperimentConfig, config_to_dict

DATASET_CONTEXT = "federated"  # one input: every client's train and test data come from it


def dataset_digest(cfg: ExperimentConfig) -> str:
    """Equal digests = identical clients, classes and images: the data and federation sections and
    the seed (the partition depends on nothing else)."""
    doc = config_to_dict(cfg)
    task = {"data": doc["data"], "federation": doc["federation"], "seed": doc["seed"]}
    return hashlib.sha256(json.dumps(task, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataset_input(cfg: ExperimentConfig) -> Any:
    """The run's data as an `mlflow.entities.DatasetInput`: named `<dataset>-<partition>`, its source
    the data root (real datasets) or the generator (the procedural world), its digest the task's."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    if cfg.data.root:
        from mlflow.data.artifact_dataset_sources import LocalArtifactDatasetSource

        source = LocalArtifactDatasetSource(str(Path(cfg.data.root).expanduser()))
    else:
        from mlflow.data.code_dataset_source import CodeDatasetSource

        source = CodeDatasetSource({"generator": f"fedpgp_ray.data ({cfg.data.dataset}, generated, no files)"})
    dataset = MetaDataset(source, name=f"{cfg.data.dataset}-{cfg.data.partition}", digest=dataset_digest(cfg))
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", DATASET_CONTEXT)])


def start_system_metrics(run_id: str, uri: str, resume: bool) -> Any:
    """MLflow's system metrics monitor on this run (`system/*`, every 10 s); call `.finish()` at the end."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=uri)
    monitor.start()
    return monitor
