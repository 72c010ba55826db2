"""`fedpgp-ray <command> [args]`: one console script, one module per command."""
from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("fedpgp_ray.run", "run an experiment (default: the offline quickstart)"),
    "compare": ("fedpgp_ray.compare", "run several algorithms over seeds on identical partitions, tabulate"),
    "pretrain": ("fedpgp_ray.pretrain", "pretrain the tiny CLIP on the procedural world"),
    "bench": ("fedpgp_ray.bench", "time rounds in-process vs Ray actors, Ray task overhead, peak memory"),
}


def usage() -> str:
    lines = ["usage: fedpgp-ray <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n`fedpgp-ray <command> --help` shows a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command '{argv[0]}': choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
