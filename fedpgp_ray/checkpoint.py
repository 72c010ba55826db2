"""Durable run state: the server's global parameters per round and each client's personal state.

Files hold plain tensors, numbers and strings only (they load with `weights_only=True`) and
are written atomically through the run storage (`fedpgp_ray.storage.RunStorage`: local or shared
path, s3://, gs://), so a crash mid-write never leaves a corrupt one. Client states are versioned
by round, so resuming from server round r never sees a client state trained in an unfinished
round r + 1.

A client state records the run id, the client id and the round; all three are checked on load. A
newest client state that cannot be read (truncated, refused by `weights_only`) or is another
client's, another run's or another round's is moved aside (`round_<r>.pt.unreadable`) and never
replaced by an older file of that client alone, which would mix rounds: the whole run (server and
clients) rolls back to round r - 1 (`ClientStateRollback`, `apply_rollback`) and redoes the rounds
from r, or, when the server no longer keeps round r - 1, stops in one line (`ClientStateDamaged`).
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


class ClientStateDamaged(StorageError):
    """A client's newest state is unreadable or foreign, and the run cannot roll back past it."""


class ClientStateRollback(ClientStateDamaged):
    """A client's newest state is unreadable or foreign; `ROLLBACK_FILE` says which round the whole run
    (server and clients) goes back to (`CheckpointStore.apply_rollback`) to redo the lost rounds."""


ROLLBACK_FILE = "rollback.json"


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

    def __init__(self, location: str | Path | RunStorage, keep: int = 2, run_id: str | None = None) -> None:
        self.storage = location if isinstance(location, RunStorage) else RunStorage(location)
        self.keep = max(keep, 2)
        self.run_id = run_id  # recorded in every client state and checked on load (None: not checked)

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
        self.storage.save_torch(f"{folder}/round_{rnd}.pt",
                                {"round": rnd, "client_id": client_id, "run_id": self.run_id, **state})
        self._prune(folder)

    def load_client(self, client_id: int, max_round: int) -> dict[str, Any] | None:
        """The client's newest state saved in a round <= max_round, or None.

        A newest state that is unreadable or not this client's of that round in this run is moved aside
        and raises ClientStateRollback (the run goes back to the round before it) or ClientStateDamaged.
        """
        rounds = [r for r in self._rounds(f"clients/{client_id}") if r <= max_round]
        if not rounds:
            return None
        rel = f"clients/{client_id}/round_{rounds[-1]}.pt"
        try:
            state = load_plain(self.storage, rel)
            problem = self._foreign(state, client_id, rounds[-1])
        except UnreadableCheckpoint as err:
            state, problem = None, str(err)
        if problem is None:
            return state
        self.storage.write_bytes(rel + ".unreadable", self.storage.read_bytes(rel))
        self.storage.delete(rel)
        self._roll_back(f"{problem}; moved aside to {self.storage.display(rel)}.unreadable", rounds[-1] - 1)

    def _foreign(self, state: Any, client_id: int, rnd: int) -> str | None:
        """Why a loaded client state is not client `client_id`'s state of round `rnd` in this run (None: it is).
        States written before identities were recorded carry no client or run id: only their round is checked."""
        if not isinstance(state, dict) or "personal" not in state:
            return f"client state {self.storage.display(f'clients/{client_id}/round_{rnd}.pt')} is not a client state"
        where = f"client state {self.storage.display(f'clients/{client_id}/round_{rnd}.pt')}"
        if state.get("client_id", client_id) != client_id:
            return f"{where} belongs to client {state['client_id']}"
        if state.get("round") != rnd:
            return f"{where} holds round {state.get('round')}"
        if self.run_id is not None and state.get("run_id", self.run_id) != self.run_id:
            return f"{where} belongs to another run ({state['run_id']}, this run is {self.run_id})"
        return None

    def _roll_back(self, problem: str, to_round: int) -> None:
        """Record that the run must go back to server round `to_round` and raise ClientStateRollback, or
        raise ClientStateDamaged when that round's server checkpoint is no longer kept."""
        kept = self._rounds("server")
        if to_round not in kept:
            have = f"round{'s' if len(kept) > 1 else ''} {', '.join(map(str, kept))}" if kept else "no round"
            raise ClientStateDamaged(
                f"{problem}; the run cannot redo it from server round {to_round} (the store keeps {have}): "
                f"restore the file from a backup, or start a new run (--overwrite)")
        self.storage.write_text(ROLLBACK_FILE, json.dumps({"round": to_round, "reason": problem}))
        raise ClientStateRollback(f"{problem}; the run goes back to round {to_round} and redoes the rounds after it")

    def completed_round(self) -> int:
        """The last round the run has completed (newest server checkpoint, or a pending rollback's
        round), from file names only; -1 when none."""
        rounds = self._rounds("server")
        try:
            pending = int(json.loads(self.storage.read_text(ROLLBACK_FILE))["round"])
            rounds = [r for r in rounds if r <= pending]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            pass
        return rounds[-1] if rounds else -1

    def apply_rollback(self) -> int | None:
        """Carry out a recorded rollback: server checkpoints newer than its round are deleted (client
        states newer than it are ignored by load_client and overwritten when redone). Returns the round
        the run continues after, or None when none was recorded."""
        try:
            to_round = int(json.loads(self.storage.read_text(ROLLBACK_FILE))["round"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as err:
            raise ClientStateDamaged(f"{self.storage.display(ROLLBACK_FILE)} cannot be read ({err}): delete it and "
                                     f"resume again") from None
        for r in self._rounds("server"):
            if r > to_round:
                self.storage.delete(f"server/round_{r}.pt")
        self.storage.delete(ROLLBACK_FILE)
        log.warning("rolled the run back to round %d (a client state was damaged or foreign)", to_round)
        return to_round

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
