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
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fedpgp_ray.config import ALGORITHM_NAMES, ConfigError, ExperimentConfig, config_from_dict, load_config
from fedpgp_ray.errors import user_errors
from fedpgp_ray.rundir import RunDir, check_writable, read_saved_config, write_text_atomic
from fedpgp_ray.storage import RunStorage, is_uri, join_location
from fedpgp_ray.tracking import mlflow_listeners

if TYPE_CHECKING:  # torch-backed modules are imported when a run starts, so `--help` is instant
    from fedpgp_ray.algorithms import Params
    from fedpgp_ray.federation import RoundListener, RoundReport


RESULTS_FILE = "results.json"
DROPPED_EXIT = 3  # the run finished, but without some clients (federation.allow_dropped_clients: false)


def feature_cache_dir(cfg: ExperimentConfig | None = None) -> str | None:
    """The node-local image-feature cache: $FEDPGP_CACHE_DIR, else ~/.cache/fedpgp-ray/features.

    For a Ray run (`cfg.runtime.kind == "ray"`) None: each client actor resolves the cache of the
    node it runs on (nodes share no disk, and each node's own $FEDPGP_CACHE_DIR or home applies).
    """
    if cfg is not None and cfg.runtime.kind == "ray":
        return None
    from fedpgp_ray.clip.features import default_cache_dir
    return str(default_cache_dir())


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
        if report.dropped:
            self.bar.write(f"round {report.round}: {dropped_text(report.dropped)}", file=sys.stderr)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def dropped_text(dropped: dict[int, str]) -> str:
    """`DROPPED client 3 (fit: ...)`, for a round line: a dropped client is never silent."""
    first, *rest = sorted(dropped)
    more = f" and {len(rest)} more: {', '.join(map(str, rest[:9]))}{' ...' if len(rest) > 9 else ''}" if rest else ""
    return f"DROPPED client {first} ({dropped[first]}){more}"


class PlainProgress:
    """One flushed line per round (`--no-progress`: job logs, CI), e.g.
    `fedpgp round 3/10: loss 1.234, local 45.1, base 40.2, novel 44.0, 2.31 s`."""

    def __init__(self, total: int, label: str, start: int = 0) -> None:
        self.last = total - 1
        self.label = label

    def on_round(self, report: RoundReport, global_params: Params) -> None:
        m = report.metrics
        parts = [f"loss {m['train_loss']:.3f}"] if "train_loss" in m else []
        parts += [f"{key} {m[key]:.1f}" for key in ("local", "base", "novel") if key in m]
        parts.append(f"{m.get('round_seconds', float('nan')):.2f} s")
        if m.get("clients_late"):
            parts.append(f"{m['clients_late']:.0f} late")
        if report.dropped:
            parts.append(dropped_text(report.dropped))
        print(f"{self.label} round {report.round}/{self.last}: {', '.join(parts)}", flush=True)

    def close(self) -> None:
        pass


ListenerFactory = Callable[[ExperimentConfig, bool], list["RoundListener"]]
LISTENER_FACTORIES: list[ListenerFactory] = [mlflow_listeners]


def run_experiment(cfg: ExperimentConfig, resume: bool = False, progress: bool = True,
                   listeners: list[RoundListener] = (), overwrite: bool = False) -> dict[str, Any]:
    """Run one experiment into cfg.output_dir (config.yaml, run.json, checkpoints/, results.json).

    The directory is checked, locked and claimed first (`fedpgp_ray.rundir`): a refused request
    (not writable, another run in it, a resume that changes the experiment) changes nothing there.
    overwrite: replace a run already in the directory.
    """
    with RunDir.open(cfg, resume, overwrite, preflight=lambda c: check_request(c, resume)) as run_dir:
        try:
            return _run_in_dir(cfg, resume, progress, listeners, run_dir.run_id)
        except Exception:
            if not resume:  # a failed start (no round checkpointed) claims nothing: the retry just works
                run_dir.release_if_unstarted()
            raise


