"""Accuracy against epsilon: DP-FedAvg FedPGP at several noise levels, non-DP FedPGP and zero-shot CLIP.

    python benchmarks/privacy_table.py [--seeds 0,1,2] [--noise 0,0.5,1,2,3] [--rounds 60]
                                       [--clients 200] [--fraction 0.1] [--clip 0.1] [--lr 0.01] [--delta 1e-4]
                                       [--json docs/results/privacy_table.json]
    python benchmarks/privacy_table.py --table-only [--json FILE]   # print the table of a saved JSON
    python benchmarks/privacy_table.py --overhead                   # DP's extra work per round, timed
    python benchmarks/privacy_table.py --secagg-at 1 --json docs/results/secagg_privacy_table.json
        # central DP at z = 1 against SecAgg + distributed (Skellam) DP at the same epsilon

The offline world (64 classes, 64 training images per class, Dirichlet(0.5) label skew over
`--clients` clients, at most 16 shots per class and client), one local epoch per round, in-process
runtime, one torch thread, no tracking, no checkpoints. DP runs use `privacy.seeded: true` so the
table is reproducible (a deployment keeps it false). Every finished run is appended to the JSON at
once, so an interrupted sweep keeps what it finished. Printed: a markdown table of mean ± std over
seeds (Local / Base / Novel / HM3, epsilon at delta) and the mean seconds per training round.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fedpgp_ray.config import config_from_dict
from fedpgp_ray.federation import run_federation
from fedpgp_ray.run import feature_cache_dir
from fedpgp_ray.runtime import build_runtime

COLS = ("local", "base", "novel", "hm3")


def world_config(seed: int, args: argparse.Namespace, algorithm: str, noise: float | None,
                 secagg: bool = False) -> dict:
    privacy = {"enabled": False} if noise is None else {
        "enabled": True, "noise_multiplier": noise, "clip_norm": args.clip, "target_delta": args.delta, "seeded": True}
    return {
        **({"secagg": {"enabled": True, "min_survivors": args.min_survivors}} if secagg else {}),
        "seed": seed, "output_dir": "/tmp/fedpgp-privacy-table",
        "data": {"partition": "dirichlet", "beta": 0.5, "shots": 16,
                 "world": {"num_classes": 64, "train_per_class": 64, "test_per_class": 20}},
        "algorithm": {"name": algorithm},
        "train": {"rounds": args.rounds, "local_epochs": 1, "lr": args.lr},
        "federation": {"num_clients": args.clients, "client_fraction": args.fraction},
        "evaluation": {"every": 10_000},  # round 0 and the last round only
        "runtime": {"kind": "local", "threads_per_worker": 1},
        "tracking": {"mlflow": False},
        "privacy": privacy,
    }


def run_one(seed: int, args: argparse.Namespace, algorithm: str, noise: float | None, secagg: bool = False) -> dict:
    cfg = config_from_dict(world_config(seed, args, algorithm, noise, secagg))
    began = time.perf_counter()
    with build_runtime(cfg, None, feature_cache_dir()) as runtime:
        doc = run_federation(cfg, runtime)
    train_rounds = [r["metrics"]["round_seconds"] for r in doc["rounds"] if r["round"] > 0]
    return {"setting": label(algorithm, noise, secagg), "seed": seed, "noise": noise, "final": doc["final"],
            "epsilon": doc.get("privacy", {}).get("epsilon"), "privacy": doc.get("privacy"),
            "seconds_per_round": statistics.mean(train_rounds) if train_rounds else 0.0,
            "clients_per_round": statistics.mean([r["metrics"].get("clients_sampled", 0) for r in doc["rounds"]
                                                  if r["round"] > 0] or [0]),
            "wall_seconds": time.perf_counter() - began}


def label(algorithm: str, noise: float | None, secagg: bool = False) -> str:
    if algorithm == "clip":
        return "zero-shot CLIP"
    if secagg:
        return f"FedPGP SecAgg + distributed DP z={noise:.3f}"
    return "FedPGP (no DP)" if noise is None else f"FedPGP DP z={noise:g}"


def ddp_noise_for(args: argparse.Namespace, central_noise: float) -> float:
    """The noise multiplier at which SecAgg + distributed Skellam DP reaches central DP's epsilon (bisection)."""
    from fedpgp_ray import privacy
    from fedpgp_ray.federation import build_strategy

    target = privacy.epsilon(args.fraction, central_noise, args.rounds, args.delta)
    eps = lambda z: build_strategy(config_from_dict(world_config(0, args, "fedpgp", z, True))).epsilon(args.rounds)
    lo, hi = central_noise, 4 * central_noise
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= target else (mid, hi)
    return hi


def table(runs: list[dict]) -> str:
    fmt = lambda xs: f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"
    lines = ["| setting | seeds | ε (δ) | Local | Base | Novel | HM3 | s/round |", "|---|---|---|---|---|---|---|---|"]
    for setting in dict.fromkeys(r["setting"] for r in runs):
        group = [r for r in runs if r["setting"] == setting]
        p = group[0]["privacy"]
        eps = "—" if p is None else ("∞" if p["epsilon"] is None else f"{p['epsilon']:.2f}")
        if p is not None:
            eps += f" ({p['delta']:g})"
        cells = [fmt([g["final"][c] for g in group]) for c in COLS]
        secs = statistics.mean(g["seconds_per_round"] for g in group)
        lines.append(f"| {setting} | {len(group)} | {eps} | " + " | ".join(cells) + f" | {secs:.3f} |")
    return "\n".join(lines)


