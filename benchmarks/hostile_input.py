"""Memory on hostile input: decompression-bomb PNGs, a 10,000-class request and a 50 MB body sent to
`fedpgp-ray predict` and to `mlflow models serve` of a client model. Figures only, no assertions
(tests/test_serving_limits.py checks the behaviour).

    python benchmarks/hostile_input.py --run-dir DIR [--model models:/NAME/VERSION]

DIR: a finished run with tracking on (mlflow_run.json names its store). --model: the served model
(default: the first registered model of that run). Reports
  predict   peak RSS (`/usr/bin/time -v`) of `fedpgp-ray predict --run DIR` on 3 bomb PNGs, and its exit;
  server    the server's RSS (all processes of its group, sampled every 50 ms) idle, and its peak
            while 3 bomb PNGs arrive at once, then a 10,000-class request, then a 50 MB body; the
            HTTP status of each, and whether the server still answers /ping afterwards.
The bomb PNG: a 13,300 x 13,300 grey image (177 M pixels, just under PIL's 179 M bomb error) of
zeros, about 170 KB on disk.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from processes import free_port, stop_group  # noqa: E402

BOMB_SIDE = 13_300


def bomb_png(path: Path) -> Path:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((BOMB_SIDE, BOMB_SIDE), dtype=np.uint8)).save(buffer, format="PNG", optimize=False)
    path.write_bytes(buffer.getvalue())
    return path


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in process group `pgid`, in MB."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            status = (entry / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        total += int(match.group(1)) if match else 0
    return total / 1024


class Sampler(threading.Thread):
    def __init__(self, pgid: int) -> None:
        super().__init__(daemon=True)
        self.pgid, self.peak, self.running = pgid, 0.0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, group_rss_mb(self.pgid))
            time.sleep(0.05)


def post(port: int, body: bytes, timeout: float = 600) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()[:200].decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read()[:300].decode(errors="replace")
    except (urllib.error.URLError, OSError) as err:
        return -1, str(err)


def frame_body(images: list[str], params: dict | None = None) -> bytes:
    payload = {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}
    if params:
        payload["params"] = params
    return json.dumps(payload).encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--model", help="served model URI (default: the run's first registered model)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    uri = saved["tracking_uri"]
    tmp = Path(tempfile.mkdtemp(prefix="fedpgp-hostile-"))
    bombs = [bomb_png(tmp / f"bomb{i}.png") for i in range(3)]
    figures: dict = {"bomb_png_bytes": bombs[0].stat().st_size}
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    # predict ------------------------------------------------------------------------------------------
    out = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "fedpgp_ray.predict", "--run", str(run_dir),
                          *map(str, bombs)], capture_output=True, text=True, env=env)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1)) / 1024
    said = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    figures["predict"] = {"max_rss_mb": rss, "exit": out.returncode, "error": said[0] if said else None}
    print(f"predict --run on 3 bomb PNGs: max RSS {rss:.0f} MB, exit {out.returncode}"
          + (f" ({said[0][:140]})" if said else ""))

    # server -------------------------------------------------------------------------------------------
    model = args.model
    if model is None:
        from mlflow import MlflowClient

        versions = MlflowClient(uri).search_model_versions(f"run_id = '{saved['run_id']}'")
        model = f"models:/{versions[0].name}/{versions[0].version}"
    port = free_port()
    log = (tmp / "serve.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model,
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"mlflow models serve exited: {(tmp / 'serve.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        time.sleep(2)
        idle = group_rss_mb(server.pid)
        sampler = Sampler(server.pid)
        sampler.start()
        encoded = base64.b64encode(bombs[0].read_bytes()).decode()
        statuses: list[int] = []
        threads = [threading.Thread(target=lambda: statuses.append(post(port, frame_body([encoded]))[0]))
                   for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bomb_peak = sampler.peak
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
        small = base64.b64encode(buffer.getvalue()).decode()
        classes_status, classes_text = post(port, frame_body([small], {"classes": [f"class {i}" for i in range(10_000)]}))
        classes_peak = sampler.peak
        big_status, big_text = post(port, frame_body([small] * (50 * 2**20 // len(small))))
        sampler.running = False
        sampler.join()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=10).close()
            alive = True
        except (urllib.error.URLError, OSError):
            alive = False
        figures["server"] = {"model": model, "idle_rss_mb": idle, "peak_after_bombs_mb": bomb_peak,
                             "peak_after_10000_classes_mb": classes_peak, "peak_after_50mb_body_mb": sampler.peak,
                             "bomb_statuses": sorted(statuses), "classes_status": classes_status,
                             "big_body_status": big_status, "alive": alive}
        print(f"mlflow models serve {model}: idle {idle:.0f} MB; 3 bomb PNGs at once -> peak {bomb_peak:.0f} MB "
              f"(HTTP {sorted(statuses)}); 10,000 classes -> peak {classes_peak:.0f} MB (HTTP {classes_status}: "
              f"{classes_text[:100]!r}); 50 MB body -> peak {sampler.peak:.0f} MB (HTTP {big_status}: "
              f"{big_text[:100]!r}); answers /ping after: {alive}")
    finally:
        stop_group(server)
        log.close()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