def check_request(cfg: ExperimentConfig, resume: bool = False) -> None:
    """The checks of a request that need the model, data, tracking or Ray code, before its run directory is
    touched: a typo must not cost the run that --overwrite would replace (one line each)."""
    from fedpgp_ray.clip.backbone import resolve_pretrained
    from fedpgp_ray.data.registry import available_datasets

    resolve_pretrained(cfg.model.name, cfg.model.pretrained)
    if cfg.data.dataset not in available_datasets():
        raise ConfigError(f"unknown data.dataset '{cfg.data.dataset}': choose one of "
                          f"{', '.join(available_datasets())}")
    if cfg.data.root and not cfg.data.download and not Path(cfg.data.root).expanduser().is_dir():
        raise ConfigError(f"data.root {Path(cfg.data.root).expanduser()} is not a folder: set data.root to the "
                          f"folder holding the dataset (docs/DATASETS.md), or data.download: true")
    if cfg.model.device == "cuda" and cfg.runtime.kind == "local":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("model.device is 'cuda' but no CUDA device is visible to this process: set "
                              "model.device: auto (CUDA when there is one) or cpu")
    if cfg.privacy.enabled and cfg.privacy.max_epsilon is not None:  # a budget below one round is refused here
        from fedpgp_ray.federation import build_strategy
        build_strategy(cfg)
    if cfg.tracking.mlflow and not resume:  # a resume checks the store its run was logged to, as it opens it
        from fedpgp_ray.tracking import check_store
        check_store(cfg)
    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS")
    if cfg.runtime.kind == "ray" and address:
        from fedpgp_ray.runtime.ray.placement import check_reachable
        check_reachable(address, cfg.runtime.connect_timeout_s)


def _run_in_dir(cfg: ExperimentConfig, resume: bool, progress: bool, listeners: list[RoundListener],
                run_id: str | None = None) -> dict[str, Any]:
    from fedpgp_ray.checkpoint import CheckpointStore
    from fedpgp_ray.async_rounds import run_async_federation
    from fedpgp_ray.federation import num_rounds, run_federation
    from fedpgp_ray.runtime import build_runtime
    from fedpgp_ray.runtime.base import status

    storage = RunStorage(cfg.output_dir)
    store = CheckpointStore(storage.child("checkpoints"), run_id=run_id)
    if resume:  # a rollback recorded by a run that stopped on a damaged client state
        store.apply_rollback()
    saved = store.latest_server() if resume else None
    start = saved["round"] + 1 if saved else 0
    if resume:  # a resume starts the runtime before its first round: say what is coming
        left = num_rounds(cfg) - start + 1
        status(f"resume: rounds 0-{start - 1} are checkpointed; " + (
            f"{left} round(s) to go" if left > 0 else "no round left to train: rebuilding the results"))
    extra = [listener for factory in LISTENER_FACTORIES for listener in factory(cfg, resume)]
    # Start-up (Ray, actors, backbone, image features) says what it does; the round bar comes after it.
    status(f"{cfg.algorithm.name}: starting the {cfg.runtime.kind} runtime "
           f"({cfg.federation.num_clients} clients, {cfg.model.name} / {cfg.model.pretrained})")
    try:
        with build_runtime(cfg, store, feature_cache_dir(cfg)) as runtime:
            bar = (ProgressBar if progress else PlainProgress)(num_rounds(cfg) + 1, cfg.algorithm.name, start)
            try:
                run = run_async_federation if cfg.federation.mode == "async" else run_federation
                results = run(cfg, runtime, store, [*listeners, *extra, bar], resume)
            finally:
                bar.close()
    except BaseException as err:
        for listener in extra:
            if not isinstance(err, (KeyboardInterrupt, SystemExit)):  # those end KILLED (interrupted())
                getattr(listener, "end", lambda status: None)("FAILED")
            getattr(listener, "close", lambda: None)()
        raise
    status(f"{cfg.algorithm.name}: writing results.json, tables and figures"
           + (" and logging to MLflow" if extra else ""))
    storage.write_text(RESULTS_FILE, json.dumps(results, indent=2))
    write_client_results(storage, store)
    write_report(storage, results)
    for listener in extra:
        finish = getattr(listener, "on_end", None)
        if finish:
            finish(results)
    return results