def overhead(args: argparse.Namespace, repeats: int = 200) -> str:
    """Time what DP adds to a round of this table's setting (FedPGP sigma [16, 64], q N clients):
    the client's clip, the server's DP aggregate against the weighted mean, and the accountant."""
    from fedpgp_ray import privacy
    from fedpgp_ray.strategy import aggregate_weighted

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    glob = {"sigma": torch.randn(16, 64, generator=gen) * 0.02}
    clients = round(args.fraction * args.clients)
    uploads = [{"sigma": glob["sigma"] + torch.randn(16, 64, generator=gen) * 0.01} for _ in range(clients)]

    def timed(fn) -> float:  # CPU seconds of this process: robust to other load on a shared machine
        began = time.process_time()
        for _ in range(repeats):
            fn()
        return (time.process_time() - began) / repeats

    clip = timed(lambda: privacy.clip_upload(uploads[0], glob, args.clip))
    weighted = timed(lambda: aggregate_weighted([(u, 10) for u in uploads]))
    updates = [{"sigma": u["sigma"].double() - glob["sigma"].double()} for u in uploads]
    noised = timed(lambda: privacy.dp_aggregate(glob, updates, args.clip, 1.0, args.fraction * args.clients,
                                                privacy.noise_generator(None, 1)))
    began = time.process_time()
    for rnd in range(1, 11):
        privacy.epsilon(args.fraction, 1.0, rnd * args.rounds // 10, args.delta)
    eps = (time.process_time() - began) / 10
    rounds = {name: rounds_cpu(args, noise) for name, noise in (("no DP", None), ("DP z=1", 1.0))}
    per_client = {name: sum(t for t, _ in r) / sum(n for _, n in r) for name, r in rounds.items()}
    return "\n".join([
        f"CPU time, sigma [16, 64], 1 thread, z=1: client clip {clip * 1e6:.0f} us per client; server DP aggregate of "
        f"{clients} uploads {noised * 1e3:.2f} ms vs weighted mean {weighted * 1e3:.2f} ms; epsilon (RDP accountant) "
        f"{eps * 1e3:.0f} ms per round",
        *(f"whole training rounds ({name}, {len(r)} rounds, seed 0): {per_client[name] * 1e3:.1f} ms CPU per sampled "
          f"client, {per_client[name] * clients:.2f} s per {clients}-client round (fit + aggregate"
          f"{' + epsilon' if name != 'no DP' else ''})" for name, r in rounds.items())])


def rounds_cpu(args: argparse.Namespace, noise: float | None, rounds: int = 4) -> list[tuple[float, int]]:
    """(CPU seconds, clients) of training rounds 1..rounds of the table's setting: sample, fit, aggregate."""
    from fedpgp_ray.federation import build_strategy

    cfg = config_from_dict(world_config(0, args, "fedpgp", noise))
    strategy = build_strategy(cfg)
    out = []
    with build_runtime(cfg, None, feature_cache_dir()) as runtime:
        params = runtime.initial_global_params()
        for rnd in range(1, rounds + 1):
            began = time.process_time()
            sampled = strategy.configure_train(rnd)
            results, failures = runtime.fit(rnd, sampled, params)
            params, _ = strategy.aggregate_train(rnd, params, results, failures)
            out.append((time.process_time() - began, len(sampled)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--noise", default="0,0.5,1,2,3", help="noise multipliers of the DP runs")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--delta", type=float, default=1e-4)
    parser.add_argument("--json", default="docs/results/privacy_table.json")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--overhead", action="store_true")
    parser.add_argument("--secagg-at", type=float, default=None, metavar="Z",
                        help="only central DP at noise Z and SecAgg + distributed DP at the same epsilon")
    parser.add_argument("--min-survivors", type=int, default=10, help="secagg.min_survivors of the SecAgg runs")
    args = parser.parse_args(argv)
    if args.overhead:
        print(overhead(args))
        return 0
    out = Path(args.json)
    if args.table_only:
        print(table(json.loads(out.read_text())["runs"]))
        return 0
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [("clip", None, False), ("fedpgp", None, False)] + [("fedpgp", float(z), False)
                                                                   for z in args.noise.split(",")]
    if args.secagg_at is not None:
        settings = [("fedpgp", args.secagg_at, False), ("fedpgp", ddp_noise_for(args, args.secagg_at), True)]
    doc = {"args": vars(args), "runs": []}
    began = time.perf_counter()
    for seed in seeds:  # every setting of a seed before the next seed: a cut-short sweep still covers all rows
        for algorithm, noise, secagg in settings:
            run = run_one(seed, args, algorithm, noise, secagg)
            doc["runs"].append(run)
            doc["sweep_seconds"] = time.perf_counter() - began
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=2))
            print(f"{run['setting']} seed {seed}: {run['final']} eps={run['epsilon']} "
                  f"{run['wall_seconds']:.0f}s", flush=True)
    print(table(doc["runs"]))
    print(f"sweep: {time.perf_counter() - began:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
