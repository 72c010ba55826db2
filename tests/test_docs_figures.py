"""Every command the docs name exists: each `python benchmarks/X.py --flag ...` and each
`fedpgp-ray <command> --flag ...` written in a doc's code (fenced blocks, indented blocks, inline
`code`) is a script or command that answers `--help`, with every flag it is given listed there, and
every `--set key=value` names a declared config key. The docs state their measured figures with
the command that produced them, so a renamed benchmark, flag or key fails here instead of leaving
a figure that no command reproduces."""
from __future__ import annotations

import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from fedpgp_ray.cli import COMMANDS
from fedpgp_ray.config import config_to_dict, flatten, load_config, packaged_configs

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "plugins" / "fedml" / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")
BENCHMARK = re.compile(r"(?:^|[\s/;(&|=])python3?(?:\.\d+)? (?:-u )?benchmarks/(\w+)\.py\b(.*)")
FEDPGP = re.compile(r"(?:^|[\s/;(&|=])(?:fedpgp-ray|python3? -m fedpgp_ray\.cli) ([a-z][a-z_-]*)\b(?!-)(.*)")
RUN_MODULE = re.compile(r"(?:^|[\s/;(&|=])python3? -m fedpgp_ray\.run\b(.*)")


def code_snippets(text: str) -> list[str]:
    """The text of every fenced block, indented block and inline code span of a Markdown file."""
    snippets = [m.group(1) for m in FENCE.finditer(text)]
    prose = FENCE.sub("", text)
    snippets += ["\n".join(line[4:] for line in block.group(0).splitlines())
                 for block in re.finditer(r"(?:^    [^\n]*\n?)+", prose, re.M)]
    snippets += [m.group(1).replace("\n", " ") for m in INLINE.finditer(prose)]
    return snippets


def command_lines(snippet: str) -> list[str]:
    """Shell lines of a snippet: continuations joined, comments dropped."""
    lines = []
    for line in snippet.replace("\\\n", " ").splitlines():
        lines.append(re.split(r"\s#", line, maxsplit=1)[0])
    return lines


def arguments(rest: str) -> list[str]:
    """The arguments of one command: its tokens up to the next shell operator."""
    rest = re.split(r"[;|&)]|\s>", rest, maxsplit=1)[0]
    return rest.split()


def doc_commands() -> list[tuple[str, str, str, list[str]]]:
    """(doc, kind, name, args): kind "benchmark" (name = script stem) or "command" (fedpgp-ray <name>)."""
    found = []
    for doc in DOCS:
        rel = str(doc.relative_to(REPO))
        for snippet in code_snippets(doc.read_text()):
            for line in command_lines(snippet):
                for m in BENCHMARK.finditer(line):
                    found.append((rel, "benchmark", m.group(1), arguments(m.group(2))))
                for m in FEDPGP.finditer(line):
                    found.append((rel, "command", m.group(1), arguments(m.group(2))))
                for m in RUN_MODULE.finditer(line):
                    found.append((rel, "command", "run", arguments(m.group(1))))
    return found


def flags(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if re.fullmatch(r"--[a-z][a-z0-9-]*(=.*)?", a)}


def set_keys(args: list[str]) -> set[str]:
    keys = set()
    for flag, value in zip(args, args[1:]):
        if flag == "--set" and "=" in value:
            keys.add(value.split("=", 1)[0].strip("'\""))
    for a in args:
        if a.startswith("--set="):
            keys.add(a[len("--set="):].split("=", 1)[0])
    return keys


