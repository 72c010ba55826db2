"""What a FedML run shows and keeps, on the server side only (the sp driver or cross-silo rank 0).

* a table row per round as it ends, labelled as `fedpgp-ray run` labels rounds (round 0 = the
  initial prompt, before any training; round r = after r rounds of training and aggregation);
* at the end, the final Local / Base / Novel / HM3 / HM2 table (`fedpgp_ray.run.format_table`);
* the run layout `fedpgp-ray run` writes, in the run directory (`fedpgp_output_dir`, our
  `output_dir`): `config.yaml` (the resolved config), `checkpoints/server/round_<r>.pt` (global
  params + history, each round), results.json, the CSV / Markdown tables and the figures; the
  clients' personal states go to `checkpoints/clients/<id>/` from wherever they train
  (`fedpgp_fedml.trainer`), so `fedpgp-ray predict --run DIR` and the MLflow models work as for a
  Ray run;
* an MLflow run (`fedpgp_config.tracking`, on by default; the store rule is ours, the workspace's
  store `fedpgp_ray.workspace`: `./mlflow.db` for an output_dir under the current directory,
  unless MLFLOW_TRACKING_URI or tracking.uri say otherwise), logged through our tracker
  (`fedpgp_ray.tracking`).

Clients never write any of this: in cross-silo they send their evaluation to the server with
their upload (see `fedpgp_fedml.trainer` and `fedpgp_fedml.registry`).
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict
from typing import Any, Iterator

import yaml

from fedpgp_ray.config import ExperimentConfig, config_to_dict
from fedpgp_ray.federation import RoundReport, results_document

COLUMNS = (("train_loss", "loss", ".3f"), ("local", "Local", ".2f"), ("base", "Base", ".2f"),
           ("novel", "Novel", ".2f"), ("hm3", "HM3", ".2f"), ("hm2", "HM2", ".2f"),
           ("round_seconds", "seconds", ".1f"))


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(float(value), fmt)


@contextlib.contextmanager
def sigterm_as_ctrl_c(output_dir: str | None) -> Iterator[None]:
    """Within this block SIGTERM (docker, systemd, Kubernetes, a scheduler) stops the server side as Ctrl-C
    does (`fedpgp_ray.run.stop_now`): one line, the MLflow run ended KILLED, exit 143 (Ctrl-C: 130), at
    once (FedML's communication threads would keep the process alive). FedML has no resume, so the line
    says to start over."""
    from fedpgp_ray.run import Terminated, raise_terminated, stop_now

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main else None
    try:
        yield
    except KeyboardInterrupt as err:
        kept = f" (the completed rounds' checkpoints stay in {output_dir})" if output_dir else ""
        stop_now(143 if isinstance(err, Terminated) else 130,
                 f"the MLflow run ends KILLED; a FedML run does not resume: run the command again to start over{kept}")
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


class ServerReport:
    """A round listener (on_round) plus `finish`: the table, the files and the MLflow run of one run."""

    def __init__(self, cfg: ExperimentConfig, title: str) -> None:
        from fedpgp_ray.tracking import mlflow_listeners

        self.cfg = cfg
        self.title = title
        self.began = time.perf_counter()
        self.history: list[RoundReport] = []
        self.trackers = mlflow_listeners(cfg, False)  # TrackingError here: before any training
        self._header_printed = False
        from fedpgp_ray.checkpoint import CheckpointStore
        from fedpgp_ray.storage import RunStorage

        self.storage = RunStorage(cfg.output_dir)
        self.storage.makedirs()
        previous = self.storage.local_path("checkpoints")
        if previous is not None and previous.is_dir():  # FedML has no resume: a new run replaces the old one's
            shutil.rmtree(previous)
        self.storage.write_text("config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        self.store = CheckpointStore(self.storage.child("checkpoints"))

    def _print(self, line: str) -> None:
        print(line, file=sys.stdout, flush=True)

    def on_round(self, report: RoundReport, global_params: Any) -> None:
        if not self._header_printed:
            last = self.cfg.train.rounds
            self._print(f"{self.title}: {last} rounds; round 0 = before training (the initial prompt)")
            self._print(f"{'round':>7}" + "".join(f"{label:>9}" for _, label, _ in COLUMNS))
            self._header_printed = True
        self.history.append(report)
        # the server checkpoint of `fedpgp-ray run` (fedpgp_ray.server.Server.finish_round), before the
        # trackers read it
        params = {k: v.detach().cpu() if hasattr(v, "detach") else v for k, v in dict(global_params).items()}
        self.store.save_server(report.round, {"global_params": params, "history": [asdict(h) for h in self.history]})
        m = report.metrics
        self._print(f"{report.round:>7}" + "".join(f"{_cell(m.get(key), fmt):>9}" for key, _, fmt in COLUMNS))
        for tracker in self.trackers:
            tracker.on_round(report, global_params)

    def finish(self, results: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write results.json, tables and figures, print the final table, close the MLflow run."""
        from fedpgp_ray.run import RESULTS_FILE, format_table, write_report

        if results is None:
            results = results_document(self.cfg, self.history, time.perf_counter() - self.began)
        storage = self.storage
        storage.write_text(RESULTS_FILE, json.dumps(results, indent=2))
        write_report(storage, results)
        self._print(format_table([results]))
        self._print(f"results: {storage.display(RESULTS_FILE)}")
        for tracker in self.trackers:
            tracker.on_end(results)
        return results
