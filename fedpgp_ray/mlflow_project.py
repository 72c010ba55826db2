"""The MLflow Projects entry point (mlflow_projects/fedpgp/MLproject): `python -m fedpgp_ray.mlflow_project
[run|compare|bench] --workdir DIR --name value ...` maps project parameters onto the CLI commands.

`mlflow run` executes the command inside the project folder, so the MLproject passes the
directory `mlflow run` was started from as `--workdir` (a `path` parameter, which MLflow makes
absolute against the caller's working directory); this module changes into it first, so relative
config paths and output_dir land there, never inside mlflow_projects/. The run that `mlflow run`
created is handed over through MLFLOW_RUN_ID / MLFLOW_TRACKING_URI and picked up by the tracker.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

def project_argv(config: str = "", rounds: str = "", algorithm: str = "", seed: str = "",
                 overrides: str = "", output_dir: str = "") -> list[str]:
    """MLproject parameters -> `fedpgp-ray run` arguments; an empty value keeps the config's value.

    algorithm: one name, or several comma-separated (run one after another: `--algorithms`).
    overrides: shell-style list of key.path=value, e.g. "train.lr=0.01 federation.num_clients=4".
    """
    argv = ["--config", config] if config else []
    sets = [f"train.rounds={rounds}"] * bool(rounds) + [f"seed={seed}"] * bool(seed)
    sets += [f"output_dir={output_dir}"] * bool(output_dir)
    if "," in algorithm:
        argv += ["--algorithms", algorithm]
    elif algorithm:
        sets.append(f"algorithm.name={algorithm}")
    sets += shlex.split(overrides)
    return argv + [arg for item in sets for arg in ("--set", item)]


def passthrough_argv(pairs: list[str]) -> list[str]:
    """`--name value` pairs from an MLproject command -> the command's arguments.

    Empty and "false" values are dropped (the command's default applies), "true" becomes a bare
    flag, and `--overrides "k=v k2=v2"` becomes `--set k=v --set k2=v2`.
    """
    if len(pairs) % 2 or not all(flag.startswith("--") for flag in pairs[::2]):
        raise SystemExit(f"error: expected --name value pairs, got {pairs}")
    out, sets = [], []
    for flag, value in zip(pairs[::2], pairs[1::2]):
        if flag == "--overrides":
            sets += shlex.split(value)
        elif value not in ("", "false"):
            out += [flag] if value == "true" else [flag, value]
    return out + [arg for item in sets for arg in ("--set", item)]


def _log_bench_json(path: Path) -> None:
    """Under `mlflow run` (MLFLOW_RUN_ID set), attach the benchmark's JSON to the handed-over run."""
    if not (os.environ.get("MLFLOW_RUN_ID") and path.is_file()):
        return
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI")).log_artifact(
        os.environ["MLFLOW_RUN_ID"], str(path), "bench")


def project_main(argv: list[str] | None = None) -> int:
    """`python -m fedpgp_ray.mlflow_project [run|compare|bench] [--workdir DIR] --name value ...`.

    run (entry point main): config / rounds / algorithm / seed / overrides / output-dir, mapped
    by `project_argv`. compare, bench: `--name value` passed through (`passthrough_argv`); bench's
    JSON is logged to the MLflow run that `mlflow run` handed over.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "run"
    if len(argv) >= 2 and argv[0] == "--workdir":
        workdir = Path(argv[1])
        if not workdir.is_dir():
            print(f"error: --workdir {workdir} is not a directory: pass the directory to write runs under",
                  file=sys.stderr)
            return 2
        os.chdir(workdir)
        argv = argv[2:]
    if os.environ.get("MLFLOW_EXPERIMENT_ID") == "0":
        print("note: `mlflow run` put this run in the experiment 'Default'; pass --experiment-name NAME "
              "(e.g. the config's tracking.experiment) to `mlflow run` to group runs", file=sys.stderr)
    if command == "compare":
        from fedpgp_ray.compare import main as compare_main

        return compare_main(passthrough_argv(argv))
    if command == "bench":
        from fedpgp_ray.bench import main as bench_main

        args = passthrough_argv(argv)
        with tempfile.TemporaryDirectory(prefix="fedpgp-bench-") as tmp:
            if "--json" not in args:
                args += ["--json", str(Path(tmp) / "bench.json")]
            code = bench_main(args)
            if code == 0:
                _log_bench_json(Path(args[args.index("--json") + 1]))
        return code
    if command != "run":
        print(f"error: unknown command {command!r}: choose run, compare or bench", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m fedpgp_ray.mlflow_project",
                                     description="MLflow Projects entry point (mlflow_projects/fedpgp): "
                                                 "runs `fedpgp-ray run`; empty values keep the config's")
    for name in ("config", "rounds", "algorithm", "seed", "overrides", "output-dir"):
        parser.add_argument(f"--{name}", default="")
    args = parser.parse_args(argv)
    from fedpgp_ray.run import main

    # One MLflow run, one run directory: a second `mlflow run` must not land in (and be refused by)
    # the directory of the first.
    output_dir = args.output_dir or (f"runs/mlflow-{os.environ['MLFLOW_RUN_ID']}"
                                     if os.environ.get("MLFLOW_RUN_ID") else "")
    return main(project_argv(args.config, args.rounds, args.algorithm, args.seed, args.overrides, output_dir))


if __name__ == "__main__":
    sys.exit(project_main())
