"""HTTP API latency on a demo data dir: `python -m bench.api --data-dir wherefrom-data` (run `wherefrom demo` first).

Starts `wherefrom serve` on a free loopback port, then times sync traces, reads, queued traces and
one report, all with generated answers and k=10.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

from service.demo.world import make_world

TOKEN = "bench-token-" + "b" * 20


def start_server(data_dir: str, **env: str) -> tuple[subprocess.Popen, str]:
    """`wherefrom serve` over `data_dir` on a free loopback port, with these extra variables."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WHEREFROM_DATA_DIR": data_dir, "WHEREFROM_API_TOKEN": TOKEN, **env}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(base + "/healthz").status_code == 200:
                return proc, base
        except httpx.TransportError:
            if proc.poll() is not None:
                raise SystemExit("the server exited: run it by hand to see why")
            time.sleep(0.1)


def timed(call) -> tuple[float, object]:
    t = time.perf_counter()
    out = call()
    return time.perf_counter() - t, out


def run(data_dir: str, n: int = 30) -> None:
    proc, base = start_server(data_dir)
    questions = make_world(0).questions
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300) as c:
            c.post("/traces", json={"question": questions[0].prompt, "k": 10})  # loads the models
            sync = [timed(lambda: c.post("/traces", json={"question": q.prompt, "k": 10}))
                    for q in questions[1:n + 1]]
            ids = [r.json()["trace_id"] for _, r in sync]
            reads = [timed(lambda: c.get(f"/traces/{i}"))[0] for i in ids]
            started = time.perf_counter()
            jobs = [c.post("/traces", json={"question": q.prompt, "k": 10, "async": True}).json()["job_id"]
                    for q in questions[n + 1:2 * n + 1]]
            submitted = time.perf_counter() - started
            while any(c.get(f"/jobs/{j}").json()["status"] in ("queued", "running") for j in jobs):
                time.sleep(0.05)
            done = time.perf_counter() - started
            report, _ = timed(lambda: c.get(f"/traces/{ids[0]}/report"))
    finally:
        proc.terminate()
        proc.wait()
    lat = sorted(t for t, _ in sync)
    print(f"POST /traces (sync): median {statistics.median(lat) * 1e3:.0f} ms, p90 {lat[int(0.9 * len(lat))] * 1e3:.0f} ms")
    print(f"GET /traces/ID: median {statistics.median(reads) * 1e3:.1f} ms")
    print(f"{len(jobs)} queued traces: {submitted / len(jobs) * 1e3:.1f} ms per submit, all done in {done:.1f} s "
          f"({len(jobs) / done:.1f} traces/s)")
    print(f"GET /traces/ID/report (top 5, tail-patch): {report:.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="wherefrom-data")
    parser.add_argument("-n", type=int, default=30, help="traces per phase")
    args = parser.parse_args()
    run(args.data_dir, args.n)
