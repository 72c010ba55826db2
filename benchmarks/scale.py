"""Cross-device scale: one federation at 1,000 / 10,000 / 100,000 clients, in-process and on Ray.

    python benchmarks/scale.py [--clients 1000,10000,100000] [--runtimes local,ray] [--rounds 5]
                               [--sampled 10] [--evaluated 10] [--json out.json]

The world with 16 classes x 1,000 training images (100 test images per class), the "shared" partition
(each client: 2 base classes x 2 shots, images shared between clients, so the dataset stays 17,600
images at every size), 10 clients sampled per round, 10 evaluated per evaluation round (every round,
the last one a sample too), 5 rounds. Each (clients, runtime) runs in a fresh process, so peak RSS is
that configuration's. Reported: start-up (runtime built: world, partition, backbone, features; the
feature cache is warm after the first configuration, `encoded` says how many images a start-up
encoded), seconds per training phase and per evaluation phase (mean over rounds 1..R), peak RSS of
each process (driver; Ray: each client actor and the server actor), bytes written to the run storage
per round (server checkpoint + the sampled clients' states). Not a test: figures depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORLD = ["data.dataset=world", "data.partition=shared", "data.shots=2", "data.classes_per_client=2",
         "data.world.num_classes=16", "data.world.train_per_class=1000", "data.world.test_per_class=100",
         "evaluation.every=1", "tracking.mlflow=false", "runtime.num_actors=2", "runtime.threads_per_worker=1",
         "runtime.num_cpus_per_actor=1"]


class RoundBytes:
    """Listener: bytes of the files a round wrote to the run storage (its server checkpoint and the
    states of the clients that trained in it)."""

    def __init__(self, store) -> None:
        self.store = store
        self.per_round: dict[int, int] = {}

    def on_round(self, report, global_params) -> None:
        storage, rnd = self.store.storage, report.round
        files = [f"server/round_{rnd}.pt"] + [f"clients/{cid}/round_{rnd}.pt" for cid, m in report.clients.items()
                                              if any(k.startswith("train_") for k in m)]
        self.per_round[rnd] = sum(len(storage.read_bytes(f)) for f in files if storage.exists(f))


def run_one(num_clients: int, runtime_kind: str, rounds: int, sampled: int, evaluated: int) -> dict:
    from fedpgp_ray.checkpoint import CheckpointStore
    from fedpgp_ray.config import load_config
    from fedpgp_ray.federation import run_federation
    from fedpgp_ray.run import feature_cache_dir
    from fedpgp_ray.runtime import build_runtime
    from fedpgp_ray.storage import RunStorage

    out = tempfile.mkdtemp(prefix=f"fedpgp-scale-{num_clients}-{runtime_kind}-")
    cfg = load_config(None, [*WORLD, f"federation.num_clients={num_clients}",
                             f"federation.client_fraction={sampled / num_clients}",
                             f"evaluation.num_clients={evaluated}", f"train.rounds={rounds}",
                             f"runtime.kind={runtime_kind}", f"output_dir={out}"])
    store = CheckpointStore(RunStorage(out).child("checkpoints"))
    began = time.perf_counter()
    runtime = build_runtime(cfg, store, feature_cache_dir(cfg))
    startup = time.perf_counter() - began
    listener = RoundBytes(store)
    try:
        doc = run_federation(cfg, runtime, store, [listener])
        if runtime_kind == "ray":
            report = runtime.memory_report()
            peaks = {"driver": report["driver"]["peak_rss_mb"],
                     **{f"actor{i}": a["peak_rss_mb"] for i, a in enumerate(report["actors"])},
                     "server": report["server"]["peak_rss_mb"]}
            encoded = sum(info["encoded_images"] for info in runtime.actor_info)
        else:
            peaks = {"driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            encoded = runtime.worker.encoded_images
    finally:
        runtime.close()
    trained = [r["metrics"] for r in doc["rounds"] if r["round"] > 0]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    return {"clients": num_clients, "runtime": runtime_kind, "startup_s": startup, "encoded": encoded,
            "fit_s": mean([m["fit_phase_seconds"] for m in trained]),
            "eval_s": mean([r["metrics"]["evaluate_phase_seconds"] for r in doc["rounds"] if r["round"] > 0]),
            "peak_rss_mb": peaks, "bytes_per_round": mean([listener.per_round[r] for r in range(1, rounds + 1)]),
            "final_local": doc["final"]["local"], "final_local_se": doc["final_summary"]["local"]["se"]}


def table(rows: list[dict]) -> str:
    lines = ["| clients | runtime | start-up (s) | encoded | s / training phase | s / evaluation phase | "
             "peak RSS per process (MiB) | bytes written / round |", "|---:|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['clients']:,} | {r['runtime']} | failed: {r['error']} | | | | | |")
            continue
        rss = ", ".join(f"{k} {v:.0f}" for k, v in r["peak_rss_mb"].items())
        lines.append(f"| {r['clients']:,} | {r['runtime']} | {r['startup_s']:.1f} | {r['encoded']} | {r['fit_s']:.2f} "
                     f"| {r['eval_s']:.2f} | {rss} | {r['bytes_per_round'] / 1024:.0f} KiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1000,10000,100000")
    parser.add_argument("--runtimes", default="local,ray")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--evaluated", type=int, default=10)
    parser.add_argument("--json", help="write the rows here too")
    parser.add_argument("--one", nargs=2, metavar=("CLIENTS", "RUNTIME"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("ROW " + json.dumps(run_one(int(args.one[0]), args.one[1], args.rounds, args.sampled, args.evaluated)))
        return 0
    rows = []
    for runtime_kind in args.runtimes.split(","):
        for clients in [int(c) for c in args.clients.split(",")]:
            cmd = [sys.executable, __file__, "--one", str(clients), runtime_kind, "--rounds", str(args.rounds),
                   "--sampled", str(args.sampled), "--evaluated", str(args.evaluated)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            row = json.loads(found[0]) if found else {"clients": clients, "runtime": runtime_kind,
                                                      "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
