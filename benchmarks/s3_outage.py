"""An S3 outage during a run: `python benchmarks/s3_outage.py SECONDS` (from the repository root).

The quickstart (3 rounds, 1 epoch, runtime.kind=local) writes into s3:// (moto_server on 127.0.0.1) through a TCP
forwarder (tests/s3_server.py OutageProxy) that is taken down for SECONDS once round 1's line is printed (moto keeps
its buckets). Prints the exit code, the storage lines the user saw, seconds, and the final metrics against an
unfaulted run; if the run failed, `--resume` once the endpoint is back.
"""
import json, os, subprocess, sys, tempfile, threading, time
from pathlib import Path
sys.path.insert(0, "tests")
from s3_server import S3_ENV, OutageProxy, make_bucket, moto_server, s3_uri
outage = float(sys.argv[1])
env = {**os.environ, **S3_ENV, "PYTHONPATH": os.getcwd()}
d = Path(tempfile.mkdtemp())
timers = []
def run(uri, proxy=None, resume=False):
    cmd = [sys.executable, "-m", "fedpgp_ray.run", "--config", "configs/quickstart.yaml", "--set", f"output_dir={uri}",
           "--set", "runtime.kind=local", "--set", "train.rounds=3", "--set", "train.local_epochs=1",
           "--set", "tracking.mlflow=false", "--no-progress"]
    if resume:
        cmd = [sys.executable, "-m", "fedpgp_ray.run", "--resume", uri, "--no-progress"]
    t = time.monotonic()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, down_at = [], None
    for line in p.stdout:
        lines.append(line.rstrip())
        if proxy and down_at is None and line.startswith("fedpgp round 1/"):
            proxy.down(); down_at = time.monotonic()
            timers.append(threading.Timer(outage, proxy.up)); timers[-1].start()
    p.wait()
    return p.returncode, time.monotonic() - t, lines
with moto_server(d) as ep:
    make_bucket(ep, "runs")
    proxy = OutageProxy(ep); proxy.up()
    ref = run(s3_uri(ep, "runs", "ref"))
    got = run(s3_uri(proxy.endpoint, "runs", "faulted"), proxy)
    print("ref exit", ref[0], f"{ref[1]:.0f} s")
    print("faulted exit", got[0], f"{got[1]:.0f} s")
    for l in got[2]:
        if "storage" in l or l.startswith(("error", "fedpgp round", "fedpgp ")) or "Traceback" in l:
            print("  |", l)
    if got[0] != 0:
        timers[0].join()
        res = run(s3_uri(proxy.endpoint, "runs", "faulted"), resume=True)
        print("resume exit", res[0], f"{res[1]:.0f} s")
        for l in res[2]:
            if l.startswith(("error", "fedpgp round", "resume")): print("  |", l)
    code = "import json,sys; from fedpgp_ray.storage import RunStorage; print(json.loads(RunStorage(sys.argv[1]).read_text('results.json'))['final'])"
    for name, e in (("ref", ep), ("faulted", proxy.endpoint)):
        out = subprocess.run([sys.executable, "-c", code, s3_uri(e, "runs", name)], env=env, capture_output=True, text=True)
        print(name, "final", out.stdout.strip() or out.stderr[-300:])
