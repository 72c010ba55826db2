"""One round of every shipped config, each as the user would start it, with a time budget per round.

    python benchmarks/shipped_configs.py [--budget-s 60] [--only quickstart,world_domains] [--json out.json]

Runs `python -m fedpgp_ray.run --config NAME --set train.rounds=1 --set tracking.mlflow=false`
into a temporary directory for every config `fedpgp-ray configs` lists: the config's own runtime
(in-process or Ray) and thread settings, nothing else changed. Prints, per config, the torch
threads each worker used, the seconds of the training round (round 1), of round 0 (the initial
evaluation) and the wall time of the command (start-up included). A round over the budget is
marked OVER BUDGET and makes the exit code 1: a config that oversubscribes the machine (torch's
default of one thread per core in every process) shows here. Configs whose data is not on this
machine (configs/paper/: the real datasets and ViT-B/16 weights) are listed with the one-line
error the run gave. Not a test: the figures depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedpgp_ray.config import load_config, packaged_configs
from fedpgp_ray.runtime.base import worker_threads


def run_one(name: str, workdir: Path, timeout_s: float) -> dict:
    cfg = load_config(name)
    out = workdir / name.replace("/", "_")
    cmd = [sys.executable, "-m", "fedpgp_ray.run", "--config", name, "--set", "train.rounds=1",
           "--set", "tracking.mlflow=false", "--set", f"output_dir={out}", "--no-progress"]
    row = {"config": name, "runtime": cfg.runtime.kind, "threads": worker_threads(cfg.runtime),
           "workers": cfg.runtime.num_actors if cfg.runtime.kind == "ray" else 1}
    began = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**row, "status": f"timed out after {timeout_s:.0f} s", "wall_s": timeout_s}
    row["wall_s"] = time.perf_counter() - began
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        reason = errors[-1] if errors else proc.stderr.strip()[-200:]
        return {**row, "status": "not run: " + reason.split(";")[0][:90]}  # the first clause of the one line
    rounds = {r["round"]: r["metrics"] for r in json.loads((out / "results.json").read_text())["rounds"]}
    return {**row, "status": "ok", "round0_s": rounds[0].get("round_seconds"),
            "round1_s": rounds[1].get("round_seconds"), "local": rounds[1].get("local")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=60.0,
                        help="most seconds the training round of a config may take (default 60)")
    parser.add_argument("--only", help="comma-separated config names (default: every shipped config)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else packaged_configs()
    rows, over = [], []
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; budget {args.budget_s:.0f} s per round",
          flush=True)
    print(f"{'config':<36}{'runtime':>8}{'workers x threads':>19}{'round 1 s':>11}{'round 0 s':>11}"
          f"{'wall s':>9}  status", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedpgp-shipped-") as tmp:
        for name in names:
            # start-up (Ray, backbone, features) + two rounds: bounded by a few budgets
            row = run_one(name, Path(tmp), timeout_s=10 * args.budget_s + 300)
            if row["status"] == "ok" and row["round1_s"] > args.budget_s:
                row["status"] = "OVER BUDGET"
                over.append(name)
            rows.append(row)
            fmt = lambda v: "-" if v is None else f"{v:.1f}"
            print(f"{name:<36}{row['runtime']:>8}{row['workers']:>10} x {row['threads']:<6}"
                  f"{fmt(row.get('round1_s')):>11}{fmt(row.get('round0_s')):>11}{fmt(row.get('wall_s')):>9}  "
                  f"{row['status']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"budget_s": args.budget_s, "rows": rows}, indent=2))
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
