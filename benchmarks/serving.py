"""Serving benchmark: a run's personalised model for 10, 1,000 and 10,000 clients from one Ray Serve
replica, against one `mlflow models serve` per client; and personal vs global prompt accuracy.

    python benchmarks/serving.py [--run-dir DIR] [--rounds 2] [--clients 10,1000,10000] [--requests 160]
                                 [--baseline-servers 10] [--json OUT]

Without --run-dir it first runs the quickstart (shipped tiny CLIP, 10 clients, in-process, `--rounds`
rounds of 1 local epoch, tracking on, `tracking.log_client_models=true` for the baseline's one-client
models) into a temporary folder. Then, on this machine:

  accuracy      each client's Local / Base / Novel accuracy with its personal prompt and with the
                global prompt (the registered model, in-process), averaged over clients;
  per N         a run directory of N clients: the run's server checkpoint, and client c's personal
                factors = client (c mod 10)'s plus small seeded noise, saved as client checkpoints;
    register    seconds of `model_registry.log_run_models` (what a run's end does: reads N client
                checkpoints, writes the factor file, logs and registers one model);
    load        seconds from `serve.run` to a ready application (one replica, 1 CPU);
    memory      the replica process's RSS after the load tests (every client's factors touched);
    load tests  8 concurrent requesters, each request `--batch` images of a random client in [0, N):
                p50 / p99 latency and images/s, at batch 1 and 16;
  baseline      `mlflow models serve` of one client model (OMP_NUM_THREADS=1): start-up, RSS of its
                processes, the same load tests (that one client); `--baseline-servers` such servers
                started one after another for their RSS, extrapolated linearly to N clients.

Figures only, no assertions (tests/test_serve.py checks behaviour).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from processes import free_port, stop_group  # noqa: E402

BASE_CLIENTS = 10


def rss_mb(pid: int) -> float:
    try:
        match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return 0.0
    return int(match.group(1)) / 1024 if match else 0.0


def group_rss_mb(pgid: int) -> float:
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    total += rss_mb(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return total


def quick_run(root: Path, rounds: int) -> Path:
    from fedpgp_ray.run import main as run_main

    out = root / "run"
    sets = [f"train.rounds={rounds}", "train.local_epochs=1", "runtime.kind=local", "evaluation.every=1",
            f"output_dir={out}", f"tracking.uri=sqlite:///{root}/mlflow.db", "tracking.experiment=serving-bench",
            "tracking.log_client_models=true"]
    if run_main([a for s in sets for a in ("--set", s)] + ["--no-progress"]) != 0:
        raise SystemExit("the quickstart run failed")
    return out


def post(port: int, body: bytes, timeout: float = 300) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def load_test(port: int, images: list[str], batch: int, clients: int | None, requests: int) -> dict:
    """8 concurrent requesters; each request `batch` images of a random client (None: no client param)."""
    rng = random.Random(batch)
    bodies = []
    for _ in range(requests):
        start = rng.randrange(0, len(images) - batch + 1)
        payload = {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images[start:start + batch]]}}
        if clients:
            payload["params"] = {"client_id": rng.randrange(clients)}
        bodies.append(json.dumps(payload).encode())
    post(port, bodies[0])  # warm-up
    latencies: list[float] = []
    errors = 0

    def one(body: bytes) -> None:
        nonlocal errors
        began = time.perf_counter()
        status, _ = post(port, body)
        latencies.append(time.perf_counter() - began)
        errors += status != 200

    began = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, bodies))
    wall = time.perf_counter() - began
    latencies.sort()
    return {"p50_ms": 1000 * latencies[len(latencies) // 2], "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
            "images_per_s": requests * batch / wall, "errors": errors}


def make_clients_run(base: Path, target: Path, clients: int) -> None:
    """A run directory of `clients` clients from the base run (see the module doc)."""
    import shutil

    import torch
    import yaml

    from fedpgp_ray.checkpoint import CheckpointStore

    target.mkdir(parents=True)
    config = yaml.safe_load((base / "config.yaml").read_text())
    config["federation"]["num_clients"] = clients
    config["tracking"]["log_client_models"] = False  # what a run does by default: the personalised model only
    config["output_dir"] = str(target)
    (target / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copy(base / "results.json", target / "results.json")
    (target / "checkpoints" / "server").mkdir(parents=True)
    newest = max((base / "checkpoints" / "server").glob("round_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    shutil.copy(newest, target / "checkpoints" / "server" / newest.name)
    rnd = int(newest.stem.split("_")[1])
    source = CheckpointStore(base / "checkpoints")
    store = CheckpointStore(target / "checkpoints")
    originals = [source.load_client(c, rnd)["personal"] for c in range(BASE_CLIENTS)]
    generator = torch.Generator().manual_seed(clients)
    for c in range(clients):
        personal = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=generator)
                    for k, v in originals[c % BASE_CLIENTS].items()}
        store.save_client(c, rnd, {"personal": personal})


def register(run_dir: Path, uri: str, clients: int) -> tuple[str, float]:
    """(models:/ URI, seconds) of what a run's end does for `run_dir`, in a fresh MLflow run."""
    from mlflow import MlflowClient

    from fedpgp_ray import model_registry
    from fedpgp_ray.config import load_config

    cfg = load_config(run_dir / "config.yaml", [f"output_dir={run_dir}"])
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("serving-bench-scale") or None
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("serving-bench-scale")
    run = client.create_run(experiment_id, run_name=f"{clients}-clients")
    results = json.loads((run_dir / "results.json").read_text())
    began = time.perf_counter()
    models = model_registry.log_run_models(cfg, client, run.info.run_id, uri, results)
    seconds = time.perf_counter() - began
    client.set_terminated(run.info.run_id)
    return f"models:/{models[0]['name']}/{models[0]['version']}", seconds


