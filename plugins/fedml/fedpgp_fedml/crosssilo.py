"""Cross-silo over loopback: one FedML server process and N client processes talking GRPC on 127.0.0.1.

    python -m fedpgp_fedml.crosssilo --cf fedml_config.yaml --rank 0            # server
    python -m fedpgp_fedml.crosssilo --cf fedml_config.yaml --rank 1            # client 1 (silo 0)
    python -m fedpgp_fedml.crosssilo --cf fedml_config.yaml --rank 2            # client 2 (silo 1)

The YAML says `training_type: cross_silo`, `backend: GRPC`, `grpc_ipconfig_path: <csv>`,
`federated_optimizer: FedPGP`; `write_grpc_ipconfig` makes the CSV (eid, rank, ip, port per process).
Each process runs the unchanged FedML cross-silo message flow (FedAvg's) with FedPGPServerAggregator
on rank 0 and FedPGPClientTrainer on the others; only sigma crosses the wire.
"""
from __future__ import annotations

import argparse
import csv
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on `host` right now."""
    socks, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def write_grpc_ipconfig(path: str | os.PathLike, ports: Sequence[int], host: str = "127.0.0.1") -> Path:
    """FedML's GRPC address book: rank r (0 = server) listens on host:ports[r]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["eid", "rank", "grpc_server_ip", "grpc_server_port"])
        for rank, port in enumerate(ports):
            writer.writerow([rank, rank, host, port])
    return path


def run_process(config: Any, rank: int, **overrides: Any) -> Any:
    """Run one cross-silo process (rank 0: server, else client) to completion; returns its FedML runner."""
    import fedml

    import fedpgp_fedml

    if not fedpgp_fedml.registered():
        fedpgp_fedml.register()
    role = "server" if rank == 0 else "client"
    args = fedpgp_fedml.load_arguments(config, rank=rank, role=role, **overrides)
    dataset, model = fedpgp_fedml.load_data(args), fedpgp_fedml.create_model(args)
    if rank > 0 and getattr(args, "backend", None) == "GRPC":
        # A FedML GRPC client announces itself once, at start-up: wait until the server listens.
        host, port = grpc_address(args.grpc_ipconfig_path, 0)
        if not wait_for_port(host, port, float(getattr(args, "fedpgp_server_wait_s", 600))):
            raise RuntimeError(f"client {rank}: the server never listened on {host}:{port}")
    if rank > 0:
        runner = fedml.FedMLRunner(args, fedml.device.get_device(args), dataset, model)
        runner.run()
        return runner
    from fedpgp_fedml.report import sigterm_as_ctrl_c

    # The server holds the MLflow run: SIGTERM ends it KILLED. FedML's cross-silo server trains while
    # FedMLRunner is being built, so the block covers the constructor too.
    with sigterm_as_ctrl_c(getattr(args, "fedpgp_output_dir", None)):
        runner = fedml.FedMLRunner(args, fedml.device.get_device(args), dataset, model)
        runner.run()
    return runner


def grpc_address(ipconfig_path: str | os.PathLike, rank: int) -> tuple[str, int]:
    with open(ipconfig_path) as fh:
        for row in csv.DictReader(fh):
            if int(row["rank"]) == rank:
                return row["grpc_server_ip"], int(row["grpc_server_port"])
    raise KeyError(f"rank {rank} is not in {ipconfig_path}")


def wait_for_port(host: str, port: int, timeout: float, alive: Any = None) -> bool:
    """True once host:port accepts a TCP connection (False after `timeout` s or when alive() turns False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def launch_loopback(config: str | os.PathLike, num_clients: int, log_dir: str | os.PathLike,
                    timeout: float = 600.0, python: str = sys.executable,
                    env: dict[str, str] | None = None, server_stdout: Any = None) -> list[int]:
    """Run server + `num_clients` clients of the YAML `config` as local processes; returns exit codes.

    All processes start at once (imports overlap); each client waits for the server's port before it
    announces itself (FedML's GRPC clients do that only once). Every process is killed at `timeout`.
    Logs go to <log_dir>/rank<r>.log, except the server's stdout (its per-round table and final
    results), which goes to `server_stdout` (default: this process's stdout).
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    procs: list[subprocess.Popen] = []
    logs = []

    def start(rank: int) -> None:
        log = open(log_dir / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([python, "-m", "fedpgp_fedml.crosssilo", "--cf", str(config),
                                       "--rank", str(rank)], stdout=server_stdout if rank == 0 else log,
                                      stderr=log if rank == 0 else subprocess.STDOUT,
                                      env={**os.environ, **(env or {})}))

    try:
        for rank in range(num_clients + 1):
            start(rank)
        codes = []
        for proc in procs:
            codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 1.0)))
        return codes
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One FedML cross-silo process running a fedpgp_fedml algorithm")
    parser.add_argument("--cf", required=True, help="FedML YAML (training_type: cross_silo)")
    parser.add_argument("--rank", type=int, required=True, help="0 = server, 1..N = clients")
    parser.add_argument("--run_id", default="0")
    parser.add_argument("--log-level", default=os.environ.get("FEDPGP_FEDML_LOG", "WARNING"),
                        help="logging level of this process (default WARNING; FEDPGP_FEDML_LOG)")
    opts = parser.parse_args(argv)
    import logging
    logging.basicConfig(level=opts.log_level.upper(), format="%(asctime)s %(process)d %(name)s: %(message)s")
    from fedpgp_fedml.config import FedMLConfigError
    try:
        run_process(opts.cf, opts.rank, run_id=opts.run_id)
    except FedMLConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
