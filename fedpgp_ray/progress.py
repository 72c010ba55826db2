"""Progress of the long data phases (image verification, feature encoding), with items per second.

A tqdm bar when stderr is a terminal; plain lines (about every 10 s, and at the end) when it is
not (Ray actors, job logs) or when $FEDPGP_PROGRESS is "lines" (`fedpgp-ray run --no-progress` sets
it; Ray actors started by that driver inherit it); nothing when it is "off".
"""
from __future__ import annotations

import os
import sys
import time

PROGRESS_ENV = "FEDPGP_PROGRESS"
LINE_EVERY_S = 10.0
QUIET_BELOW_S = 2.0


def progress_mode() -> str:
    """"bar" (default: tqdm on a terminal, else lines), "lines" or "off"."""
    mode = os.environ.get(PROGRESS_ENV, "bar").strip().lower()
    return "off" if mode in ("off", "0", "false", "no") else "lines" if mode == "lines" else "bar"


def set_progress(mode: str) -> None:
    """Set the data phases' progress ("bar", "lines" or "off") for this process and those it starts."""
    os.environ[PROGRESS_ENV] = mode


class Progress:
    """Counts `total` items of one phase; `update(n)` after each batch, `close()` at the end."""

    def __init__(self, total: int, desc: str, unit: str = "img") -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self.printed = 0  # `done` at the last plain line
        self.start = self.last_line = time.perf_counter()
        mode = progress_mode()
        self.enabled = mode != "off" and total > 0
        self.bar = None
        if self.enabled and mode == "bar" and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr,
                            dynamic_ncols=True, leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.perf_counter() - self.last_line >= LINE_EVERY_S:
            self.last_line = time.perf_counter()
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.printed != self.done and (
                self.printed or time.perf_counter() - self.start >= QUIET_BELOW_S):
            self._line()  # the closing line (phases shorter than QUIET_BELOW_S print none)
        self.enabled = False

    def _line(self) -> None:
        self.printed = self.done
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        print(f"{self.desc}: {self.done}/{self.total} {self.unit} in {elapsed:.1f} s "
              f"({self.done / elapsed:.1f} {self.unit}/s)", file=sys.stderr, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
