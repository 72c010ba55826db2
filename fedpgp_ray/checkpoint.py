"""Durable run state: the server's global parameters per round and each client's personal state.

Files hold plain tensors, numbers and strings only (they load with `weights_only=True`) and
are written atomically through the run storage (`fedpgp_ray.storage.RunStorage`: local or shared
path, s3://, gs://), so a crash mid-write never leaves a corrupt one. Client states are versioned
by round, so resuming from server round r never sees a client state trained in an unfinished
round r + 1.
"""
from __future__ import annotations

import json
import logging
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from fedpgp_ray.storage import RunStorage, StorageError

log = logging.getLogger(__name__)

MARKER_FILE = "storage_marker.json"


def atomic_save(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)` atomically (temp file + rename) on a local path."""
    path = Path(path)
    RunStorage(path.parent).save_torch(path.name, obj)


class UnreadableCheckpoint(ValueError):
    """A checkpoint file is truncated, corrupt or not a plain-tensor file."""


class MissingClientState(StorageError):
    """A client that trained before has no saved personal state where the run storage says it should."""


def load_plain(storage: RunStorage, rel: str) -> Any:
    try:
        return storage.load_torch(rel)
    except (FileNotFoundError, StorageError):
        raise
    except Exception as err:  # torch raises several types for truncated or foreign files
        text = str(err).strip().splitlines()
        raise UnreadableCheckpoint(f"checkpoint {storage.display(rel)} cannot be read ({type(err).__name__}: "
                                   f"{text[0] if text else ''})") from None


def _load_newest(storage: RunStorage, folder: str, rounds: list[int]) -> dict[str, Any] | None:
    """The newest readable `round_<r>.pt` among `rounds`: an unreadable newest file (a crash or a
    full disk mid-write on storage without atomic rename) is moved aside to `round_<r>.pt.unreadable`
    (kept for inspection; out of later loads, in this process or an actor, and of pruning) and the
    round before is used, with one warning; fails only when files exist and none can be read."""
    for r in reversed(rounds):
        rel = f"{folder}/round_{r}.pt"
        try:
            return load_plain(storage, rel)
        except UnreadableCheckpoint as err:
            older = [x for x in rounds if x < r]
            if not older:
                raise UnreadableCheckpoint(f"{err}, and no earlier round is kept in {storage.display(folder)}: "
                                           f"start a new run (--overwrite) or restore the file") from None
            storage.write_bytes(rel + ".unreadable", storage.read_bytes(rel))
            storage.delete(rel)
            log.warning("%s; moved aside to %s.unreadable, falling back to round %d", err, rel, older[-1])
    return None


_ROUND = re.compile(r"^round_(\d+)\.pt$")


def trained_clients(history: list[dict[str, Any]], max_round: int) -> set[int]:
    """Ids of the clients that reported a fit in a round <= max_round (from the server's history)."""
    return {int(cid) for report in history if 0 < report["round"] <= max_round
            for cid, metrics in report.get("clients", {}).items()
            if any(key.startswith("train_") for key in metrics)}


class CheckpointStore:
    """Checkpoints under `<location>/server/round_<r>.pt` and `<location>/clients/<cid>/round_<r>.pt`.

    location: a path, a URI or a RunStorage (see fedpgp_ray.storage).
    keep: how many past rounds of files to keep per owner (>= 2 so one fallback remains).
    """

    def __init__(self, location: str | Path | RunStorage, keep: int = 2) -> None:
        self.storage = location if isinstance(location, RunStorage) else RunStorage(location)
        self.keep = max(keep, 2)

    @property
    def directory(self) -> str:
        """The store's location (a path or URI), for messages."""
        return self.storage.uri

    def _rounds(self, folder: str) -> list[int]:
        return sorted(int(m.group(1)) for name in self.storage.list(folder) if (m := _ROUND.match(name)))

    def _prune(self, folder: str) -> None:
        for r in self._rounds(folder)[:-self.keep]:
            self.storage.delete(f"{folder}/round_{r}.pt")

    def save_server(self, rnd: int, state: dict[str, Any]) -> str:
        rel = f"server/round_{rnd}.pt"
        self.storage.save_torch(rel, {"round": rnd, **state})
        self._prune("server")
        return self.storage.display(rel)

    def latest_server(self) -> dict[str, Any] | None:
        return _load_newest(self.storage, "server", self._rounds("server"))

    def save_client(self, client_id: int, rnd: int, state: dict[str, Any]) -> None:
        folder = f"clients/{client_id}"
        self.storage.save_torch(f"{folder}/round_{rnd}.pt", {"round": rnd, **state})
        self._prune(folder)

    def load_client(self, client_id: int, max_round: int) -> dict[str, Any] | None:
        """The client's newest state saved in a round <= max_round, or None."""
        folder = f"clients/{client_id}"
        return _load_newest(self.storage, folder, [r for r in self._rounds(folder) if r <= max_round])

    def client_ids(self) -> list[int]:
        """Clients with a folder of saved states."""
        return sorted(int(name) for name in self.storage.list("clients") if name.isdigit())

    def newest_client_file(self, client_id: int) -> tuple[str, bytes] | None:
        """(file name, bytes) of the client's newest saved state (the final adapters at the end of a run)."""
        rounds = self._rounds(f"clients/{client_id}")
        if not rounds:
            return None
        name = f"round_{rounds[-1]}.pt"
        return name, self.storage.read_bytes(f"clients/{client_id}/{name}")

    def trained_before(self, client_id: int, before_round: int) -> bool:
        """Whether the server's checkpointed history shows `client_id` training in a round < before_round."""
        saved = self.latest_server() if before_round > 1 else None
        if saved is None:
            return False
        first = saved.get("first_trained", {}).get(client_id)  # DP / SecAgg runs: the history names no clients
        return client_id in trained_clients(saved.get("history", []), before_round - 1) or \
            (first is not None and first <= before_round - 1)

    # -- start-up check: can this process read what the driver wrote? --------------------------------
    def write_marker(self) -> str:
        """Write a fresh marker (a random token) into the store; returns the token."""
        token = uuid.uuid4().hex
        self.storage.write_text(MARKER_FILE, json.dumps({"token": token, "host": socket.gethostname(),
                                                         "time": time.time()}))
        return token

    def check_marker(self, token: str, where: str) -> None:
        """Raise StorageError (one line) unless this process reads the driver's marker `token`.

        where: this process, for the message (e.g. "client actor on node 10.0.0.2 (id 1a2b...)").
        """
        fix = ("the nodes do not share the run directory: put output_dir on a filesystem every node mounts "
               "at the same path (NFS and the like) or use a URI (s3://bucket/path, gs://bucket/path)")
        try:
            found = json.loads(self.storage.read_text(MARKER_FILE)).get("token")
        except FileNotFoundError:
            found = None
        except (StorageError, ValueError) as err:
            raise StorageError(f"{where} cannot read the run storage marker {self.storage.display(MARKER_FILE)} "
                               f"({err}): {fix}") from None
        if found != token:
            seen = "does not exist there" if found is None else "holds another run's token"
            raise StorageError(f"{where}: the run storage marker {self.storage.display(MARKER_FILE)} that the "
                               f"driver wrote {seen}: {fix}")
