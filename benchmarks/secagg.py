"""Per-round cost of SecAgg+ against plain aggregation, with 10% dropouts.

    python benchmarks/secagg.py [--clients 10,100,1000] [--dims 1024,8192] [--dropout 0.1] [--bits 32]
    python benchmarks/secagg.py --rounds [--clients 10,100]   # whole in-process training rounds, plain vs SecAgg

Protocol part (fedpgp_ray.secagg only, one process, one thread): n clients with random updates of d
coordinates (1024 = the quickstart's sigma, 16 x 64; 8192 = ViT-B/16's n_ctx 16 x 512), the default
graph (k = 3 log2 n) and threshold (t = floor(k/2) + 1); 10% of the clients drop out after sharing
their keys (before their masked input: the costly case, their pairwise masks are rebuilt from t
shares). Every client's stages are timed one by one (CPU seconds of this process), the server's
stages too. Printed per (n, d): client compute (mean and max over clients, all stages), server
compute, bytes each client sends and receives (ring vectors packed at ceil(bits/8) bytes per
coordinate, keys 32 B, ciphertexts as sent), a round time with the clients running in parallel
(sum over stages of the slowest client, plus the server), and the same for plain aggregation
(float32 upload, the server's sample-weighted mean).

--rounds: whole training rounds of the world setting of benchmarks/privacy_table.py (tiny CLIP,
one local epoch, in-process runtime, one thread, clients one after another) with every client
sampled, plain against SecAgg: the round's wall time including training, mean over 3 rounds.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np
import torch

from fedpgp_ray.secagg.protocol import STAGES, SecAggClient, SecAggServer, client_step, make_setup
from fedpgp_ray.secagg.ring import ring_scale


def wire_bytes(message, bits: int) -> int:
    """Bytes of a message as a packed wire format would carry it."""
    if message is None:
        return 0
    if isinstance(message, bytes):
        return len(message)
    if isinstance(message, np.ndarray):
        return message.size * math.ceil(bits / 8)
    if isinstance(message, int):
        return max(math.ceil(message.bit_length() / 8), 1)
    if isinstance(message, str):
        return 1
    if isinstance(message, dict):
        return sum(4 + wire_bytes(v, bits) for v in message.values())
    if isinstance(message, (tuple, list)):
        return sum(wire_bytes(v, bits) for v in message)
    if hasattr(message, "neighbours"):  # the round setup: the client's own neighbour list and the parameters
        return 64
    raise TypeError(type(message))


def protocol_round(n: int, dim: int, dropout: float, bits: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = list(range(n))
    setup = make_setup(1, ids, dim, bits, ring_scale(bits, n, 0.1), 0.1, 2, 0.5, rng)
    clients = {c: SecAggClient(c, setup, rng.uniform(-0.01, 0.01, dim), np.random.default_rng([seed, c])) for c in ids}
    gone = set(rng.choice(n, size=int(round(dropout * n)), replace=False).tolist())
    server = SecAggServer(setup)
    client_cpu = {c: 0.0 for c in ids}
    sent = {c: 0 for c in ids}
    received = {c: 0 for c in ids}
    server_cpu, parallel = 0.0, 0.0
    for stage in STAGES:
        began = time.process_time()
        requests = server.requests(stage)
        server_cpu += time.process_time() - began
        answers, slowest = {}, 0.0
        for c, request in requests.items():
            received[c] += wire_bytes(request, bits) + (64 if stage == "advertise" else 0)
            if stage == "masked_input" and c in gone:
                continue
            began = time.process_time()
            answers[c] = client_step(clients[c], stage, request)
            spent = time.process_time() - began
            client_cpu[c] += spent
            slowest = max(slowest, spent)
            sent[c] += wire_bytes(answers[c], bits)
        began = time.process_time()
        server.receive(stage, answers)
        server_cpu += time.process_time() - began
        parallel += slowest
    exact = np.sum([clients[c].quantised.astype(np.int64) for c in ids if c not in gone], axis=0)
    assert np.array_equal(server.signed_sum() % (1 << bits), exact % (1 << bits))
    # plain: each client uploads float32, the server takes the sample-weighted mean
    updates = [torch.from_numpy(clients[c].update).float() for c in ids if c not in gone]
    began = time.process_time()
    weights = torch.rand(len(updates), dtype=torch.float64)
    _ = sum(u.double() * (w / weights.sum()) for u, w in zip(updates, weights))
    plain_server = time.process_time() - began
    live = [c for c in ids if c not in gone]
    return {"n": n, "dim": dim, "degree": len(setup.neighbours[0]), "threshold": setup.threshold,
            "dropped": len(gone), "client_mean_s": statistics.mean(client_cpu[c] for c in live),
            "client_max_s": max(client_cpu[c] for c in live), "server_s": server_cpu,
            "sent_per_client": statistics.mean(sent[c] for c in live),
            "received_per_client": statistics.mean(received[c] for c in live),
            "round_s": parallel + server_cpu, "plain_server_s": plain_server, "plain_bytes": dim * 4}


def training_rounds(n: int, secagg: bool, rounds: int = 3) -> float:
    """Mean wall seconds of training rounds 1..rounds with all n clients (privacy_table's world setting)."""
    from fedpgp_ray.config import config_from_dict
    from fedpgp_ray.federation import run_federation
    from fedpgp_ray.run import feature_cache_dir
    from fedpgp_ray.runtime import build_runtime

    cfg = config_from_dict({
        "seed": 0, "output_dir": "/tmp/fedpgp-secagg-bench",
        "data": {"partition": "dirichlet", "beta": 0.5, "shots": 16,
                 "world": {"num_classes": 64, "train_per_class": 64, "test_per_class": 20}},
        "train": {"rounds": rounds, "local_epochs": 1, "lr": 0.01},
        "federation": {"num_clients": n},
        "evaluation": {"every": 10_000},
        "runtime": {"kind": "local", "threads_per_worker": 1},
        "tracking": {"mlflow": False},
        **({"secagg": {"enabled": True}} if secagg else {}),
    })
    with build_runtime(cfg, None, feature_cache_dir()) as runtime:
        doc = run_federation(cfg, runtime)
    # round_seconds of the last training round includes its evaluation: use the rounds before it
    times = [r["metrics"]["round_seconds"] for r in doc["rounds"] if 0 < r["round"] < rounds]
    return statistics.mean(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100,1000")
    parser.add_argument("--dims", default="1024,8192")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--rounds", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.rounds:
        print("| clients per round | plain round (s) | SecAgg round (s) | ratio |\n|---|---|---|---|")
        for n in [int(x) for x in args.clients.split(",")]:
            plain, secure = training_rounds(n, False), training_rounds(n, True)
            print(f"| {n} | {plain:.2f} | {secure:.2f} | {secure / plain:.2f} |", flush=True)
        return 0
    print("| n | d | k | t | dropped | client CPU mean / max (s) | server CPU (s) | sent / received per client (KiB) "
          "| plain upload (KiB) | round, clients in parallel (s) | plain server (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in [int(x) for x in args.clients.split(",")]:
        for dim in [int(x) for x in args.dims.split(",")]:
            r = protocol_round(n, dim, args.dropout, args.bits)
            print(f"| {n} | {dim} | {r['degree']} | {r['threshold']} | {r['dropped']} | {r['client_mean_s']:.3f} / "
                  f"{r['client_max_s']:.3f} | {r['server_s']:.3f} | {r['sent_per_client'] / 1024:.1f} / "
                  f"{r['received_per_client'] / 1024:.1f} | {r['plain_bytes'] / 1024:.1f} | {r['round_s']:.3f} | "
                  f"{r['plain_server_s']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
