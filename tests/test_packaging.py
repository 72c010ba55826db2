"""What pip users meet first: the CLI (--version, instant --help, documented options, packaged
configs by name, `configs`), `pretrain` guarding the shipped checkpoint, the wheel's contents, the
layout rules (no Ray/MLflow/FedML in the algorithm core, no import cycles) and the figures."""
from __future__ import annotations

import ast
import hashlib
import importlib
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fedpgp_ray import __version__
from fedpgp_ray.cli import COMMANDS
from fedpgp_ray.config import CONFIGS_DIR, ConfigError, load_config, packaged_configs

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fedpgp_ray"
HEAVY = ("torch", "ray", "mlflow", "open_clip", "matplotlib")


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedpgp_ray.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_version_matches_the_package_metadata():
    from importlib.metadata import version

    out = cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"fedpgp-ray {__version__}"
    assert version("fedpgp-ray") == __version__


def test_help_of_every_command_imports_no_heavy_library():
    code = ("import sys\nfrom fedpgp_ray.cli import COMMANDS, main\n"
            "for argv in [['--help'], *[[c, '--help'] for c in COMMANDS]]:\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_of_every_command_is_documented(command):
    out = cli(command, "--help")
    assert out.returncode == 0 and out.stdout.startswith(f"usage: fedpgp-ray {command}"), out.stdout + out.stderr
    module = importlib.import_module(COMMANDS[command][0].partition(":")[0])
    parser = getattr(module, "build_parser", None)
    if parser is not None:
        undocumented = [a.option_strings for a in parser()._actions if a.option_strings and not a.help]
        assert not undocumented, f"{command}: options without help: {undocumented}"


def test_packaged_configs_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = packaged_configs()
    assert {"quickstart", "world_domains", "paper/caltech101_b2n_16shot"} <= set(names)
    assert len(names) == len(list(CONFIGS_DIR.rglob("*.yaml")))
    for given in ("quickstart", "paper/caltech101_b2n_16shot", "configs/world_domains.yaml", "quickstart.yaml"):
        cfg = load_config(given)
        assert cfg.tracking.config_file == given.removeprefix("configs/").removesuffix(".yaml") + ".yaml"
        assert Path(cfg.output_dir).is_relative_to(tmp_path)  # relative output_dir: under the CWD
    # a file path wins over a packaged name
    (tmp_path / "quickstart.yaml").write_text("seed: 7\n")
    assert load_config("quickstart.yaml").seed == 7 and load_config("quickstart").seed == 0
    with pytest.raises(ConfigError, match="fedpgp-ray configs"):
        load_config("no_such_config")
    listed = cli("configs", cwd=tmp_path)
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == names


def test_a_reader_that_stops_early_gets_no_traceback():
    """`fedpgp-ray configs | head -1`: the pipe closes under the command; it ends quietly."""
    for unbuffered in ("1", ""):  # print flushes each line, or only at exit
        reader = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.PIPE)
        reader.wait(timeout=60)  # the read end is closed: every write fails with EPIPE
        env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
        writer = subprocess.run([sys.executable, "-m", "fedpgp_ray.cli", "configs"], stdout=reader.stdin,
                                stderr=subprocess.PIPE, text=True, timeout=120, env=env)
        reader.stdin.close()
        assert writer.returncode == 0 and writer.stderr == "", writer.stderr