def write_client_results(storage: RunStorage, store: Any) -> None:
    """clients.parquet beside results.json: every (round, client) of the run, from the last server
    checkpoint's history (results.json lists at most client_results.MAX_LISTED_CLIENTS per round)."""
    from fedpgp_ray.client_results import PARQUET_FILE, parquet_bytes

    saved = store.latest_server()
    storage.write_bytes(PARQUET_FILE, parquet_bytes(saved["history"] if saved else []))


def write_report(storage: RunStorage, results: dict[str, Any]) -> None:
    """results.csv, results.md, rounds.csv, accuracy.png, hm3_wall_time.png and clients.png beside results.json, with
    tracking on or off (staged locally: the run directory may be an object store)."""
    from fedpgp_ray import plots

    with tempfile.TemporaryDirectory(prefix="fedpgp-report-") as tmp:
        for path in [*plots.write_results_tables(results, tmp), *plots.write_figures(results, tmp)]:
            storage.write_bytes(path.name, path.read_bytes())


class Terminated(KeyboardInterrupt):
    """SIGTERM (`ray job stop`, docker, systemd, Kubernetes): the same clean stop as Ctrl-C."""


def raise_terminated(signum: int, frame: Any) -> None:
    """The SIGTERM handler: stop as Ctrl-C does (Terminated is a KeyboardInterrupt)."""
    raise Terminated()


def stop_now(exit_code: int, advice: str) -> None:
    """Ctrl-C (exit 130) or SIGTERM (143): one line (`interrupted: advice` / `terminated (SIGTERM): advice`),
    the MLflow run ended KILLED, the exit hooks run (bounded: tracking gives up after seconds), and the
    process ends at once; the interpreter's own teardown of torch, MLflow and Ray objects can take tens of
    seconds on a loaded machine, and whoever stopped the run is waiting (`ray job stop` kills the process
    group a few seconds after SIGTERM)."""
    import atexit

    from fedpgp_ray.tracking import end_unfinished

    what = "terminated (SIGTERM)" if exit_code == 143 else "interrupted"
    print(f"{what}: {advice}", file=sys.stderr)
    end_unfinished("KILLED")
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def interrupted(output_dir: str | None, exit_code: int = 130) -> None:
    """stop_now with how to continue the run."""
    where = f" --resume {output_dir}" if output_dir else " --resume <output_dir>"
    stop_now(exit_code, f"the completed rounds are checkpointed; continue with `fedpgp-ray run{where}`")


def format_table(results: list[dict[str, Any]]) -> str:
    """Local / Base / Novel / HM3 / HM2 per run, as an aligned text table."""
    cols = ("local", "base", "novel", "hm3", "hm2")
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"
    private = any("privacy" in doc for doc in results)  # DP runs: one more column, epsilon at delta
    dropping = any(doc.get("dropped_clients") for doc in results)  # runs that dropped clients: a DROPPED column
    eps = lambda doc: "-" if "privacy" not in doc else (
        "inf" if doc["privacy"]["epsilon"] is None else f"{doc['privacy']['epsilon']:.2f}")
    lines = [f"{'algorithm':<12}" + "".join(f"{c.upper():>9}" for c in cols) + (f"{'EPSILON':>9}" if private else "")
             + (f"{'DROPPED':>9}" if dropping else "")]
    for doc in results:
        lines.append(f"{doc['algorithm']:<12}" + "".join(f"{fmt(doc['final'].get(c)):>9}" for c in cols)
                     + (f"{eps(doc):>9}" if private else "")
                     + (f"{len(doc.get('dropped_clients', [])):>9}" if dropping else ""))
    lines.append("HM3 = harmonic mean of (Local, Base, Novel); HM2 = harmonic mean of (Base, Novel)")
    if private:
        deltas = sorted({doc["privacy"]["delta"] for doc in results if "privacy" in doc})
        lines.append(f"EPSILON = client-level (epsilon, delta={', '.join(f'{d:g}' for d in deltas)})-DP of the "
                     f"global prompt (docs/PRIVACY.md)")
    if dropping:
        lines.append("DROPPED = (round, client) pairs the runtime gave up on: their results are missing from the "
                     "averages (results.json: dropped_clients)")
    return "\n".join(lines)


