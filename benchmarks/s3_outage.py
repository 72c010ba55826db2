"""An S3 outage during a run (not a test: it prints what the user sees and how long it took).

    python benchmarks/s3_outage.py 20      # from the repository root; SECONDS of outage

The quickstart (3 rounds, 1 epoch, runtime.kind=local) writes into s3:// (moto_server on 127.0.0.1) through a
TCP forwarder (tests/s3_server.py OutageProxy) that is taken down for SECONDS once round 1's line is printed
(moto keeps its buckets). Prints the exit code, the storage lines the user saw, seconds, and the final metrics
against an unfaulted run; if the run failed, `--resume` once the endpoint is back.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_server import S3_ENV, OutageProxy, make_bucket, moto_server, s3_uri  # noqa: E402

READ_FINAL = ("import json, sys; from fedpgp_ray.storage import RunStorage; "
              "print(json.loads(RunStorage(sys.argv[1]).read_text('results.json'))['final'])")


def run(uri: str, env: dict[str, str], resume: bool = False, outage: tuple[OutageProxy, float] | None = None,
        timers: list[threading.Timer] = ()) -> tuple[int, float, list[str]]:
    """Run (or resume) the quickstart into `uri`; with `outage`, take the proxy down after round 1's line."""
    if resume:
        cmd = [sys.executable, "-m", "fedpgp_ray.run", "--resume", uri, "--no-progress"]
    else:
        cmd = [sys.executable, "-m", "fedpgp_ray.run", "--config", "configs/quickstart.yaml",
               "--set", f"output_dir={uri}", "--set", "runtime.kind=local", "--set", "train.rounds=3",
               "--set", "train.local_epochs=1", "--set", "tracking.mlflow=false", "--no-progress"]
    began = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if outage and not timers and line.startswith("fedpgp round 1/"):
            proxy, seconds = outage
            proxy.down()
            timers.append(threading.Timer(seconds, proxy.up))
            timers[-1].start()
    proc.wait()
    return proc.returncode, time.monotonic() - began, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seconds", type=float, help="how long the S3 endpoint is down")
    args = parser.parse_args()
    env = {**os.environ, **S3_ENV, "PYTHONPATH": os.getcwd()}
    with moto_server(Path(tempfile.mkdtemp())) as endpoint:
        make_bucket(endpoint, "runs")
        proxy = OutageProxy(endpoint)
        proxy.up()
        timers: list[threading.Timer] = []
        ref = run(s3_uri(endpoint, "runs", "ref"), env)
        got = run(s3_uri(proxy.endpoint, "runs", "faulted"), env, outage=(proxy, args.seconds), timers=timers)
        print("ref exit", ref[0], f"{ref[1]:.0f} s")
        print("faulted exit", got[0], f"{got[1]:.0f} s")
        for line in got[2]:
            if "storage" in line or line.startswith(("error", "fedpgp round", "fedpgp ")) or "Traceback" in line:
                print("  |", line)
        if got[0] != 0:
            for timer in timers:
                timer.join()
            resumed = run(s3_uri(proxy.endpoint, "runs", "faulted"), env, resume=True)
            print("resume exit", resumed[0], f"{resumed[1]:.0f} s")
            for line in resumed[2]:
                if line.startswith(("error", "fedpgp round", "resume")):
                    print("  |", line)
        for name, at in (("ref", endpoint), ("faulted", proxy.endpoint)):
            out = subprocess.run([sys.executable, "-c", READ_FINAL, s3_uri(at, "runs", name)], env=env,
                                 capture_output=True, text=True)
            print(name, "final", out.stdout.strip() or out.stderr[-300:])
        proxy.down()


if __name__ == "__main__":
    main()
