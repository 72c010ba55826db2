"""Durable run state: the server's global parameters per round and each client's personal state.

Files hold plain tensors, numbers and strings only (they load with `weights_only=True`) and
are written atomically (temp file + rename), so a crash mid-write never leaves a corrupt one.
Client states are versioned by round, so resuming from server round r never sees a client
state trained in an unfinished round r + 1.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_plain(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
                         f"delete it to fall back to the previous round") from None


_ROUND = re.compile(r"round_(\d+)\.pt$")


class CheckpointStore:
    """Checkpoints under `<directory>/server/round_<r>.pt` and `<directory>/clients/<cid>/round_<r>.pt`.

    keep: how many past rounds of files to keep per owner (>= 2 so one fallback remains).
    """

    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = max(keep, 2)

    def _rounds(self, folder: Path) -> list[int]:
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _ROUND.search(p.name)))

    def _prune(self, folder: Path) -> None:
        for r in self._rounds(folder)[:-self.keep]:
            (folder / f"round_{r}.pt").unlink(missing_ok=True)

    def save_server(self, rnd: int, state: dict[str, Any]) -> Path:
        path = self.directory / "server" / f"round_{rnd}.pt"
        atomic_save({"round": rnd, **state}, path)
        self._prune(path.parent)
        return path

    def latest_server(self) -> dict[str, Any] | None:
        rounds = self._rounds(self.directory / "server")
        return load_plain(self.directory / "server" / f"round_{rounds[-1]}.pt") if rounds else None

    def save_client(self, client_id: int, rnd: int, state: dict[str, Any]) -> None:
        folder = self.directory / "clients" / str(client_id)
        atomic_save({"round": rnd, **state}, folder / f"round_{rnd}.pt")
        self._prune(folder)

    def load_client(self, client_id: int, max_round: int) -> dict[str, Any] | None:
        """The client's newest state saved in a round <= max_round, or None."""
        folder = self.directory / "clients" / str(client_id)
        rounds = [r for r in self._rounds(folder) if r <= max_round]
        return load_plain(folder / f"round_{rounds[-1]}.pt") if rounds else None