@lru_cache(maxsize=None)
def help_text(kind: str, name: str) -> str:
    """`--help` of a benchmark script or a fedpgp-ray command, run as users run it."""
    if kind == "benchmark":
        argv = [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--help"]
    else:
        argv = [sys.executable, "-m", "fedpgp_ray.cli", name, "--help"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, f"{' '.join(argv[1:])} failed (exit {done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def missing_flags(kind: str, name: str, used: set[str]) -> list[str]:
    listed = set(re.findall(r"--[a-z][a-z0-9-]*", help_text(kind, name)))
    return sorted(used - listed)


def declared_keys() -> set[str]:
    keys = set(flatten(config_to_dict(load_config())))
    return keys | {".".join(k.split(".")[:i]) for k in keys for i in range(1, k.count(".") + 1)}


def test_the_docs_name_the_benchmarks_that_produce_their_figures():
    """The scan finds the figure commands the docs are known to state (guards against a scan that finds nothing)."""
    seen = {(kind, name) for _, kind, name, _ in doc_commands()}
    for expected in [("benchmark", b) for b in ("perf", "privacy_table", "secagg", "scale", "serving",
                                                  "feature_cache", "cluster_storage", "shipped_configs",
                                                  "partition_sizes", "hostile_input")] + \
                    [("command", c) for c in ("run", "compare", "bench", "pretrain", "serve", "predict", "cache")]:
        assert expected in seen, f"no doc names {expected}: the scan or the docs changed"


def test_every_benchmark_a_doc_names_exists_and_takes_its_flags():
    uses: dict[str, set[str]] = {}
    where: dict[str, set[str]] = {}
    for doc, kind, name, args in doc_commands():
        if kind == "benchmark":
            uses.setdefault(name, set()).update(flags(args))
            where.setdefault(name, set()).add(doc)
    problems = []
    for name, used in sorted(uses.items()):
        if not (REPO / "benchmarks" / f"{name}.py").is_file():
            problems.append(f"{sorted(where[name])}: benchmarks/{name}.py does not exist")
            continue
        if bad := missing_flags("benchmark", name, used):
            problems.append(f"{sorted(where[name])}: benchmarks/{name}.py has no {bad}")
    assert not problems, "\n".join(problems)


def test_every_fedpgp_ray_command_a_doc_names_exists_and_takes_its_flags():
    uses: dict[str, set[str]] = {}
    problems = []
    for doc, kind, name, args in doc_commands():
        if kind != "command":
            continue
        if name not in COMMANDS:
            problems.append(f"{doc}: `fedpgp-ray {name}` is not a command (commands: {', '.join(COMMANDS)})")
            continue
        uses.setdefault(name, set()).update(flags(args))
    for name, used in sorted(uses.items()):
        if bad := missing_flags("command", name, used):
            problems.append(f"`fedpgp-ray {name}` has no {bad}")
    assert not problems, "\n".join(problems)


def test_every_config_key_and_packaged_config_a_doc_command_sets_exists():
    keys = declared_keys()
    names = set(packaged_configs())
    problems = []
    for doc, _, name, args in doc_commands():
        for key in set_keys(args) - keys:
            problems.append(f"{doc}: `{name} ... --set {key}=...`: no such config key")
        for flag, value in zip(args, args[1:]):
            if flag == "--config" and re.fullmatch(r"[a-z0-9_/]+", value) and value not in names:
                problems.append(f"{doc}: `{name} --config {value}`: no packaged config of that name")
            if flag == "--config" and value.startswith("configs/") and not (REPO / value).is_file():
                problems.append(f"{doc}: `{name} --config {value}`: no such file in the checkout")
    assert not problems, "\n".join(problems)


def test_the_check_fails_for_a_renamed_benchmark_flag_or_command():
    """The checks above are real: a flag no benchmark has, a command that does not exist, an unknown key."""
    assert missing_flags("benchmark", "perf", {"--vitb16", "--no-such-flag"}) == ["--no-such-flag"]
    with pytest.raises(AssertionError, match="failed"):
        help_text("command", "no-such-command")
    assert "train.no_such_key" not in declared_keys() and "train.rounds" in declared_keys()
    found = [(kind, name, args) for snippet in code_snippets("text `python benchmarks/perf.py --sweep --steps 5` "
                                                               "and\n\n    fedpgp-ray bench --rounds 4 \\\n"
                                                               "        --sections overhead   # a comment --x\n")
             for line in command_lines(snippet) for kind, name, args in
             [("benchmark", m.group(1), arguments(m.group(2))) for m in BENCHMARK.finditer(line)] +
             [("command", m.group(1), arguments(m.group(2))) for m in FEDPGP.finditer(line)]]
    assert found == [("command", "bench", ["--rounds", "4", "--sections", "overhead"]),
                     ("benchmark", "perf", ["--sweep", "--steps", "5"])], found
