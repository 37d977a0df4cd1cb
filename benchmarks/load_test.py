"""Bounded load test of `hyads serve` on loopback: N requests from C concurrent clients.

Starts the server as its own process, posts a real bottle image (normal and defect alternately), and prints
errors, throughput, latency percentiles and the server's resident memory before and after.

Run: .venv/bin/python benchmarks/load_test.py runs/bottle-reservoir ../shared/data/mvtec_ad/bottle 1000 16
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(model: str, data: str, n: int = 1000, conc: int = 16, runtime: str = "torch") -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = str(Path(sys.executable).with_name("hyads"))
    proc = subprocess.Popen([exe, "serve", model, "--port", str(port), "--runtime", runtime, "--queue", "64"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        bodies = [p.read_bytes() for p in (sorted((Path(data) / "test" / "good").iterdir())[0],
                                            sorted((Path(data) / "test" / "broken_large").iterdir())[0])]
        with httpx.Client() as c:  # warm-up
            for b in bodies * 4:
                c.post(url + "/v1/predict", content=b, headers={"content-type": "image/png"})
        rss_start = rss_mib(proc.pid)
        lat, codes = [], []
        lock = threading.Lock()
        counter = iter(range(n))
        marks = {n // 4, n // 2, 3 * n // 4, n}
        rss_trace: dict[str, float] = {}

        def worker() -> None:
            with httpx.Client(timeout=120) as c:
                for i in counter:
                    t = time.perf_counter()
                    r = c.post(url + "/v1/predict", content=bodies[i % 2], headers={"content-type": "image/png"})
                    with lock:
                        lat.append(time.perf_counter() - t)
                        codes.append(r.status_code)
                        if len(codes) in marks:
                            rss_trace[str(len(codes))] = round(rss_mib(proc.pid), 1)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(conc)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss_end = rss_mib(proc.pid)
        ms = np.array(lat) * 1000
        out = {"requests": n, "concurrency": conc, "runtime": runtime, "errors": sum(c != 200 for c in codes),
               "status_counts": {str(k): codes.count(k) for k in sorted(set(codes))},
               "throughput_rps": n / wall, "p50_ms": float(np.percentile(ms, 50)),
               "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)),
               "server_rss_mib_start": rss_start, "server_rss_mib_after_n_requests": rss_trace,
               "server_rss_mib_end": rss_end}
        print(json.dumps(out, indent=2))
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]) if len(a) > 2 else 1000, int(a[3]) if len(a) > 3 else 16, a[4] if len(a) > 4 else "torch")
