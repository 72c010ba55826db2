"""Per-client results at any federation size: a Parquet file with every (round, client) row, and bounded
summaries (mean, standard error, percentiles, histogram) for results.json, MLflow and the figures.

results.json and MLflow list at most MAX_LISTED_CLIENTS clients per round (the lowest ids); the Parquet
file `clients.parquet` beside results.json (and in MLflow's artifacts) holds them all.
"""
from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

MAX_LISTED_CLIENTS = 32   # per-client entries in results.json / MLflow series / bar figures
PARQUET_FILE = "clients.parquet"
ACCURACY_KEYS = ("local", "base", "novel")
HISTOGRAM_BINS = 20       # 5-point bins over 0..100 %


def listed(clients: dict[Any, Any]) -> dict[Any, Any]:
    """The first MAX_LISTED_CLIENTS entries by client id (all of them when there are no more)."""
    if len(clients) <= MAX_LISTED_CLIENTS:
        return clients
    keep = sorted(clients, key=int)[:MAX_LISTED_CLIENTS]
    return {k: clients[k] for k in keep}


def accuracy_summary(per_client: dict[Any, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """For each accuracy: n clients, mean, its standard error (sample std / sqrt(n)) and 95% interval
    half-width (1.96 se), min / p10 / p50 / p90 / max, and a histogram (HISTOGRAM_BINS counts over 0..100)."""
    out: dict[str, dict[str, Any]] = {}
    for key in ACCURACY_KEYS:
        values = np.array([m[key] for m in per_client.values() if m.get(key) is not None], dtype=np.float64)
        values = values[~np.isnan(values)]
        if len(values) == 0:
            continue
        se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
        counts, _ = np.histogram(np.clip(values, 0, 100), bins=HISTOGRAM_BINS, range=(0.0, 100.0))
        out[key] = {"n": int(len(values)), "mean": float(values.mean()), "se": se, "ci95": 1.96 * se,
                    "min": float(values.min()), "p10": float(np.percentile(values, 10)),
                    "p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)),
                    "max": float(values.max()), "histogram": counts.tolist()}
    return out


def parquet_bytes(history: list[dict[str, Any]]) -> bytes:
    """Every (round, client) of the run's history as Parquet: columns round, client_id, then each metric
    (null where a client has none: a client only trained, or only evaluated, in a round)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rounds, ids, rows = [], [], []
    for report in history:
        for cid, metrics in report.get("clients", {}).items():
            rounds.append(int(report["round"]))
            ids.append(int(cid))
            rows.append(metrics)
    keys = sorted({k for m in rows for k in m})
    columns = {"round": pa.array(rounds, pa.int32()), "client_id": pa.array(ids, pa.int64())}
    for key in keys:
        columns[key] = pa.array([m.get(key) for m in rows], pa.float64())
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()
