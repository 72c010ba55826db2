"""`fedpgp-ray compare`: several algorithms over several seeds on identical partitions, tabulated.

    fedpgp-ray compare [--config FILE] [--set key.path=value ...]
                       [--algorithms clip,local,promptfl,fedprox,fedkgcoop,fedotp,fedpgp] [--seeds 0,1,2]
                       [--ablations] [--output-dir DIR] [--reuse] [--no-progress]

Every (algorithm, seed) is one `run_experiment` with its own output directory
`<DIR>/<algorithm>/seed<s>`. The dataset and the federated partition depend only on the data
and federation sections and the seed, which are the same for every algorithm of a seed: the
comparison is on identical clients, classes and images (checked: the configs of one seed may
differ only in `algorithm.*`, `output_dir` and the tracking store).

An algorithm may carry `algorithm.*` overrides after colons, for ablations and per-algorithm
hyperparameters: `fedpgp:mu=0` (no contrastive term), `fedpgp:rank=2`, `fedprox:prox_mu=0.1`.
`--ablations` appends FedPGP's mu = 0 and its rank sweep (1, 2, 4; the default rank is 8).

Outputs in DIR: comparison.csv / .md / .json (mean +- sample std over seeds of each run's final
Local / Base / Novel / HM3 / HM2), runs.csv (every run), comparison.png (grouped bars, std error
bars). With tracking on (`tracking.mlflow: true`) a parent MLflow run holds the summary and
the files, and every run is its child run (in one store: `tracking.uri`, else
`<parent of DIR>/mlflow.db`). The runtime (`runtime.kind`: local or ray) comes from the config.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpgp_ray.config import ConfigError, ExperimentConfig, config_from_dict, config_to_dict, load_config
from fedpgp_ray.storage import is_uri

DEFAULT_ALGORITHMS = "clip,local,promptfl,fedprox,fedkgcoop,fedotp,fedpgp"
ABLATIONS = ("fedpgp:mu=0", "fedpgp:rank=1", "fedpgp:rank=2", "fedpgp:rank=4")
METRICS = ("local", "base", "novel", "hm3", "hm2")
LABELS = {"local": "Local", "base": "Base", "novel": "Novel", "hm3": "HM3", "hm2": "HM2"}
# Keys that may differ between the runs of one seed; everything else defines the task.
PER_RUN_KEYS = ("algorithm", "output_dir", "tracking")


@dataclass(frozen=True)
class AlgorithmSpec:
    """`name[:key=value...]`: a registered algorithm with `algorithm.*` overrides."""
    label: str
    name: str
    overrides: tuple[tuple[str, str], ...] = ()

    @property
    def slug(self) -> str:
        """The label as a folder name (fedpgp:mu=0 -> fedpgp_mu=0)."""
        return re.sub(r"[^A-Za-z0-9_.=+-]", "_", self.label)


def parse_algorithms(text: str) -> list[AlgorithmSpec]:
    """'clip,fedpgp:mu=0' -> specs; unknown names and malformed overrides raise ConfigError."""
    from fedpgp_ray.algorithms import ALGORITHMS

    specs = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, *pairs = item.split(":")
        if name not in ALGORITHMS:
            raise ConfigError(f"--algorithms: unknown algorithm '{name}' in '{item}'; choose from "
                              f"{', '.join(ALGORITHMS)}")
        overrides = []
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key.strip() or "." in key:
                raise ConfigError(f"--algorithms: '{pair}' in '{item}' must be key=value with an algorithm.* "
                                  f"key, e.g. fedpgp:mu=0 or fedpgp:rank=2")
            if key.strip() == "name":
                raise ConfigError(f"--algorithms: '{item}' sets name: write the algorithm name before the colon")
            overrides.append((key.strip(), value.strip()))
        specs.append(AlgorithmSpec(item, name, tuple(overrides)))
    if not specs:
        raise ConfigError("--algorithms is empty: name at least one algorithm")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels) or len({s.slug for s in specs}) != len(specs):
        raise ConfigError(f"--algorithms lists an algorithm twice: {', '.join(labels)}")
    return specs


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must list distinct integers >= 0, got {text!r}")
    return seeds


def run_config(base: ExperimentConfig, spec: AlgorithmSpec, seed: int, out: Path,
               tracking_uri: str | None = None) -> ExperimentConfig:
    """The config of one run: the base config with this seed, algorithm, overrides and output dir."""
    sets = [f"seed={seed}", f"algorithm.name={spec.name}", f"output_dir={out / spec.slug / f'seed{seed}'}"]
    sets += [f"algorithm.{k}={v}" for k, v in spec.overrides]
    # A comparison measures; it does not deploy: registering 11 models per child run would only
    # fill the registry (run the chosen algorithm with `fedpgp-ray run` to get its models).
    sets.append("tracking.log_models=false")
    if tracking_uri:
        sets.append(f"tracking.uri={tracking_uri}")
    try:
        return config_from_dict(config_to_dict(base), sets)
    except ConfigError as err:
        raise ConfigError(f"--algorithms '{spec.label}': {err}") from None


def task_fingerprint(cfg: ExperimentConfig) -> str:
    """Hash of everything but algorithm / output_dir / tracking: equal fingerprints = identical task."""
    data = {k: v for k, v in config_to_dict(cfg).items() if k not in PER_RUN_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- summary ------------------------------------------------------------------------------------------
def summarize(runs: list[dict[str, Any]], labels: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """{label: {metric: {mean, std, n, values}}} over seeds; std is the sample std (ddof=1; 0 for one seed).

    Each run contributes its final metrics; HM3 / HM2 are each seed's harmonic means, averaged.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        out[label] = {}
        for key in METRICS:
            values = [r["final"].get(key) for r in mine]
            finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
            if not finite:
                out[label][key] = {"mean": None, "std": None, "n": 0, "values": values}
                continue
            std = statistics.stdev(finite) if len(finite) > 1 else 0.0  # sample std (ddof 1)
            out[label][key] = {"mean": statistics.fmean(finite), "std": std, "n": len(finite), "values": values}
        out[label]["wall_seconds"] = {"mean": statistics.fmean([r["wall_seconds"] for r in mine]) if mine else None,
                                      "total": float(sum(r["wall_seconds"] for r in mine))}
    return out


