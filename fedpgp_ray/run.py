"""Run an experiment: `python -m fedpgp_ray.run` (also the `ray job submit` entrypoint) and `fedpgp-ray run`.

    python -m fedpgp_ray.run [--config FILE] [--set key.path=value ...] [--output results.json]
                             [--algorithms clip,local,promptfl,fedpgp] [--resume RUN_DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from fedpgp_ray.algorithms import ALGORITHMS, Params
from fedpgp_ray.checkpoint import CheckpointStore
from fedpgp_ray.clip.backbone import CheckpointError
from fedpgp_ray.config import ConfigError, ExperimentConfig, config_to_dict, load_config
from fedpgp_ray.data.base import DataError
from fedpgp_ray.federation import RoundListener, RoundReport, num_rounds, run_federation
from fedpgp_ray.runtime import build_runtime
from fedpgp_ray.strategy import RoundFailedError
from fedpgp_ray.tracking import TrackingError, mlflow_listeners

USER_ERRORS = (ConfigError, DataError, CheckpointError, RoundFailedError, FileNotFoundError, TrackingError)
CONFIG_FILE = "config.yaml"


def feature_cache_dir() -> str:
    """Shared on-disk image-feature cache: $FEDPGP_CACHE_DIR, else ~/.cache/fedpgp-ray/features."""
    return os.environ.get("FEDPGP_CACHE_DIR") or str(Path.home() / ".cache" / "fedpgp-ray" / "features")


class ProgressBar:
    """A tqdm bar over rounds showing loss and accuracy."""

    def __init__(self, total: int, label: str, start: int = 0) -> None:
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=start, desc=label, unit="round", file=sys.stderr,
                        dynamic_ncols=True)

    def on_round(self, report: RoundReport, global_params: Params) -> None:
        m = report.metrics
        shown = {"round": report.round}
        if "train_loss" in m:
            shown["loss"] = f"{m['train_loss']:.3f}"
        for key in ("local", "base", "novel"):
            if key in m:
                shown[key] = f"{m[key]:.1f}"
        self.bar.set_postfix(shown)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


ListenerFactory = Callable[[ExperimentConfig, bool], list[RoundListener]]
LISTENER_FACTORIES: list[ListenerFactory] = [mlflow_listeners]


def run_experiment(cfg: ExperimentConfig, resume: bool = False, progress: bool = True,
                   listeners: list[RoundListener] = ()) -> dict[str, Any]:
    """Run one experiment into cfg.output_dir (config.yaml, checkpoints/, results.json)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    store = CheckpointStore(out / "checkpoints")
    saved = store.latest_server() if resume else None
    start = saved["round"] + 1 if saved else 0
    extra = [listener for factory in LISTENER_FACTORIES for listener in factory(cfg, resume)]
    bar = ProgressBar(num_rounds(cfg) + 1, cfg.algorithm.name, start) if progress else None
    try:
        with build_runtime(cfg, store, feature_cache_dir()) as runtime:
            results = run_federation(cfg, runtime, store, [*listeners, *extra, *([bar] if bar else [])], resume)
    finally:
        if bar:
            bar.close()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    for listener in extra:
        finish = getattr(listener, "on_end", None)
        if finish:
            finish(results)
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    """Local / Base / Novel / HM3 / HM2 per run, as an aligned text table."""
    cols = ("local", "base", "novel", "hm3", "hm2")
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"
    lines = [f"{'algorithm':<12}" + "".join(f"{c.upper():>9}" for c in cols)]
    for doc in results:
        lines.append(f"{doc['algorithm']:<12}" + "".join(f"{fmt(doc['final'].get(c)):>9}" for c in cols))
    lines.append("HM3 = harmonic mean of (Local, Base, Novel); HM2 = harmonic mean of (Base, Novel)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpgp-ray run", description="Run a federated prompt-learning experiment.")
    parser.add_argument("--config", help="YAML config (default: the quickstart)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.rounds=5 (repeatable)")
    parser.add_argument("--algorithms", help="comma-separated algorithms to run one after another "
                                             "(default: algorithm.name of the config)")
    parser.add_argument("--output", help="write the results JSON here as well")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last round")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.resume:
            run_dir = Path(args.resume).resolve()
            if not (run_dir / CONFIG_FILE).is_file():
                raise ConfigError(f"--resume {run_dir}: no {CONFIG_FILE} there; pass the output_dir of an earlier run")
            cfgs = [load_config(run_dir / CONFIG_FILE, [*args.set, f"output_dir={run_dir}"])]
        else:
            cfg = load_config(args.config, args.set)
            names = [a.strip() for a in args.algorithms.split(",")] if args.algorithms else [cfg.algorithm.name]
            unknown = [n for n in names if n not in ALGORITHMS]
            if unknown:
                raise ConfigError(f"--algorithms: unknown {', '.join(unknown)}; choose from {', '.join(ALGORITHMS)}")
            cfgs = [cfg] if len(names) == 1 and not args.algorithms else [
                dataclasses.replace(cfg, algorithm=dataclasses.replace(cfg.algorithm, name=name),
                                    output_dir=str(Path(cfg.output_dir) / name)) for name in names]
        docs = [run_experiment(c, resume=bool(args.resume), progress=not args.no_progress) for c in cfgs]
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(docs))
    for doc, c in zip(docs, cfgs):
        print(f"results: {Path(c.output_dir) / 'results.json'}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(docs[0] if len(docs) == 1 else {"runs": docs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
