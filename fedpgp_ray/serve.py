"""`fedpgp-ray serve`: every client's classifier of a run from one HTTP endpoint (Ray Serve).

    fedpgp-ray serve --model models:/<experiment>-<config>-<dataset>-<algorithm>@newest --tracking-uri URI
    fedpgp-ray serve --run runs/quickstart                       (from the checkpoints, no MLflow store)
    fedpgp-ray serve ... --replicas 2 | --min-replicas 1 --max-replicas 4 [--num-gpus 0.25] [--address ray://...]

Requests as for `mlflow models serve` (POST /invocations, MLflow's JSON formats), with params
`client_id` (none: the global prompt) and `classes`. Replicas follow the alias (or `/latest`): a newly
registered version is loaded and switched to without dropping requests. Ctrl-C (or SIGTERM) stops the
application. See docs/SERVING.md.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

APP_NAME = "fedpgp-ray"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpgp-ray serve",
                                     description="Serve a run's personalised model (every client and the global "
                                                 "prompt) over HTTP with Ray Serve.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="URI", help="the run's registered model: models:/<name>@newest (follows "
                                                       "new versions), models:/<name>/<version>, or a model id")
    source.add_argument("--run", metavar="RUN_DIR", help="a run's output_dir: serve its checkpoints")
    parser.add_argument("--tracking-uri", metavar="URI", help="MLflow store holding --model (default: "
                                                             "$MLFLOW_TRACKING_URI)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--replicas", type=int, default=1, metavar="N", help="fixed number of replicas (default 1)")
    parser.add_argument("--min-replicas", type=int, metavar="N", help="autoscaling: at least N replicas")
    parser.add_argument("--max-replicas", type=int, metavar="N", help="autoscaling: at most N replicas")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    parser.add_argument("--num-gpus", type=float, metavar="G",
                        help="GPUs per replica, fractions allowed (default: 0.5 when the cluster has GPUs, else 0)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests per backbone pass (default 16)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="how long a request waits for others to batch with (default 10 ms)")
    parser.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body (default 16 MiB)")
    parser.add_argument("--poll-s", type=float, default=5.0,
                        help="how often replicas check the alias for a new version (default 5 s; 0: never)")
    parser.add_argument("--address", help="an existing Ray cluster (default: $RAY_ADDRESS, else a local instance)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """One-line errors for arguments, before Ray starts."""
    if args.replicas < 1:
        raise ValueError(f"--replicas {args.replicas}: at least 1")
    if (args.min_replicas is None) != (args.max_replicas is None):
        raise ValueError("autoscaling needs both --min-replicas and --max-replicas")
    if args.min_replicas is not None and not 0 <= args.min_replicas <= args.max_replicas or (
            args.max_replicas is not None and args.max_replicas < 1):
        raise ValueError(f"--min-replicas {args.min_replicas} --max-replicas {args.max_replicas}: need "
                         f"0 <= min <= max and max >= 1")
    for name in ("num_cpus", "max_body_mb", "batch_wait_ms", "poll_s"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must not be negative")
    if args.num_gpus is not None and args.num_gpus < 0:
        raise ValueError(f"--num-gpus {args.num_gpus}: must not be negative")
    if args.max_batch_size < 1:
        raise ValueError(f"--max-batch-size {args.max_batch_size}: at least 1")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: give a TCP port")
    if args.run is not None and not os.path.isfile(os.path.join(args.run, "config.yaml")):
        raise ValueError(f"--run {args.run}: no config.yaml there; pass the output_dir of a run")
    if args.model and args.model.startswith("models:/") and not (args.tracking_uri or
                                                                os.environ.get("MLFLOW_TRACKING_URI")):
        raise ValueError(f"--model {args.model} is looked up in an MLflow store: pass --tracking-uri (the run "
                         f"printed it, e.g. sqlite:////abs/runs/mlflow.db) or set MLFLOW_TRACKING_URI")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if args.model:
            check_model(args.model, tracking_uri)
    except Exception as err:  # noqa: BLE001 - one line for the user's errors
        from fedpgp_ray.predict import user_error

        message = user_error(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return serve_until_stopped(args, tracking_uri)


def check_model(uri: str, tracking_uri: str | None) -> None:
    """The model exists (and a models:/ alias resolves) in the store, before any replica starts."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from fedpgp_ray.serve_app import Source

    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        path = tracking_uri[len("sqlite:///"):].partition("?")[0]
        if path != ":memory:" and not os.path.isfile(path):
            raise ValueError(f"--tracking-uri {tracking_uri}: no MLflow store there; pass the store the run "
                             f"printed (e.g. sqlite:////abs/runs/mlflow.db)")
    source = Source(model_uri=uri, tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        if source.registered() is not None:
            source.version_now(client)
        elif uri.startswith("models:/"):
            client.get_logged_model(uri[len("models:/"):].strip("/"))
    except (MlflowException, ValueError) as err:
        first = (str(getattr(err, "message", err)).strip().splitlines() or ["not found"])[0]
        raise ValueError(f"--model {uri}: {first[:300]} (in {tracking_uri}); list the registered models with "
                         f"`mlflow models` or the MLflow UI") from None


def serve_until_stopped(args: argparse.Namespace, tracking_uri: str | None) -> int:
    import ray
    from ray import serve

    from fedpgp_ray.serve_app import PromptServer, Source

    address = args.address or os.environ.get("RAY_ADDRESS")
    started = not address
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, int(args.num_cpus * (args.max_replicas or args.replicas)) + 1),
                 include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        gpus = args.num_gpus
        if gpus is None:
            gpus = 0.5 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        options: dict = {"ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": gpus}}
        if args.min_replicas is not None:
            options["autoscaling_config"] = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                                             "target_ongoing_requests": args.max_batch_size}
        else:
            options["num_replicas"] = args.replicas
        source = Source(model_uri=args.model, tracking_uri=tracking_uri,
                        run_dir=os.path.abspath(args.run) if args.run else None)
        app = PromptServer.options(**options).bind(source, int(args.max_body_mb * 2**20), args.poll_s,
                                                   args.max_batch_size, args.batch_wait_ms / 1000,
                                                   max(1, int(args.num_cpus)))
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        replicas = (f"{args.min_replicas}-{args.max_replicas} (autoscaling)" if args.min_replicas is not None
                    else str(args.replicas))
        print(f"fedpgp-ray serve: {args.model or args.run} at http://{args.host}:{args.port}/invocations "
              f"({replicas} replica(s), {args.num_cpus:g} CPU / {gpus:g} GPU each); Ctrl-C stops", flush=True)
        stop.wait()
        return 0
    except Exception as err:  # noqa: BLE001 - a replica that cannot load: one line, not Ray's traceback
        text = str(err).strip().splitlines()
        reason = next((line for line in reversed(text) if line.strip() and not line.startswith(" ")), "")
        print(f"error: the application did not start ({type(err).__name__}: {reason[:300]})", file=sys.stderr)
        return 1
    finally:
        if not started:  # an existing cluster: remove this application, leave the cluster as it was
            try:
                serve.delete(APP_NAME)
            except Exception:  # noqa: BLE001 - stopping: nothing more to do
                pass
        ray.shutdown()  # a local instance this command started: stops Serve with it


if __name__ == "__main__":
    sys.exit(main())