def accuracy(model_uri: str, run_dir: Path) -> dict:
    """Mean over clients of Local / Base / Novel accuracy, with the personal and the global prompt."""
    import mlflow
    import numpy as np
    import torch

    from fedpgp_ray.config import load_config
    from fedpgp_ray.data.partition import partition_dataset
    from fedpgp_ray.data.registry import build_dataset

    classifier = mlflow.pyfunc.load_model(model_uri).unwrap_python_model().classifier
    cfg = load_config(run_dir / "config.yaml", [f"output_dir={run_dir}"])
    dataset = build_dataset(cfg.data, cfg.seed)
    partition = partition_dataset(dataset, cfg.data, cfg.federation.num_clients, cfg.seed)
    encoded: dict[int, tuple] = {}  # id(eval set) -> the backbone's output: one pass per evaluation set

    def encode(eval_set) -> tuple:
        if id(eval_set) not in encoded:
            with torch.inference_mode():
                batch = torch.stack([classifier.clip.preprocess(dataset.test.load(int(i))) for i in eval_set.indices])
                encoded[id(eval_set)] = classifier.encode(batch)
        return encoded[id(eval_set)]

    out: dict = {"personal": {}, "global": {}}
    for part in partition.clients:
        sets = {"local": part.local, "base": partition.base, **({"novel": partition.novel} if partition.novel else {})}
        for key, eval_set in sets.items():
            names = [partition.classnames[c] for c in eval_set.classes]
            truth = np.asarray([partition.classnames[y] for y in dataset.test.labels[eval_set.indices]])
            features, extra = encode(eval_set)
            for prompt, cid in (("personal", part.client_id), ("global", None)):
                [(got_names, probs, _)] = classifier.classify_features(features, extra,
                                                                       [(len(features), cid, names)])
                labels = np.asarray(got_names)[probs.argmax(dim=1).numpy()]
                out[prompt].setdefault(key, []).append(100.0 * float(np.mean(labels == truth)))
    return {prompt: {k: statistics.mean(v) for k, v in sets.items()} for prompt, sets in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", help="a finished 10-client run with tracking and client models "
                                          "(default: run the quickstart)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the quickstart run (default 2)")
    parser.add_argument("--clients", default="10,1000,10000",
                        help="federation sizes (default 10,1000,10000; '' for the accuracy figures alone)")
    parser.add_argument("--requests", type=int, default=160, help="requests per load test (default 160)")
    parser.add_argument("--baseline-servers", type=int, default=10,
                        help="one-client `mlflow models serve` started for their memory (default 10)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"  # this process, the replicas and the baseline servers alike
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    import torch

    torch.set_num_threads(1)
    from mlflow import MlflowClient

    from fedpgp_ray import serving_io
    from fedpgp_ray.config import load_config
    from fedpgp_ray.data.registry import build_dataset

    tmp = Path(tempfile.mkdtemp(prefix="fedpgp-serving-bench-"))
    base = Path(args.run_dir).resolve() if args.run_dir else quick_run(tmp, args.rounds)
    saved = json.loads((base / "mlflow_run.json").read_text())
    uri = saved["tracking_uri"]
    os.environ["MLFLOW_TRACKING_URI"] = uri
    client = MlflowClient(uri)
    by_name = {}
    for version in client.search_model_versions(f"run_id = '{saved['run_id']}'"):
        by_name[client.get_logged_model(version.source.removeprefix("models:/")).name] = \
            f"models:/{version.name}/{version.version}"
    figures: dict = {"run_dir": str(base), "tracking_uri": uri, "cpus": os.cpu_count(),
                     "load_average": os.getloadavg()}
    print(f"run {base} (measure it again with --run-dir); {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; every process 1 torch thread", flush=True)

    acc = accuracy(by_name["personal"], base)
    figures["accuracy"] = acc
    print("accuracy, mean over clients: " + "; ".join(
        f"{prompt} prompt " + ", ".join(f"{k} {v:.2f}" for k, v in sets.items()) for prompt, sets in acc.items()),
        flush=True)

    if not args.clients:  # --clients "": the accuracy figures only
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
        return 0
    cfg = load_config(base / "config.yaml", [f"output_dir={base}"])
    dataset = build_dataset(cfg.data, cfg.seed)
    images = [serving_io.encode_image(dataset.test.load(i)) for i in range(256)]

    # personalised model, one replica, per N -------------------------------------------------------------
    import ray
    from ray import serve

    from fedpgp_ray.serve_app import PromptServer, Source

    scale = {}
    runs = {}
    for n in [int(x) for x in args.clients.split(",")]:
        runs[n] = tmp / f"clients-{n}"
        make_clients_run(base, runs[n], n)
        model_uri, seconds = register(runs[n], uri, n)
        scale[n] = {"model": model_uri, "register_s": seconds}
        print(f"{n} clients: registered {model_uri} in {seconds:.1f} s", flush=True)
    port = free_port()
    ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for n, row in scale.items():
            app = PromptServer.options(num_replicas=1, ray_actor_options={"num_cpus": 1}).bind(
                Source(model_uri=row["model"], tracking_uri=uri), 16 * 2**20, 0, 16, 0.01, 1)
            began = time.perf_counter()
            serve.run(app, name="bench", route_prefix="/")
            row["load_s"] = time.perf_counter() - began
            info = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=30).read())
            for batch in (1, 16):
                row[f"batch_{batch}"] = load_test(port, images, batch, n, args.requests)
            row["replica_rss_mb"] = rss_mb(info["replica_pid"])
            print(f"{n} clients: loaded in {row['load_s']:.1f} s, replica RSS {row['replica_rss_mb']:.0f} MB, "
                  + "; ".join(f"batch {b}: p50 {row[f'batch_{b}']['p50_ms']:.0f} ms, p99 {row[f'batch_{b}']['p99_ms']:.0f}"
                              f" ms, {row[f'batch_{b}']['images_per_s']:.0f} images/s, {row[f'batch_{b}']['errors']} errors"
                              for b in (1, 16)), flush=True)
            serve.delete("bench")
    finally:
        ray.shutdown()
    figures["personalised"] = {str(k): v for k, v in scale.items()}

    # baseline: one mlflow models serve per client ---------------------------------------------------------
    baseline: dict = {"servers": []}
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for c in range(args.baseline_servers):
        port = free_port()
        log = (tmp / f"mlflow-serve-{c}.log").open("w")
        began = time.perf_counter()
        server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                                   by_name[f"client-{c % BASE_CLIENTS}"], "--env-manager", "local", "-h", "127.0.0.1",
                                   "-p", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"mlflow models serve exited: {(tmp / f'mlflow-serve-{c}.log').read_text()[-2000:]}")
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                    break
                except (urllib.error.URLError, OSError):
                    time.sleep(0.5)
            entry = {"startup_s": time.perf_counter() - began}
            if c == 0:
                for batch in (1, 16):
                    entry[f"batch_{batch}"] = load_test(port, images, batch, None, args.requests)
            else:
                post(port, json.dumps({"dataframe_split": {"columns": ["image"], "data": [[images[0]]]}}).encode())
            entry["rss_mb"] = group_rss_mb(server.pid)
            baseline["servers"].append(entry)
            print(f"mlflow models serve #{c}: up in {entry['startup_s']:.1f} s, RSS {entry['rss_mb']:.0f} MB"
                  + ("; " + "; ".join(f"batch {b}: p50 {entry[f'batch_{b}']['p50_ms']:.0f} ms, p99 "
                                      f"{entry[f'batch_{b}']['p99_ms']:.0f} ms, {entry[f'batch_{b}']['images_per_s']:.0f}"
                                      f" images/s" for b in (1, 16)) if c == 0 else ""), flush=True)
        finally:
            stop_group(server)
            log.close()
    per_server = statistics.mean(s["rss_mb"] for s in baseline["servers"])
    baseline["rss_mb_per_server"] = per_server
    figures["baseline"] = baseline

    one = baseline["servers"][0]
    print("\n| clients | registration | replica RSS | load | batch 1: p50 / p99 / images/s | batch 16: p50 / p99 / "
          "images/s | one `mlflow models serve` per client: RSS (x = extrapolated) |")
    print("|---|---|---|---|---|---|---|")
    for n, row in scale.items():
        b1, b16 = row["batch_1"], row["batch_16"]
        mark = "" if n <= args.baseline_servers else " x"
        print(f"| {n:,} | {row['register_s']:.1f} s | {row['replica_rss_mb']:,.0f} MB | {row['load_s']:.1f} s | "
              f"{b1['p50_ms']:.0f} ms / {b1['p99_ms']:.0f} ms / {b1['images_per_s']:.0f} | {b16['p50_ms']:.0f} ms / "
              f"{b16['p99_ms']:.0f} ms / {b16['images_per_s']:.0f} | {per_server * n / 1024:,.1f} GB{mark} |")
    print(f"| 1 (`mlflow models serve`, one client) | - | {one['rss_mb']:,.0f} MB | {one['startup_s']:.1f} s | "
          f"{one['batch_1']['p50_ms']:.0f} ms / {one['batch_1']['p99_ms']:.0f} ms / {one['batch_1']['images_per_s']:.0f} | "
          f"{one['batch_16']['p50_ms']:.0f} ms / {one['batch_16']['p99_ms']:.0f} ms / "
          f"{one['batch_16']['images_per_s']:.0f} | {one['rss_mb'] / 1024:.1f} GB |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
