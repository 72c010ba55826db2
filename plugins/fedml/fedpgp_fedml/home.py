"""FedML's home folder: where FedML's writes to `~` go (never the user's ~/.fedml). Imports nothing
of this package, so config, registry and the runners can all use it."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

HOME_ENV = "FEDPGP_FEDML_HOME"
_home: Path | None = None


def fedml_home(args: Any = None) -> Path:
    """Where FedML's home-directory writes go: args.fedpgp_fedml_home, else register(home=...), else
    $FEDPGP_FEDML_HOME, else ~/.cache/fedpgp-ray/fedml-home (never ~/.fedml)."""
    explicit = (args.get("fedpgp_fedml_home") if isinstance(args, Mapping)
                else getattr(args, "fedpgp_fedml_home", None)) if args is not None else None
    if explicit:
        return Path(str(explicit)).expanduser().resolve()
    if _home is not None:
        return _home
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "fedpgp-ray" / "fedml-home"


def set_fedml_home(path: str | os.PathLike | None) -> None:
    global _home
    _home = Path(path).expanduser().resolve() if path else None


@contextlib.contextmanager
def home_redirect(path: Path) -> Iterator[Path]:
    """HOME (what FedML's expanduser('~') reads) points at `path` for the duration of the block."""
    path.mkdir(parents=True, exist_ok=True)
    before = os.environ.get("HOME")
    os.environ["HOME"] = str(path)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = before