def _pm(stat: dict[str, Any]) -> str:
    return "-" if stat.get("mean") is None else f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def format_summary(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Aligned text table: one row per algorithm, mean ± std per metric."""
    width = max([len("algorithm"), *(len(k) for k in summary)]) + 2
    lines = [f"{'algorithm':<{width}}" + "".join(f"{LABELS[m]:>16}" for m in METRICS)]
    for label, stats in summary.items():
        lines.append(f"{label:<{width}}" + "".join(f"{_pm(stats[m]):>16}" for m in METRICS))
    lines.append("mean ± sample std over seeds of each run's final accuracy (%); "
                 "HM3 = HM(Local, Base, Novel), HM2 = HM(Base, Novel)")
    return "\n".join(lines)


def summary_rows(summary: dict[str, dict[str, dict[str, Any]]], seeds: list[int]) -> list[dict[str, Any]]:
    rows = []
    for label, stats in summary.items():
        row: dict[str, Any] = {"algorithm": label, "seeds": " ".join(map(str, seeds))}
        for m in METRICS:
            row[f"{m}_mean"], row[f"{m}_std"] = stats[m]["mean"], stats[m]["std"]
        row["wall_seconds_mean"] = stats["wall_seconds"]["mean"]
        rows.append(row)
    return rows


def run_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"algorithm": r["label"], "seed": r["seed"], **{m: r["final"].get(m) for m in METRICS},
             "wall_seconds": r["wall_seconds"], "output_dir": r["output_dir"]} for r in runs]


def machine_info() -> dict[str, Any]:
    """Where the comparison ran (for the record in RESULTS-style reports)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def markdown_report(doc: dict[str, Any]) -> str:
    """comparison.md: command, setup, the mean ± std table, the per-run table."""
    from fedpgp_ray.plots import markdown_table

    summary = doc["summary"]
    table = [{"algorithm": label, **{m: _pm(stats[m]) for m in METRICS}} for label, stats in summary.items()]
    machine = doc["machine"]
    lines = [
        "# Comparison", "",
        f"Command: `{doc['command']}`", "",
        f"Backbone: {doc['backbone']['name']} / {doc['backbone']['pretrained']}"
        + (f" (sha256 {doc['backbone']['sha256']})" if doc["backbone"].get("sha256") else "") + ".", "",
        f"Dataset: {doc['dataset']}; seeds {', '.join(map(str, doc['seeds']))}; runtime {doc['runtime']}; "
        f"wall time {doc['wall_seconds']:.0f} s on {machine['cpu']} ({machine['cpu_count']} cores"
        f"{', ' + machine['cuda'] if machine.get('cuda') else ''}).", "",
        "Mean ± sample std over seeds of each run's final accuracy (%), every algorithm on the same "
        "partition for a given seed.", "",
        markdown_table(table),
        "HM3 = harmonic mean of (Local, Base, Novel); HM2 = harmonic mean of (Base, Novel), "
        "each computed per seed and then averaged.", "",
        "## Runs", "",
        markdown_table([{k: v for k, v in r.items() if k != "output_dir"} for r in run_rows(doc["runs"])]),
    ]
    return "\n".join(lines)


def comparison_chart(summary: dict[str, dict[str, dict[str, Any]]], path: str | Path, title: str = "") -> Path:
    """Grouped bars: one group per metric (Local ... HM2), one bar per algorithm, std as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(summary)
    metrics = [m for m in METRICS if any(summary[a][m]["mean"] is not None for a in labels)]
    fig = Figure(figsize=(max(6.4, 1.0 + 0.18 * len(labels) * max(len(metrics), 1)), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.84 / max(len(labels), 1)
    for j, label in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(metrics))]
        means = [summary[label][m]["mean"] or 0.0 for m in metrics]
        stds = [summary[label][m]["std"] or 0.0 for m in metrics]
        ax.bar(xs, means, width=width, yerr=stds, capsize=2, label=label, error_kw={"linewidth": 0.8})
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([LABELS[m] for m in metrics])
    ax.set_ylabel("accuracy (%), mean ± std over seeds")
    ax.set_title(title or "Comparison", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(len(labels), 4), loc="upper center", bbox_to_anchor=(0.5, -0.09))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def write_outputs(doc: dict[str, Any], out: Path) -> list[Path]:
    """comparison.json / .csv / .md / .png and runs.csv in `out`."""
    from fedpgp_ray.plots import write_csv

    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(doc, indent=2))
    (out / "comparison.md").write_text(markdown_report(doc))
    return [out / "comparison.json", out / "comparison.md",
            write_csv(summary_rows(doc["summary"], doc["seeds"]), out / "comparison.csv"),
            write_csv(run_rows(doc["runs"]), out / "runs.csv"),
            comparison_chart(doc["summary"], out / "comparison.png",
                             f"{doc['dataset']}, {doc['partition']} partition: mean ± std over "
                             f"{len(doc['seeds'])} seed(s)")]


# -- MLflow parent run ---------------------------------------------------------------------------------
class ParentRun:
    """The comparison's parent MLflow run; every run started inside `children()` is its child."""

    def __init__(self, cfg: ExperimentConfig, out: Path, name: str) -> None:
        from mlflow import MlflowClient

        from fedpgp_ray import tracking

        self.tracking = tracking
        self.uri = tracking.resolve_tracking_uri(dataclasses.replace(cfg, output_dir=str(out)))
        tracking.check_reachable(self.uri)
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            adopted = os.environ.get("MLFLOW_RUN_ID")  # under `mlflow run`: its run is the parent
            if adopted:
                self.run = self.client.get_run(adopted)
            else:
                experiment_id = tracking._experiment_id(self.client, cfg, self.uri)
                self.run = self.client.create_run(experiment_id, run_name=name, tags={"fedpgp.compare": "true"})
        except Exception as err:  # noqa: BLE001 - any store failure at start-up is a user-facing error
            raise tracking.TrackingError(f"MLflow tracking store {self.uri} cannot be used for the comparison's "
                                         f"parent run ({type(err).__name__}: {err}); fix MLFLOW_TRACKING_URI / "
                                         f"tracking.uri or set tracking.mlflow=false") from None
        self.owned = not adopted
        self.run_id = self.run.info.run_id

    def children(self):
        return self.tracking.parent_run(self.run_id)

    def finish(self, cfg: ExperimentConfig, doc: dict[str, Any], files: list[Path]) -> None:
        from mlflow.entities import Metric, Param

        stamp = int(time.time() * 1000)
        params = [Param("compare.algorithms", ",".join(doc["algorithms"])[:6000]),
                  Param("compare.seeds", ",".join(map(str, doc["seeds"]))),
                  *[Param(k, v) for k, v in self.tracking.config_params(cfg).items()
                    if k not in ("cfg.seed", "cfg.algorithm.name", "cfg.output_dir")]]
        metrics = [Metric("wall_seconds", float(doc["wall_seconds"]), stamp, 0)]
        for label, stats in doc["summary"].items():
            key = re.sub(r"[^A-Za-z0-9_./ -]", "_", label)
            for m in METRICS:
                if stats[m]["mean"] is not None:
                    metrics += [Metric(f"{key}/{m}_mean", stats[m]["mean"], stamp, 0),
                                Metric(f"{key}/{m}_std", stats[m]["std"], stamp, 0)]
        try:
            existing = self.client.get_run(self.run_id).data.params
            params = [p for p in params if p.key not in existing]
            for i in range(0, max(len(params), len(metrics)), 100):
                self.client.log_batch(self.run_id, metrics=metrics[i:i + 100], params=params[i:i + 100])
            for path in files:
                self.client.log_artifact(self.run_id, str(path), "comparison")
        except Exception as err:  # noqa: BLE001 - the files are on disk; never lose them to tracking
            logging.getLogger(__name__).warning("MLflow: could not log the comparison to the parent run (%s)", err)
        self.close(ok=True)

    def close(self, ok: bool) -> None:
        if self.owned:
            try:
                self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")
            except Exception:  # noqa: BLE001
                pass
            self.owned = False


# -- the command ----------------------------------------------------------------------------------------
BACKBONE_FILE = "backbone.json"  # in each run's output_dir: the weights it ran with (for --reuse)


def backbone_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """The backbone a run uses: model name, pretrained tag and, for a checkpoint file, its sha256.

    A tag such as `fedpgp-world` can point at a rebuilt checkpoint; the hash tells the runs apart.
    """
    from fedpgp_ray.clip.backbone import resolve_pretrained, sha256_of

    weights = resolve_pretrained(cfg.model.name, cfg.model.pretrained)
    info: dict[str, Any] = {"name": cfg.model.name, "pretrained": cfg.model.pretrained}
    if weights and Path(weights).is_file():
        info["sha256"] = sha256_of(Path(weights))
    return info


def _reusable(cfg: ExperimentConfig, backbone: dict[str, Any]) -> dict[str, Any] | None:
    """The results of a finished earlier run with exactly this config and backbone, else None."""
    out = Path(cfg.output_dir)
    try:
        doc = json.loads((out / "results.json").read_text())
        used = json.loads((out / BACKBONE_FILE).read_text())
    except (OSError, ValueError):
        return None
    same = doc.get("config") == json.loads(json.dumps(config_to_dict(cfg))) and used == backbone
    return doc if same else None


def compare(base: ExperimentConfig, specs: list[AlgorithmSpec], seeds: list[int], out: Path, command: str = "",
            progress: bool = True, reuse: bool = False, echo=print) -> dict[str, Any]:
    """Run every (algorithm, seed), write the comparison files in `out`, and return the document."""
    from fedpgp_ray.run import run_experiment
    from fedpgp_ray.runtime.shared_ray import start_ray_once

    out = Path(out).resolve()
    began = time.perf_counter()
    plan = [(seed, spec, run_config(base, spec, seed, out)) for seed in seeds for spec in specs]  # validates
    for seed in seeds:  # only algorithm.* may differ between the runs of a seed: same data, clients, rounds
        if len({task_fingerprint(c) for s, _, c in plan if s == seed}) != 1:
            raise ConfigError(f"seed {seed}: the runs' configs differ outside algorithm.*; they must not")
    parent = ParentRun(base, out, f"compare-{out.name}") if base.tracking.mlflow else None
    if parent is not None and not os.environ.get("MLFLOW_TRACKING_URI"):  # children log into the parent's store
        plan = [(seed, spec, run_config(base, spec, seed, out, parent.uri)) for seed, spec, _ in plan]
    backbone = backbone_identity(base)  # the same for every run: checked before each one
    runs: list[dict[str, Any]] = []
    ok = False
    ray_started = start_ray_once(base)
    try:
        for i, (seed, spec, cfg) in enumerate(plan, 1):
            tick = time.perf_counter()
            doc = _reusable(cfg, backbone) if reuse else None
            how = "reused" if doc is not None else "ran"
            if doc is None:
                if backbone_identity(cfg) != backbone:
                    from fedpgp_ray.clip.backbone import CheckpointError

                    raise CheckpointError(f"the backbone checkpoint changed during the comparison (before "
                                          f"{spec.label} seed {seed}): the runs would mix two backbones; "
                                          f"run the comparison again")
                # a comparison owns its run folders: running it again replaces their runs
                if parent is not None:
                    with parent.children():
                        doc = run_experiment(cfg, progress=progress, overwrite=True)
                else:
                    doc = run_experiment(cfg, progress=progress, overwrite=True)
                (Path(cfg.output_dir) / BACKBONE_FILE).write_text(json.dumps(backbone, indent=2))
            wall = float(doc.get("wall_seconds", time.perf_counter() - tick))
            runs.append({"label": spec.label, "algorithm": spec.name, "seed": seed, "output_dir": cfg.output_dir,
                         "task": task_fingerprint(cfg), "final": doc["final"], "wall_seconds": wall})
            shown = "  ".join(f"{LABELS[m]} {doc['final'][m]:.2f}" for m in METRICS
                              if doc["final"].get(m) is not None)
            echo(f"[{i}/{len(plan)}] {spec.label} seed {seed}: {shown} ({how}, {wall:.1f} s)")
        ok = True
    finally:
        if ray_started:
            import ray

            ray.shutdown()
        if parent is not None and not ok:
            parent.close(ok=False)
    labels = [s.label for s in specs]
    doc = {
        "command": command,
        "dataset": base.data.dataset,
        "partition": base.data.partition,
        "runtime": base.runtime.kind,
        "algorithms": labels,
        "seeds": seeds,
        "config": config_to_dict(base),
        "backbone": backbone,
        "machine": machine_info(),
        "wall_seconds": time.perf_counter() - began,
        "summary": summarize(runs, labels),
        "runs": runs,
        "metric_names": {"local": "own classes' test set", "base": "all base classes",
                         "novel": "novel classes (domain level: the held-out domain)",
                         "hm3": "harmonic mean of Local, Base, Novel", "hm2": "harmonic mean of Base, Novel"},
    }
    files = write_outputs(doc, out)
    if parent is not None:
        parent.finish(base, doc, files)
        doc["mlflow_parent_run_id"] = parent.run_id
    return doc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedpgp-ray compare",
        description="Run several algorithms over several seeds on identical partitions and tabulate "
                    "Local / Base / Novel / HM3 / HM2 as mean ± std.")
    parser.add_argument("--config", help="YAML file, or the name of a packaged config (e.g. world_domains, "
                                        "paper/caltech101_b2n_16shot; `fedpgp-ray configs` lists them); "
                                        "default: quickstart")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key for every run, e.g. --set train.rounds=5 (repeatable)")
    parser.add_argument("--algorithms", default=DEFAULT_ALGORITHMS,
                        help="comma-separated algorithms, each optionally with algorithm.* overrides after "
                             f"colons (fedpgp:mu=0, fedpgp:rank=2); default: {DEFAULT_ALGORITHMS}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--ablations", action="store_true",
                        help=f"also run FedPGP's ablations: {', '.join(ABLATIONS)}")
    parser.add_argument("--output-dir", help="where the runs and the comparison files go "
                                             "(default: <output_dir of the config>/compare)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse a run whose results.json exists with exactly the same config")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from fedpgp_ray.errors import user_errors  # after parsing: `--help` stays instant

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        base = load_config(args.config, args.set)
        specs = parse_algorithms(args.algorithms)
        if args.ablations:
            specs += parse_algorithms(",".join(a for a in ABLATIONS if a not in {s.label for s in specs}))
        seeds = parse_seeds(args.seeds)
        if base.algorithm.prox_mu > 0 and any(s.name in ("promptfl", "fedkgcoop") for s in specs):
            print(f"note: algorithm.prox_mu={base.algorithm.prox_mu} adds the proximal term to promptfl and "
                  f"fedkgcoop too; to tune FedProx alone write fedprox:prox_mu=X", file=sys.stderr)
        where = args.output_dir or base.output_dir
        if is_uri(where):
            raise ConfigError(f"compare writes its tables locally, so its output dir cannot be the URI {where}: pass a "
                              f"local --output-dir (single runs, `fedpgp-ray run`, accept URIs)")
        out = Path(args.output_dir).expanduser() if args.output_dir else Path(base.output_dir) / "compare"
        command = "fedpgp-ray compare " + " ".join(shlex.quote(a) for a in argv)
        doc = compare(base, specs, seeds, out, command, progress=not args.no_progress, reuse=args.reuse)
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(doc["summary"]))
    print(f"wall time: {doc['wall_seconds']:.1f} s for {len(doc['runs'])} runs")
    print(f"comparison: {Path(out).resolve() / 'comparison.md'} (+ .csv, .json, .png, runs.csv)")
    if "mlflow_parent_run_id" in doc:
        print(f"MLflow parent run: {doc['mlflow_parent_run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
