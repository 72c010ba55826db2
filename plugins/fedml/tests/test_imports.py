"""The plugin's modules import each other in one direction (no circle), and the cross-silo launcher's
--help loads neither torch nor FedML."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fedpgp_fedml"


def _imports(path: Path) -> set[str]:
    """Every fedpgp_fedml module a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedpgp_fedml."):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fedpgp_fedml.")}
    return out


def test_no_import_circle_in_the_plugin():
    modules = {f"fedpgp_fedml.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph = {m: {t for t in _imports(p) if t in modules and t != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import circle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_crosssilo_help_loads_neither_torch_nor_fedml():
    code = ("import runpy, sys\nsys.argv = ['crosssilo', '--help']\n"
            "try:\n    runpy.run_module('fedpgp_fedml.crosssilo', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'fedml', 'open_clip', 'mlflow', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ)
    assert out.returncode == 0, out.stderr
    assert "--cf CF" in out.stdout and out.stdout.strip().splitlines()[-1] == "[]", out.stdout
