"""`fedpgp-ray <command> [args]`: one console script, one module per command.

Command modules are imported only when their command runs, and each parses its arguments
before importing torch, Ray or MLflow, so `--help` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> ("module" or "module:function" taking argv and returning the exit code, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("fedpgp_ray.run", "run an experiment (default: the offline quickstart)"),
    "compare": ("fedpgp_ray.compare", "run several algorithms over seeds on identical partitions, tabulate"),
    "configs": ("fedpgp_ray.cli:list_configs", "list the configs shipped in the package (--config NAME)"),
    "pretrain": ("fedpgp_ray.pretrain", "pretrain the tiny CLIP on the procedural world"),
    "bench": ("fedpgp_ray.bench", "time rounds in-process vs Ray actors, Ray task overhead, peak memory"),
    "predict": ("fedpgp_ray.predict", "classify images with a trained client's classifier (MLflow model or run)"),
    "serve": ("fedpgp_ray.serve", "serve a run's personalised model (every client, one endpoint) with Ray Serve"),
    "cache": ("fedpgp_ray.cache_cli", "list the node's image-feature cache entries with sizes, or --clear them"),
}


def usage() -> str:
    lines = ["usage: fedpgp-ray <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n`fedpgp-ray <command> --help` shows a command's options; `fedpgp-ray --version` the version.")
    return "\n".join(lines)


def list_configs(argv: list[str]) -> int:
    """`fedpgp-ray configs`: the packaged config names, each with the first line of its comment."""
    from fedpgp_ray.config import CONFIGS_DIR, packaged_configs

    parser = argparse.ArgumentParser(prog="fedpgp-ray configs",
                                     description="List the configs shipped in the package. Pass a name to "
                                                 "--config (e.g. --config paper/caltech101_b2n_16shot); "
                                                 "a file path given to --config wins over a name.")
    parser.add_argument("--path", action="store_true", help="print each config's file path instead")
    args = parser.parse_args(argv)
    names = packaged_configs()
    width = max(map(len, names), default=0)
    for name in names:
        path = CONFIGS_DIR / f"{name}.yaml"
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        print(f"{name:<{width}}  {path if args.path else first}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from fedpgp_ray import __version__

        print(f"fedpgp-ray {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command '{argv[0]}': choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, _, function = COMMANDS[argv[0]][0].partition(":")
    try:
        code = int(getattr(importlib.import_module(module), function or "main")(argv[1:]) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's exit
        return code
    except BrokenPipeError:  # `fedpgp-ray configs | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
