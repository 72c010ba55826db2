"""Stragglers: wall time to a target HM3, and the final accuracy after equal client work, for synchronous
rounds, synchronous rounds with a deadline and over-selection, and FedBuff, under a client speed model.

    nice python benchmarks/stragglers.py [--settings slow10,lognormal] [--modes sync,deadline,fedbuff]
        [--seeds 0,1,2] [--rounds 15] [--deadline auto|S] [--target auto|HM3] [--json out.json]
        [--figures docs/results]

The world of the quickstart (64 classes, 32 base / 32 novel, task style) with 100 clients ("shared" partition:
2 base classes x 8 shots each), FedPGP, 10 clients per round (client_fraction 0.1), on Ray with 2 client actors
(1 CPU, 1 torch thread each). Settings (client_speed): "slow10": 10% of the clients 10x slower; "lognormal":
k = max(1, exp(z)), z ~ N(0, 1). Modes:
  sync      every round waits for its 10 clients;
  deadline  13 sampled (federation.over_selection 0.3), the first 10 to report are aggregated, and the round
            closes at federation.round_deadline_s (auto: 3 x the median training phase of the synchronous
            runs' rounds in which no sampled client straggled), min_reporting_clients 1;
  fedbuff   federation.mode: async, K = 10 updates per server step, 2 clients in flight, staleness weight
            1/sqrt(1+s), max staleness 10 (skipped, with a note, where this version has no such mode).
Equal client work: every mode runs the same number of rounds (R x 10 client updates asked for; FedBuff the
same number of updates). Every round evaluates 20 seeded clients (the same ones in every mode), the last
round all 100. Time to target: the training wall time (`train_wall_seconds`: evaluation phases excluded) of
the first evaluated round with HM3 >= target (auto: round-0 HM3 + 0.8 x (median final HM3 of the synchronous
runs - round-0 HM3)). Not a test: figures depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORLD = ["data.dataset=world", "data.partition=shared", "data.classes_per_client=2", "data.shots=8",
         "federation.num_clients=100", "federation.client_fraction=0.1", "evaluation.every=1",
         "evaluation.num_clients=20", "evaluation.final=all", "tracking.mlflow=false", "runtime.kind=ray",
         "runtime.num_actors=2", "runtime.num_cpus_per_actor=1", "runtime.threads_per_worker=1"]
SETTINGS = {
    "slow10": ["client_speed.kind=slow_fraction", "client_speed.slow_fraction=0.1", "client_speed.slowdown=10"],
    "lognormal": ["client_speed.kind=lognormal", "client_speed.sigma=1.0"],
}
# mode -> its overrides; "deadline" gets federation.round_deadline_s added (--deadline). FedBuff's own knobs
# (its section of the config) go in its list; equal client work = the same number of client updates.
MODES = {
    "sync": [],
    "deadline": ["federation.over_selection=0.3", "federation.min_reporting_clients=1"],
    # K = 10 = the clients of a synchronous round: a server step per 10 updates, evaluated as often as a round;
    # 2 clients in flight (one per actor: none waits behind a straggler in an actor's queue)
    "fedbuff": ["federation.mode=async", "fedbuff.buffer_size=10", "fedbuff.concurrency=2"],
}


def mode_supported(mode: str) -> str | None:
    """None if this version runs `mode`, else why not (one line)."""
    from fedpgp_ray.config import ConfigError, config_from_dict
    try:
        config_from_dict({}, MODES[mode])
    except ConfigError as err:
        return str(err)
    return None


def run_one(setting: str, mode: str, seed: int, rounds: int, deadline: float | None) -> dict[str, Any]:
    from fedpgp_ray.config import load_config
    from fedpgp_ray.run import run_experiment

    extra = [f"federation.round_deadline_s={deadline}"] if mode == "deadline" else []
    out = tempfile.mkdtemp(prefix=f"fedpgp-stragglers-{setting}-{mode}-{seed}-")
    cfg = load_config(None, [*WORLD, *SETTINGS[setting], *MODES[mode], *extra, f"seed={seed}",
                             f"train.rounds={rounds}", f"output_dir={out}"])
    began = time.perf_counter()
    doc = run_experiment(cfg, progress=False)
    print(f"  {setting} {mode} seed {seed}: HM3 {doc['final']['hm3']:.2f} in {time.perf_counter() - began:.0f} s "
          f"(training wall {doc['rounds'][-1]['metrics']['train_wall_seconds']:.1f} s)", flush=True)
    return {"setting": setting, "mode": mode, "seed": seed, "rounds": [
        {"round": r["round"], "metrics": {k: v for k, v in r["metrics"].items() if not k.startswith("client/")}}
        for r in doc["rounds"]], "final": doc["final"]}


def auto_deadline(runs: list[dict[str, Any]]) -> float:
    """3 x the median training phase of the synchronous rounds without a straggler."""
    phases = [r["metrics"]["fit_phase_seconds"] for run in runs for r in run["rounds"]
              if r["round"] > 0 and r["metrics"].get("train_straggle_seconds", 0.0) < 1e-3]
    if not phases:
        raise SystemExit("no synchronous round without a straggler to calibrate the deadline: pass --deadline S")
    return round(3.0 * statistics.median(phases), 2)


def time_to_target(run: dict[str, Any], target: float) -> float | None:
    for r in run["rounds"]:
        if r["metrics"].get("hm3") is not None and r["metrics"]["hm3"] >= target:
            return r["metrics"]["train_wall_seconds"]
    return None


def summary(runs: list[dict[str, Any]], target: float) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        m = [r["metrics"] for r in run["rounds"] if r["round"] > 0]
        rows.append({"setting": run["setting"], "mode": run["mode"], "seed": run["seed"],
                     "time_to_target_s": time_to_target(run, target),
                     "train_wall_s": run["rounds"][-1]["metrics"]["train_wall_seconds"],
                     **{k: run["final"].get(k) for k in ("local", "base", "novel", "hm3")},
                     "aggregated": sum(x.get("clients_reported", 0) for x in m),
                     "late": sum(x.get("clients_late", 0) for x in m)})
    return rows


def fmt(value: Any, digits: int = 1) -> str:
    return "never" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def print_tables(rows: list[dict[str, Any]], targets: dict[str, float]) -> None:
    keys = ("setting", "mode", "seed", "time_to_target_s", "train_wall_s", "local", "base", "novel", "hm3",
            "aggregated", "late")
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(fmt(row[k], 2 if k in ("local", "base", "novel", "hm3") else 1) for k in keys) + " |")
    print("\nmean ± sd over seeds (time to target over the seeds that reached it; speed-up = sync / mode):")
    print("| setting | target HM3 | mode | time to target (s) | speed-up | Local | Base | Novel | HM3 |\n" + "|---" * 9 + "|")
    for setting, target in targets.items():
        sync = [r["time_to_target_s"] for r in rows if r["setting"] == setting and r["mode"] == "sync"
                and r["time_to_target_s"] is not None]
        for mode in MODES:
            mine = [r for r in rows if r["setting"] == setting and r["mode"] == mode]
            if not mine:
                continue
            times = [r["time_to_target_s"] for r in mine if r["time_to_target_s"] is not None]
            speedup = (f"{statistics.mean(sync) / statistics.mean(times):.2f}x" if sync and times else "-")
            reached = f"{mean_sd(times)} ({len(times)}/{len(mine)} reached)"
            print(f"| {setting} | {target:.2f} | {mode} | {reached} | {speedup} | "
                  + " | ".join(mean_sd([r[k] for r in mine]) for k in ("local", "base", "novel", "hm3")) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="slow10")
    parser.add_argument("--modes", default="sync,deadline,fedbuff")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--deadline", default="auto")
    parser.add_argument("--target", default="auto")
    parser.add_argument("--json", default=None)
    parser.add_argument("--figures", default=None, help="folder for stragglers_<setting>.png (HM3 against wall time)")
    args = parser.parse_args(argv)
    settings, seeds = args.settings.split(","), [int(s) for s in args.seeds.split(",")]
    modes = [m for m in MODES if m in args.modes.split(",")]  # sync first: it calibrates the deadline and target
    for mode in list(modes):
        why = mode_supported(mode)
        if why:
            print(f"note: mode {mode} skipped: this version does not run it ({why})", flush=True)
            modes.remove(mode)

    import ray
    from fedpgp_ray.config import load_config
    from fedpgp_ray.runtime.ray.placement import connect
    connect(load_config(None, WORLD).runtime, 2)  # one Ray instance for every run
    runs: list[dict[str, Any]] = []
    targets: dict[str, float] = {}
    try:
        for setting in settings:
            mine: list[dict[str, Any]] = []
            deadline = None if args.deadline == "auto" else float(args.deadline)
            for mode in modes:
                if mode == "deadline" and deadline is None:
                    deadline = auto_deadline([r for r in mine if r["mode"] == "sync"])
                    print(f"{setting}: deadline mode with federation.round_deadline_s={deadline}", flush=True)
                for seed in seeds:
                    mine.append(run_one(setting, mode, seed, args.rounds, deadline))
            sync = [r for r in mine if r["mode"] == "sync"] or mine
            start = statistics.median(r["rounds"][0]["metrics"]["hm3"] for r in mine)
            targets[setting] = (float(args.target) if args.target != "auto" else
                                start + 0.8 * (statistics.median(r["final"]["hm3"] for r in sync) - start))
            runs += mine
    finally:
        ray.shutdown()
    rows = [row for setting in settings for row in summary([r for r in runs if r["setting"] == setting],
                                                            targets[setting])]
    print_tables(rows, targets)
    if args.figures:
        from fedpgp_ray.plots import hm3_wall_time_figure
        for setting in settings:
            docs = {mode: [r for r in runs if r["setting"] == setting and r["mode"] == mode] for mode in modes}
            path = Path(args.figures) / f"stragglers_{setting}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            hm3_wall_time_figure(docs, f"HM3 against training wall time, {setting}, 100 clients, seeds "
                                       f"{args.seeds}").savefig(path, format="png")
            print(f"figure: {path}")
    if args.json:
        Path(args.json).write_text(json.dumps({"targets": targets, "rows": rows, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
