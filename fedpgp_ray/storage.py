"""Run storage: the files of a run (config, results, checkpoints) on a local path, a shared path or a URI.

`RunStorage("runs/x")`, `RunStorage("/mnt/nfs/runs/x")`, `RunStorage("s3://bucket/runs/x")`,
`RunStorage("gs://bucket/runs/x")`, `RunStorage("file:///abs/runs/x")`: one small interface over
`pyarrow.fs` (S3, GCS and local filesystems ship in the pyarrow wheel that Ray and MLflow already
install; fsspec would need s3fs/gcsfs on top). S3 options ride in the URI's query, e.g.
`s3://bucket/p?endpoint_override=127.0.0.1:9000&scheme=http`; credentials come from the usual AWS
variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, ~/.aws) of each process.

Writes are atomic: a local file is written under a temporary name and renamed; an object store
makes an object visible only once its upload completes. A RunStorage pickles as its location
only, so a Ray actor rebuilds the filesystem on its own node with its own credentials.
"""
from __future__ import annotations

import io
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

from fedpgp_ray.messages import one_line

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ENV = "FEDPGP_STORAGE_RETRY_S"  # how long transient object-store errors are retried (seconds)
# When each object store's current outage began (monotonic s), by endpoint: the retry bound is per outage,
# shared by every RunStorage on that store in this process (the failure path's own listing included).
_OUTAGES: dict[str, float] = {}
DEFAULT_RETRY_S = 120.0
# pyarrow's S3/GCS errors that mean "try again later": the endpoint unreachable, throttled or failing.
# Anything else (no such bucket, access denied, bad credentials) fails at once.
TRANSIENT = ("NETWORK_CONNECTION", "curlCode", "Couldn't connect", "Connection refused", "timed out", "Timeout",
             "SLOW_DOWN", "SlowDown", "THROTTLING", "SERVICE_UNAVAILABLE", "ServiceUnavailable",
             "INTERNAL_FAILURE", "InternalError", "REQUEST_TIMEOUT", "503", "500 ", "UNAVAILABLE",
             "Connection reset")
FIX = ("check that the run storage exists and is writable (object stores: bucket and credentials, endpoint)")


def retry_seconds() -> float:
    """The retry bound: $FEDPGP_STORAGE_RETRY_S, else 120 s (0: no retries)."""
    try:
        return max(float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S)), 0.0)
    except ValueError:
        raise StorageError(f"{RETRY_ENV}={os.environ[RETRY_ENV]!r} is not a number of seconds: set it to e.g. "
                           f"120, or unset it") from None


def is_transient(err: OSError) -> bool:
    return not isinstance(err, FileNotFoundError) and any(mark in str(err) for mark in TRANSIENT)


class StorageError(RuntimeError):
    """The run storage cannot be used (unreachable, unreadable, or not shared between nodes)."""


def is_uri(location: str | Path) -> bool:
    """True for `scheme://...` locations (s3://, gs://, file://), False for plain paths."""
    return bool(_URI.match(str(location)))


def join_location(location: str, rel: str) -> str:
    """`location` + "/" + `rel`, keeping a URI's query (its filesystem options) at the end."""
    rel = rel.strip("/")
    if not rel:
        return location
    if is_uri(location):
        parts = urlsplit(location)
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + rel))
    return str(Path(location) / rel)


