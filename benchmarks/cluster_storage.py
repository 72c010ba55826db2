"""The cost of shared run storage: seconds per round of the quickstart on a two-node Ray cluster with the
run directory on (b) a path both nodes share and (c) s3:// (moto on 127.0.0.1), against (l) the
single-node in-process runtime, in one invocation; bytes written per round to run storage.

    python benchmarks/cluster_storage.py [--rounds 5] [--repeats 1] [--json OUT]

Needs root: the cluster is the test suite's (tests/two_node_cluster.py: a private network namespace,
the worker node in its own mount namespace, token auth on). Variants run interleaved (b, c, l per
repeat). s/round is the mean `round_seconds` of the training rounds (1..R) from results.json, so
start-up (actors loading CLIP and features) is reported apart. Threads: 2 client actors x 1 thread on the
worker node; the in-process runtime uses torch's default (the machine's cores); OMP_WAIT_POLICY=PASSIVE.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Spinning OpenMP threads collapse on a loaded machine (see benchmarks/perf.py); every variant waits passively.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from s3_server import S3_ENV, make_bucket, moto_server, s3_uri  # noqa: E402
from two_node_cluster import TwoNodeCluster  # noqa: E402


def run_args(output_dir: str, rounds: int, kind: str) -> list[str]:
    return ["--config", "configs/quickstart.yaml", "--set", f"output_dir={output_dir}", "--set", f"runtime.kind={kind}",
            "--set", f"train.rounds={rounds}", "--set", "tracking.mlflow=false", "--no-progress"]


def summarize(doc: dict, wall: float) -> dict:
    train = [r["metrics"]["round_seconds"] for r in doc["rounds"] if r["round"] > 0]
    return {"s_per_round": statistics.mean(train), "rounds_s": train, "run_s": doc["wall_seconds"], "job_s": wall,
            "final": doc["final"]}


def bytes_per_round(run_dir: Path, rnd: int) -> dict:
    """Bytes the run writes to run storage in round `rnd`: the server checkpoint and every client's state."""
    server = (run_dir / "checkpoints" / "server" / f"round_{rnd}.pt").stat().st_size
    clients = [p.stat().st_size for p in (run_dir / "checkpoints" / "clients").glob(f"*/round_{rnd}.pt")]
    return {"server": server, "clients": sum(clients), "per_client": statistics.mean(clients), "n_clients": len(clients),
            "total": server + sum(clients)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("error: needs root (unshare -n / -m for the two-node cluster)")
    base = Path(tempfile.mkdtemp(prefix="fpb-", dir="/tmp"))
    cache = base / "features"
    env_vars = {"FEDPGP_CACHE_DIR": str(cache), "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"]}
    results: dict[str, list[dict]] = {"b_shared": [], "c_s3": [], "l_in_process": []}
    cluster = TwoNodeCluster(base, workers=1)  # the setup measured in docs/RAY.md: head + one worker
    began = time.monotonic()
    try:
        cluster.start()
        print(f"[cluster] two nodes up in {time.monotonic() - began:.0f} s; load {os.getloadavg()[0]:.1f}", flush=True)
        with moto_server(cluster.logs, prefix=cluster.in_netns([])) as endpoint:
            make_bucket(endpoint, "runs", prefix=cluster.in_netns([]))
            # warm the feature cache once (every variant then reads the same cached features)
            warm = subprocess.run([sys.executable, "-m", "fedpgp_ray.run", *run_args(str(base / "warm"), 1, "local")],
                                  cwd=ROOT, env={**os.environ, **env_vars}, capture_output=True, text=True)
            assert warm.returncode == 0, warm.stderr[-3000:]
            for rep in range(args.repeats):
                out = cluster.shared / f"b{rep}"
                t = time.monotonic()
                job = cluster.submit(f"bench-b{rep}", ["python", "-m", "fedpgp_ray.run",
                                                        *run_args(str(out), args.rounds, "ray")], env_vars)
                assert job.returncode == 0, job.stdout[-3000:]
                results["b_shared"].append(summarize(json.loads((out / "results.json").read_text()),
                                                     time.monotonic() - t) | {"bytes": bytes_per_round(out, args.rounds)})
                print(f"[b] shared path: {results['b_shared'][-1]['s_per_round']:.2f} s/round", flush=True)

                uri = s3_uri(endpoint, "runs", f"bench/c{rep}")
                t = time.monotonic()
                job = cluster.submit(f"bench-c{rep}", ["python", "-m", "fedpgp_ray.run",
                                                        *run_args(uri, args.rounds, "ray")], {**env_vars, **S3_ENV})
                assert job.returncode == 0, job.stdout[-3000:]
                doc = json.loads(cluster.python("import sys; from fedpgp_ray.storage import RunStorage; "
                                                "print(RunStorage(sys.argv[1]).read_text('results.json'))", uri,
                                                env={**cluster.env, **S3_ENV}))
                results["c_s3"].append(summarize(doc, time.monotonic() - t))
                print(f"[c] s3://: {results['c_s3'][-1]['s_per_round']:.2f} s/round", flush=True)

                out = base / f"l{rep}"
                t = time.monotonic()
                local = subprocess.run([sys.executable, "-m", "fedpgp_ray.run", *run_args(str(out), args.rounds, "local")],
                                       cwd=ROOT, env={**os.environ, **env_vars}, capture_output=True, text=True)
                assert local.returncode == 0, local.stderr[-3000:]
                results["l_in_process"].append(summarize(json.loads((out / "results.json").read_text()),
                                                         time.monotonic() - t))
                print(f"[l] in-process: {results['l_in_process'][-1]['s_per_round']:.2f} s/round", flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    mean = {k: statistics.mean(r["s_per_round"] for r in v) for k, v in results.items()}
    written = results["b_shared"][-1]["bytes"]
    lines = [f"cluster storage benchmark: quickstart (10 clients, {args.rounds} rounds x 2 epochs), "
             f"{args.repeats} repeat(s); load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
             f"{'variant':<44}{'s/round':>9}{'vs (b)':>8}{'run s':>8}{'job s':>8}",
             *[f"{label:<44}{mean[k]:>9.2f}{mean[k] / mean['b_shared']:>7.2f}x"
               f"{statistics.mean(r['run_s'] for r in results[k]):>8.1f}{statistics.mean(r['job_s'] for r in results[k]):>8.1f}"
               for k, label in (("b_shared", "(b) two nodes, shared path"), ("c_s3", "(c) two nodes, s3:// (moto)"),
                                ("l_in_process", "single node, in-process runtime"))],
             f"bytes written to run storage per round: {written['total']:,} ({written['n_clients']} client states x "
             f"{written['per_client']:,.0f} B + server checkpoint {written['server']:,} B)",
             f"final metrics equal (b) vs (c): {results['b_shared'][-1]['final'] == results['c_s3'][-1]['final']}"]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "mean_s_per_round": mean}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