def test_pretrain_refuses_to_overwrite_the_shipped_checkpoint(capsys):
    from fedpgp_ray.pretrain import DEFAULT_OUT, SHIPPED_DIR, main

    shipped = SHIPPED_DIR / "fedpgp-world.pt"
    before = hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert main(["--out", str(shipped), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "--force" in err and len(err.strip().splitlines()) == 1
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == before
    assert not DEFAULT_OUT.is_absolute()  # the default is a file in the working directory


# -- layout ------------------------------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return out


def _module(path: Path) -> str:
    return ".".join(("fedpgp_ray", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def test_algorithm_core_imports_no_ray_mlflow_or_fedml_and_ray_stays_in_its_files():
    core = [*PACKAGE.glob("algorithms/*.py"), *PACKAGE.glob("clip/*.py"), *PACKAGE.glob("data/*.py"),
            *(PACKAGE / n for n in ("client.py", "strategy.py", "server.py", "federation.py", "config.py",
                                    "plots.py", "cli.py"))]
    for path in core:
        bad = sorted(m for m in _imports(path) if m.split(".")[0] in ("ray", "mlflow", "fedml"))
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"
    ray_users = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if any(m.split(".")[0] == "ray" for m in _imports(p))}
    assert {u for u in ray_users if not u.startswith("runtime/ray/")} <= {"runtime/shared_ray.py", "compare.py",
                                                                         "bench.py", "serve.py", "serve_app.py"}, ray_users


def test_no_import_cycles_in_the_package():
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    # edges: every package module a file imports (`from fedpgp_ray.x import y` names x, and x.y if y is a module)
    graph = {m: {t for t in _imports(p) if t in modules and t not in (m, "fedpgp_ray")} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_metadata_declares_no_fedml_extra_and_ships_the_configs():
    text = (REPO / "pyproject.toml").read_text()
    assert not re.search(r'^fedml\s*=', text, re.M)  # FedML's pins cannot resolve beside MLflow 3: no extra
    assert (PACKAGE / "configs").resolve() == (REPO / "configs").resolve()  # one config tree


@pytest.mark.slow
def test_the_wheel_ships_configs_weights_and_the_console_script_and_leaves_the_checkout_clean(tmp_path):
    source = tmp_path / "src"  # a copy of the checkout's files the build reads
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "configs", source / "configs")
    shutil.copytree(PACKAGE, source / "fedpgp_ray", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    before = sorted(p.relative_to(source) for p in source.rglob("*"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(p.relative_to(source) for p in source.rglob("*")) == before  # no build/, no *.egg-info
    (wheel,) = (tmp_path / "dist").glob("fedpgp_ray-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in packaged_configs():
        assert f"fedpgp_ray/configs/{name}.yaml" in names, name
    assert {"fedpgp_ray/clip/weights/fedpgp-world.pt", "fedpgp_ray/clip/weights/shipped.json"} <= names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fedpgp-ray = fedpgp_ray.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    header = meta.split("\n\n", 1)[0]
    assert "License-Expression: MIT" in header and "Description-Content-Type: text/markdown" in header
    assert "Requires-Python: <3.13,>=3.11" in header  # 3.12 too: every dependency has its wheels
    requires = [line for line in header.splitlines() if line.startswith("Requires-Dist:")]
    assert requires and not any("==" in line.split(";")[0] for line in requires), requires  # ranges; the lock is requirements.txt
    assert "# Pinned runtime stack" in (REPO / "requirements.txt").read_text()


def test_the_lock_file_satisfies_the_declared_ranges():
    """requirements.txt (what CI installs) stays inside pyproject.toml's ranges."""
    import tomllib

    from packaging.requirements import Requirement

    declared = {Requirement(d).name.lower().replace("_", "-"): Requirement(d)
                for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" not in line:
            continue
        pinned = Requirement(line)
        version = str(next(iter(pinned.specifier))).lstrip("=")
        name = pinned.name.lower().replace("_", "-")
        assert declared[name].specifier.contains(version), (name, version, declared[name])


# -- figures -----------------------------------------------------------------------------------------------
def test_accuracy_figure_draws_lines_through_evaluated_rounds_and_keeps_the_legend_off_the_data():
    from fedpgp_ray.plots import accuracy_figure

    evaluated = {0: 40.0, 2: 50.0, 3: 55.0, 6: 60.0}
    doc = {"algorithm": "fedpgp", "dataset": "world", "seed": 0,
           "rounds": [{"round": r, "metrics": ({"local": v, "base": v - 5, "novel": v - 10} if (v := evaluated.get(r))
                                               else {"train_loss": 1.0})} for r in range(7)]}
    fig = accuracy_figure(doc)
    ax = fig.axes[0]
    local = next(line for line in ax.get_lines() if line.get_label() == "Local")
    # one line through the evaluated rounds only (a marker each): 0 -> 2 -> 3 -> 6, no gaps, nothing invented
    assert list(local.get_xdata()) == [0, 2, 3, 6] and list(local.get_ydata()) == [40.0, 50.0, 55.0, 60.0]
    assert local.get_linestyle() == "-" and local.get_marker() == "o"
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend, axes = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.x0 >= axes.x1 - 1  # beside the axes, never over the curves
    assert legend.x1 <= fig.bbox.x1 + 1  # and inside the figure
