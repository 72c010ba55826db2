"""How tracking talks to its store without ever stalling a run (used by `fedpgp_ray.tracking`).

* `probe_settings`: MLflow's HTTP retry settings lowered for a bounded call (start-up, exit):
  MLflow retries a failing server for minutes by default (7 retries, exponential backoff, 120 s
  timeout per request); a user-facing check should answer in seconds.
* `check_sqlite_store`: a SQLite store that cannot be written (read-only filesystem, a file that
  is not a database) is found with the stdlib `sqlite3` in milliseconds; MLflow itself retries
  creating its engine 10 times with backoff (about 100 s) before it reports one.
* `BackgroundWriter`: one daemon thread writes tracking calls in order; a failing call stays at
  the head of the queue and is retried every few seconds, so a store that goes away mid-run costs
  the rounds nothing and its points are written once it is back. Being a daemon, it never holds
  the process at exit (Ctrl-C ends the run at once). MLflow's own asynchronous logging
  (`synchronous=False`) does not serve here: its queue hands a failed batch its exception and
  moves on, so the points of a store that comes back later would be lost.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

from fedpgp_ray.messages import one_line

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5      # per HTTP request during a probe
RETRY_EVERY_S = 2.0      # the background writer's pause between attempts of a failing call
# MLflow's retry settings while the background writer runs: it retries itself, every RETRY_EVERY_S.
WRITER_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
PROBE_SETTINGS = {**WRITER_SETTINGS, "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_S)}


# MLflow error codes of a request the store understood and refused (the rest: outages, retried).
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE",
                    "RESOURCE_ALREADY_EXISTS", "PERMISSION_DENIED", "UNAUTHENTICATED"}


class StoreUnusable(RuntimeError):
    """The tracking store cannot be written (one line: what and why)."""


def lower_retries(settings: dict[str, str]) -> dict[str, str | None]:
    """Set MLflow's HTTP settings (those the user has not set); returns what to restore."""
    previous = {}
    for key, value in settings.items():
        if key not in os.environ:
            previous[key] = None
            os.environ[key] = value
    return previous


def restore(previous: dict[str, str | None]) -> None:
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextlib.contextmanager
def probe_settings() -> Iterator[None]:
    """MLflow's HTTP retries off and a short timeout within the block (settings the user set win)."""
    previous = lower_retries(PROBE_SETTINGS)
    try:
        yield
    finally:
        restore(previous)


def check_sqlite_store(uri: str) -> None:
    """Raise StoreUnusable unless the SQLite database of `uri` can be created or written."""
    if not uri.startswith("sqlite:///"):
        return
    path = uri[len("sqlite:///"):].partition("?")[0]
    if not path or path == ":memory:":
        return
    db = Path(path)
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        if not db.exists():  # creating it proves the directory is writable; MLflow fills it in
            sqlite3.connect(db, timeout=PROBE_TIMEOUT_S).close()
            return
        with contextlib.closing(sqlite3.connect(db, timeout=PROBE_TIMEOUT_S)) as conn:
            conn.execute("BEGIN IMMEDIATE")  # takes the write lock: fails on a read-only file or filesystem
            conn.execute("ROLLBACK")
    except (OSError, sqlite3.Error) as err:
        raise StoreUnusable(f"SQLite store {db} cannot be written ({one_line(err)})") from None


class BackgroundWriter:
    """Runs tracking calls in order on one daemon thread; a failing call is retried until it succeeds.

    points: metric points a call carries (reported when some could not be written).
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self._jobs: deque[tuple[Callable[[], None], int]] = deque()
        self._cond = threading.Condition()
        self.failing_since: float | None = None   # time of the first failure of the current outage
        self.last_error = ""
        self.failures = 0
        self._stopped = False
        self._settings = lower_retries(WRITER_SETTINGS)
        self._thread = threading.Thread(target=self._loop, name="fedpgp-mlflow-writer", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], None], points: int = 0) -> None:
        with self._cond:
            self._jobs.append((call, points))
            self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` s for every submitted call to be written; True when all are."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._jobs:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def pending_points(self) -> int:
        with self._cond:
            return sum(points for _, points in self._jobs)

    def pending_calls(self) -> int:
        with self._cond:
            return len(self._jobs)

    def restore_settings(self) -> None:
        """Give MLflow its own retry settings back (for the long uploads at the end of a run)."""
        restore(self._settings)
        self._settings = {}

    def stop(self) -> None:
        """End the thread (after the run's last write, or once the rest is left to a --resume):
        a long-lived process (a comparison, a notebook) keeps no writer per finished run."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                call, _ = self._jobs[0]
            try:
                call()
            except Exception as err:  # noqa: BLE001 - the store is down or refusing: retry later
                if getattr(err, "error_code", None) in PERMANENT_ERRORS:  # retrying cannot help: drop it
                    log.warning("MLflow: %s refused a write (%s); skipped", self.where, one_line(err))
                    with self._cond:
                        self._jobs.popleft()
                        self._cond.notify_all()
                    continue
                self.failures += 1
                self.last_error = one_line(err)
                if self.failing_since is None:
                    self.failing_since = time.time()
                    log.warning("MLflow: writing to %s failed (%s); retrying in the background every %.0f s",
                                self.where, self.last_error, RETRY_EVERY_S)
                time.sleep(RETRY_EVERY_S)
                continue
            if self.failing_since is not None:
                log.warning("MLflow: %s is back after %.0f s; writing the queued points",
                            self.where, time.time() - self.failing_since)
                self.failing_since = None
            with self._cond:
                self._jobs.popleft()
                self._cond.notify_all()
