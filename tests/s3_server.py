"""A local S3-compatible server for tests: `moto_server` on 127.0.0.1 (a free port), stopped by PID."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from processes import free_port, stop_group

# moto accepts any credentials; real ones must never reach it (or anywhere else).
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def moto_server(log_dir: Path, prefix: list[str] = ()) -> Iterator[str]:
    """Start `moto_server -H 127.0.0.1 -p PORT`; yields the endpoint "127.0.0.1:PORT"; stops that PID.

    prefix: run it (and the readiness probe) through this command, e.g. `nsenter -t PID -n`.
    """
    port = free_port()
    exe = Path(sys.executable).parent / "moto_server"
    log = (log_dir / f"moto-{port}.log").open("w")
    proc = subprocess.Popen([*prefix, str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    probe = [*prefix, sys.executable, "-c",
             f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/moto-api/', timeout=2)"]
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(probe, capture_output=True).returncode != 0:
            assert proc.poll() is None, (log_dir / f"moto-{port}.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "moto_server did not answer within 60 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        stop_group(proc, 20)
        log.close()


def s3_uri(endpoint: str, bucket: str, path: str) -> str:
    return f"s3://{bucket}/{path}?endpoint_override={endpoint}&scheme=http"


def make_bucket(endpoint: str, bucket: str, prefix: list[str] = ()) -> None:
    code = ("import sys, pyarrow.fs as f; f.S3FileSystem(endpoint_override=sys.argv[1], scheme='http', "
            "allow_bucket_creation=True).create_dir(sys.argv[2])")
    done = subprocess.run([*prefix, sys.executable, "-c", code, endpoint, bucket], env={**os.environ, **S3_ENV},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


class OutageProxy:
    """A TCP forwarder 127.0.0.1:port -> 127.0.0.1:target that can be taken down and brought back on the same
    port: while down, connections are refused (an S3 endpoint that is unreachable) while the server behind
    it keeps its buckets (a stopped moto_server would lose them)."""

    def __init__(self, target: str) -> None:
        self.target = int(target.rsplit(":", 1)[1])
        self.port = free_port()
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def up(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and cut the open ones."""
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
        self.conns = []

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by down()
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