def dropped_error(doc: dict[str, Any], cfg: ExperimentConfig) -> str | None:
    """The one line that ends a run which dropped clients (None: it dropped none, or the config allows it)."""
    drops = doc.get("dropped_clients", [])
    if not drops or cfg.federation.allow_dropped_clients:
        return None
    named = "; ".join(f"round {d['round']} client {d['client']} ({d['reason']})" for d in drops[:3])
    more = f"; and {len(drops) - 3} more" if len(drops) > 3 else ""
    return (f"{doc['algorithm']} dropped {len(drops)} client turn(s) that failed every attempt: {named}{more}; its "
            f"results average over the clients that reported (results.json: dropped_clients). Find the cause in the "
            f"log; set federation.allow_dropped_clients=true to accept runs that drop clients")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpgp-ray run", description="Run a federated prompt-learning experiment.")
    parser.add_argument("--config", help="YAML file, or the name of a packaged config (e.g. world_domains, "
                                             "paper/caltech101_b2n_16shot; `fedpgp-ray configs` lists them); "
                                             "default: quickstart")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.rounds=5 (repeatable)")
    parser.add_argument("--algorithms", help="comma-separated algorithms to run one after another "
                                             "(default: algorithm.name of the config)")
    parser.add_argument("--output", help="write the results JSON here as well")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last round")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in output_dir (its files are deleted)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)
    if args.no_progress:  # data phases (image checks, feature encoding) too: plain lines, no bars
        from fedpgp_ray.progress import set_progress
        set_progress("lines")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfgs: list[ExperimentConfig] = []
    try:
        if args.resume:
            run_dir = args.resume if is_uri(args.resume) else str(Path(args.resume).resolve())
            saved = read_saved_config(RunStorage(run_dir))
            try:  # a hand-edited saved config: say which file is wrong
                config_from_dict(saved, [f"output_dir={run_dir}"])
            except ConfigError as err:
                raise ConfigError(f"--resume {run_dir}: the saved config.yaml: {err}") from None
            cfgs = [config_from_dict(saved, [*args.set, f"output_dir={run_dir}"])]
        else:
            cfg = load_config(args.config, args.set)
            names = [a.strip() for a in args.algorithms.split(",")] if args.algorithms else [cfg.algorithm.name]
            unknown = [n for n in names if n not in ALGORITHM_NAMES]
            if unknown:
                given = "--algorithms: unknown" if args.algorithms else "config key 'algorithm.name' is unknown:"
                raise ConfigError(f"{given} {', '.join(unknown)}; choose from {', '.join(ALGORITHM_NAMES)}")
            cfgs = [cfg] if len(names) == 1 and not args.algorithms else [
                dataclasses.replace(cfg, algorithm=dataclasses.replace(cfg.algorithm, name=name),
                                    output_dir=join_location(cfg.output_dir, name)) for name in names]
        if args.output:
            if Path(args.output).is_dir():
                raise ConfigError(f"--output {args.output} is a directory: name a file in it, e.g. "
                                  f"--output {Path(args.output) / 'results.json'}")
            check_writable(Path(args.output).resolve().parent)
        from fedpgp_ray.runtime.shared_ray import one_ray_for_all_runs
        with one_ray_for_all_runs(cfgs):  # --algorithms on Ray: one local instance for all of them
            docs = [run_experiment(c, resume=bool(args.resume), progress=not args.no_progress,
                                   overwrite=args.overwrite) for c in cfgs]
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        interrupted(args.resume or (cfgs[0].output_dir if cfgs else None), 143 if isinstance(err, Terminated) else 130)
    except SystemExit as err:  # ray.init replaces our SIGTERM handler with one that calls sys.exit(15)
        if err.code != signal.SIGTERM:
            raise
        interrupted(args.resume or (cfgs[0].output_dir if cfgs else None), 143)
    print(format_table(docs))
    for doc, c in zip(docs, cfgs):
        print(f"results: {RunStorage(c.output_dir).display(RESULTS_FILE)}")
    if args.output:
        write_text_atomic(Path(args.output), json.dumps(docs[0] if len(docs) == 1 else {"runs": docs}, indent=2))
    errors = [e for doc, c in zip(docs, cfgs) if (e := dropped_error(doc, c))]
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    return DROPPED_EXIT if errors else 0


if __name__ == "__main__":
    sys.exit(main())
