"""Serving benchmark: logged size per client, model loading time, pyfunc and HTTP throughput, and a
served client model's Local / Base / Novel accuracy beside the run's own figures.

    python benchmarks/serving.py [--run-dir DIR] [--rounds 2] [--client 0] [--requests 60] [--threads N] [--json OUT]

Without --run-dir it first runs the quickstart (shipped tiny CLIP, 10 clients, in-process,
`--rounds` rounds of 1 local epoch) into a temporary folder; the run logs and registers its
models (tracking.log_models). With --run-dir it uses a finished run whose models are registered
in its store (mlflow_run.json names it). Then, on this machine:

  size        bytes of each logged model (all its files) and of its prompt tensors alone;
  load        mlflow.pyfunc.load_model in a fresh process: first model (backbone + prompt) and a
              second one in the same process (prompt only: the backbone is shared);
  pyfunc      images/s through model.predict (base64 PNG decoding included), batches of 1 and 32;
  http        images/s through `mlflow models serve --env-manager local` on 127.0.0.1 (one client
              sending requests one after another), batches of 1 and 32;
  accuracy    the served client model (HTTP) on the client's Local, Base and Novel test sets,
              next to results.json's final figures for that client.

--threads N sets torch's threads here and OMP_NUM_THREADS of the server (on a busy machine 1 is
much faster than the default: idle OpenMP threads spin). Figures only, no assertions
(tests/test_serving.py checks behaviour).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

LOAD_SCRIPT = """
import sys, time
began = time.perf_counter()
import mlflow, fedpgp_ray.serving
imported = time.perf_counter()
mlflow.pyfunc.load_model(sys.argv[1])
first = time.perf_counter()
mlflow.pyfunc.load_model(sys.argv[2])
second = time.perf_counter()
print(imported - began, first - imported, second - first)
"""


def quick_run(root: Path, rounds: int) -> Path:
    from fedpgp_ray.run import main as run_main

    out = root / "run"
    sets = [f"train.rounds={rounds}", "train.local_epochs=1", "runtime.kind=local", "evaluation.every=1",
            f"output_dir={out}", f"tracking.uri=sqlite:///{root}/mlflow.db", "tracking.experiment=serving-bench"]
    if run_main([a for s in sets for a in ("--set", s)] + ["--no-progress"]) != 0:
        raise SystemExit("the quickstart run failed")
    return out


def registered(client, run_id: str) -> dict[str, tuple[str, str, str]]:
    """model name (client-3, global) -> (registered name, version, logged model id) for the run."""
    out = {}
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        model_id = version.source.removeprefix("models:/")
        out[client.get_logged_model(model_id).name] = (version.name, version.version, model_id)
    return out


def model_files(client, model_id: str, path: str | None = None) -> dict[str, int]:
    files = {}
    for item in client.list_logged_model_artifacts(model_id, path):
        files.update(model_files(client, model_id, item.path) if item.is_dir else {item.path: item.file_size or 0})
    return files


def throughput(send, frames: list[pd.DataFrame], repeat: int) -> float:
    """Images per second of `send(frame)` over `repeat` calls cycling through `frames` (after one warm-up)."""
    send(frames[0])
    began = time.perf_counter()
    images = 0
    for i in range(repeat):
        frame = frames[i % len(frames)]
        send(frame)
        images += len(frame)
    return images / (time.perf_counter() - began)


def post(port: int, frame: pd.DataFrame, params: dict | None = None) -> dict:
    payload = {"dataframe_split": frame.to_dict(orient="split"), **({"params": params} if params else {})}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def start_server(uri: str, model_uri: str, log_path: Path) -> tuple[subprocess.Popen, int, float]:
    from s3_server import free_port

    port = free_port()
    began = time.perf_counter()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri,
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "MLFLOW_TRACKING_URI": uri,  # uvicorn from this environment
                                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
                              stdout=log_path.open("w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    while True:
        if server.poll() is not None:
            raise SystemExit(f"mlflow models serve exited: {log_path.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
            return server, port, time.perf_counter() - began
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", help="a finished run with registered models (default: run the quickstart)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the quickstart run (default 2)")
    parser.add_argument("--client", type=int, default=0, help="the client whose model is timed and scored")
    parser.add_argument("--requests", type=int, default=60, help="timed requests per batch size (default 60)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads here and OMP_NUM_THREADS of the server (default 0: torch's default)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.threads:  # before torch starts its thread pool; the server and the load probe inherit it
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import mlflow
    from mlflow import MlflowClient

    from fedpgp_ray import serving
    from fedpgp_ray.config import load_config
    from fedpgp_ray.data.partition import partition_dataset
    from fedpgp_ray.data.registry import build_dataset

    tmp = Path(tempfile.mkdtemp(prefix="fedpgp-serving-bench-"))
    run_dir = Path(args.run_dir).resolve() if args.run_dir else quick_run(tmp, args.rounds)
    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    uri, run_id = saved["tracking_uri"], saved["run_id"]
    os.environ["MLFLOW_TRACKING_URI"] = uri
    client = MlflowClient(uri)
    models = registered(client, run_id)
    name, version, model_id = models[f"client-{args.client}"]
    model_uri = f"models:/{name}/{version}"
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    figures: dict = {"run_dir": str(run_dir), "tracking_uri": uri, "model": model_uri,
                     "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    print(f"run {run_dir} (measure it again with --run-dir); torch threads {torch.get_num_threads()} on "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    # size ------------------------------------------------------------------------------------------
    sizes = {}
    for key, (_, _, mid) in sorted(models.items()):
        files = model_files(client, mid)
        sizes[key] = {"total": sum(files.values()),
                      "prompt": sum(v for k, v in files.items() if k.endswith("prompt.pt"))}
    figures["size_bytes"] = sizes
    clients = [v for k, v in sizes.items() if k.startswith("client-")]
    print(f"logged per client model: {statistics.mean(c['total'] for c in clients) / 1024:.1f} KiB "
          f"(prompt tensors {statistics.mean(c['prompt'] for c in clients) / 1024:.1f} KiB); global model "
          f"{sizes.get('global', {}).get('total', 0) / 1024:.1f} KiB; backbone referenced, not copied")

    # load ------------------------------------------------------------------------------------------
    other = next(f"models:/{n}/{v}" for k, (n, v, _) in models.items() if k != f"client-{args.client}")
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, model_uri, other], capture_output=True, text=True,
                         env={**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    imports, first, second = map(float, out.stdout.split()[-3:])
    figures["load_seconds"] = {"imports": imports, "first_model": first, "further_model": second}
    print(f"load: imports {imports:.2f} s, first model {first:.2f} s (backbone + prompt), "
          f"a further model {second:.3f} s (prompt; backbone shared)")

    # data --------------------------------------------------------------------------------------------
    cfg = load_config(run_dir / "config.yaml", [f"output_dir={run_dir}"])
    dataset = build_dataset(cfg.data, cfg.seed)
    partition = partition_dataset(dataset, cfg.data, cfg.federation.num_clients, cfg.seed)
    encoded = [serving.encode_image(dataset.test.load(int(i))) for i in partition.base.indices[:320]]
    frames = {b: [pd.DataFrame({"image": encoded[s:s + b]}) for s in range(0, len(encoded) - b + 1, b)]
              for b in (1, 32)}

    # pyfunc --------------------------------------------------------------------------------------------
    model = mlflow.pyfunc.load_model(model_uri)
    figures["pyfunc_images_per_s"] = {b: throughput(model.predict, frames[b], args.requests) for b in (1, 32)}
    print("pyfunc: " + ", ".join(f"batch {b}: {v:.0f} images/s" for b, v in figures["pyfunc_images_per_s"].items()))

    # http --------------------------------------------------------------------------------------------
    server, port, startup = start_server(uri, model_uri, tmp / "serve.log")
    try:
        figures["serve_startup_seconds"] = startup
        figures["http_images_per_s"] = {b: throughput(lambda f: post(port, f), frames[b], args.requests)
                                        for b in (1, 32)}
        print(f"http (mlflow models serve, up in {startup:.1f} s): " + ", ".join(
            f"batch {b}: {v:.0f} images/s" for b, v in figures["http_images_per_s"].items()))

        # accuracy ------------------------------------------------------------------------------------
        part = partition.clients[args.client]
        sets = {"local": part.local, "base": partition.base, **({"novel": partition.novel} if partition.novel else {})}
        run_figures = json.loads((run_dir / "results.json").read_text())["final_clients"][str(args.client)]
        accuracy = {}
        for key, eval_set in sets.items():
            names = [partition.classnames[c] for c in eval_set.classes]
            labels = []
            for s in range(0, len(eval_set.indices), 64):
                chunk = eval_set.indices[s:s + 64]
                frame = pd.DataFrame({"image": [serving.encode_image(dataset.test.load(int(i))) for i in chunk]})
                labels += [r["label"] for r in post(port, frame, {"classes": names})["predictions"]]
            truth = [partition.classnames[y] for y in dataset.test.labels[eval_set.indices]]
            accuracy[key] = {"served": 100.0 * float(np.mean(np.asarray(labels) == np.asarray(truth))),
                             "run": run_figures.get(key), "images": len(truth)}
        figures["accuracy"] = accuracy
        print(f"client {args.client} served over HTTP vs the run's figures: " + ", ".join(
            f"{k} {v['served']:.2f} (run {v['run']:.2f}, {v['images']} images)" for k, v in accuracy.items()))
    finally:
        stop_server(server)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