class RunStorage:
    """A directory of a run, wherever it lives. Paths given to the methods are relative ("a/b.pt").

    location: a path (made absolute against the current directory) or a URI.
    """

    def __init__(self, location: str | Path) -> None:
        text = str(location)
        self.location = text if is_uri(text) else str(Path(text).expanduser().absolute())
        self._fs = None
        self._root = ""
        parts = urlsplit(self.location)
        self._endpoint = f"{parts.scheme}://{parts.netloc}?{parts.query}"

    # Pickle the location only: each process (Ray actor) builds its own filesystem client.
    def __getstate__(self) -> dict[str, Any]:
        return {"location": self.location}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["location"])

    def __repr__(self) -> str:
        return f"RunStorage({self.location!r})"

    @property
    def uri(self) -> str:
        """The location as the user wrote it (absolute path or URI), for messages."""
        return self.location

    @property
    def is_local(self) -> bool:
        return self.local_path() is not None

    def local_path(self, rel: str = "") -> Path | None:
        """The local filesystem path of `rel`, or None when the storage is an object store."""
        if is_uri(self.location):
            parts = urlsplit(self.location)
            if parts.scheme != "file":
                return None
            return Path(parts.path) / rel if rel else Path(parts.path)
        return Path(self.location) / rel if rel else Path(self.location)

    def child(self, rel: str) -> "RunStorage":
        """The storage of the sub-directory `rel`."""
        return RunStorage(join_location(self.location, rel))

    def _filesystem(self):
        if self._fs is None:
            import pyarrow.fs as pafs

            try:
                self._fs, root = pafs.FileSystem.from_uri(self.location)
            except (OSError, ValueError) as err:  # unknown scheme, malformed URI or query
                raise StorageError(f"run storage {self.location!r} cannot be opened ({one_line(err)}): use "
                                   f"a path, or an s3://, gs:// or file:// URI") from None
            self._root = root.rstrip("/")
        return self._fs

    def _path(self, rel: str) -> str:
        self._filesystem()
        rel = rel.strip("/")
        return f"{self._root}/{rel}" if rel else self._root

    def display(self, rel: str = "") -> str:
        """Where `rel` lives, for messages (a path, or the URI without its query)."""
        if is_uri(self.location):
            parts = urlsplit(join_location(self.location, rel))
            return urlunsplit(parts._replace(query=""))
        return str(Path(self.location) / rel) if rel else self.location

    def _retrying(self, what: str, action: Callable[[], T]) -> T:
        """`action()`, retried with backoff (1, 2, 4 ... 15 s) while an object store answers with a transient
        error, for at most retry_seconds() per outage of that store (a call made after the bound has passed,
        such as the failure path's own listing, fails at once); then one StorageError line saying what to do."""
        bound = retry_seconds() if not self.is_local else 0.0
        delay = 1.0
        while True:
            try:
                result = action()
                _OUTAGES.pop(self._endpoint, None)
                return result
            except OSError as err:
                if bound <= 0 or not is_transient(err):
                    raise
                waited = time.monotonic() - _OUTAGES.setdefault(self._endpoint, time.monotonic())
                if waited >= bound:
                    raise StorageError(
                        f"cannot {what} ({one_line(err)}): the run storage was unreachable for {waited:.0f} s "
                        f"({RETRY_ENV}={bound:g}): once it answers again, continue with `fedpgp-ray run "
                        f"--resume <output_dir>` with the output_dir you ran with (completed rounds are "
                        f"checkpointed)") from None
                if delay == 1.0:
                    log.warning("run storage: cannot %s (%s); retrying for up to %.0f s", what, one_line(err), bound)
                time.sleep(min(delay, max(bound - waited, 0.1)))
                delay = min(delay * 2, 15.0)

    # -- files --------------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write `data` to `rel` atomically (readers see the old file or the new one, never a part)."""
        fs, path = self._filesystem(), self._path(rel)
        parent = path.rsplit("/", 1)[0]
        local = self.is_local
        try:
            if local:
                fs.create_dir(parent, recursive=True)
                tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
                try:
                    with fs.open_output_stream(tmp) as out:
                        out.write(data)
                    fs.move(tmp, path)  # rename(2): atomic on one filesystem
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            else:
                def upload() -> None:
                    with fs.open_output_stream(path) as out:  # the object appears when the upload completes
                        out.write(data)
                self._retrying(f"write {self.display(rel)}", upload)
        except OSError as err:
            raise StorageError(f"cannot write {self.display(rel)} ({one_line(err)}): {FIX}") from None

    def read_bytes(self, rel: str) -> bytes:
        """The content of `rel`; FileNotFoundError when it does not exist."""
        fs, path = self._filesystem(), self._path(rel)
        if not self.exists(rel):
            raise FileNotFoundError(f"{self.display(rel)} does not exist")
        def download() -> bytes:
            with fs.open_input_stream(path) as src:
                return src.read()
        try:
            return self._retrying(f"read {self.display(rel)}", download)
        except FileNotFoundError:
            raise
        except OSError as err:
            raise StorageError(f"cannot read {self.display(rel)} ({one_line(err)}): {FIX}") from None

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        fs, path = self._filesystem(), self._path(rel)
        try:
            return self._retrying(f"reach {self.display(rel)}",
                                  lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)
        except OSError as err:
            raise StorageError(f"cannot reach {self.display(rel)} ({one_line(err)}): {FIX}") from None

    def list(self, prefix: str = "") -> list[str]:
        """Names (not paths) of the files and folders directly under `prefix`, sorted; [] if none."""
        import pyarrow.fs as pafs

        fs, base = self._filesystem(), self._path(prefix)
        try:
            infos = self._retrying(f"list {self.display(prefix)}",
                                   lambda: fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)))
        except OSError as err:
            raise StorageError(f"cannot list {self.display(prefix)} ({one_line(err)}): {FIX}") from None
        return sorted(info.base_name for info in infos if not info.base_name.endswith(".tmp"))

    def delete(self, rel: str) -> None:
        """Delete the file `rel`; nothing happens if it is already gone."""
        fs, path = self._filesystem(), self._path(rel)
        try:
            self._retrying(f"delete {self.display(rel)}", lambda: fs.delete_file(path))
        except FileNotFoundError:
            pass
        except OSError as err:
            if self.exists(rel):
                raise StorageError(f"cannot delete {self.display(rel)} ({one_line(err)}): {FIX}") from None

    def makedirs(self) -> None:
        """Create the directory itself (local paths; object stores have no directories to create)."""
        if self.is_local:
            try:
                self._filesystem().create_dir(self._path(""), recursive=True)
            except OSError as err:
                raise StorageError(f"cannot create {self.display()} ({one_line(err)}): check that the parent "
                                   f"directory exists and is writable, or choose another output_dir") from None

    # -- torch ---------------------------------------------------------------------------------------
    def save_torch(self, rel: str, obj: Any) -> None:
        """`torch.save(obj)` into `rel`, atomically."""
        import torch

        buffer = io.BytesIO()
        torch.save(obj, buffer)
        self.write_bytes(rel, buffer.getvalue())

    def load_torch(self, rel: str) -> Any:
        """`torch.load(..., weights_only=True)` of `rel` (plain tensors, numbers, strings only)."""
        import torch

        return torch.load(io.BytesIO(self.read_bytes(rel)), weights_only=True, map_location="cpu")


__all__ = ["RunStorage", "StorageError", "is_uri", "join_location"]
