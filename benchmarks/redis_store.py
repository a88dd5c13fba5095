"""The Redis store under HTTP load, and in the same run the store's own ceiling.

Starts a private redis-server (AOF off: this measures the code path, not the disk), then
  1. benchmarks/load.py against `cycles serve --store redis://...` with 1 and 2 worker processes
     (reserve+commit cycles and the bare endpoint at the given concurrencies), and
  2. benchmarks/redis_ceiling.py: EVALSHA of reserve.lua from redis-benchmark and from redis-py,
and prints how much of the ceiling the HTTP path reaches.

    python benchmarks/redis_store.py [--duration 5] [--concurrency 1,8,32,64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()
    if not shutil.which("redis-server"):
        sys.exit("redis-server is required (apt-get install redis-server)")
    tmp = Path(tempfile.mkdtemp(prefix="cycles-redis-load-"))
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    best: dict[str, float] = {}
    try:
        time.sleep(0.3)
        for workers in args.workers.split(","):
            out = tmp / f"w{workers}.json"
            cmd = [sys.executable, str(HERE / "load.py"), "--workers", workers, "--duration", str(args.duration),
                   "--concurrency", args.concurrency, "--serve-arg=--store",
                   f"--serve-arg=redis://127.0.0.1:{port}/0", "--tenant", f"bench-w{workers}", "--json", str(out)]
            print(f"\n## Redis store, {workers} worker(s)\n", flush=True)
            subprocess.run(cmd, check=True)
            data = json.loads(out.read_text())
            for row in _rows(data):
                if row.get("workload") in ("cycle", "reserve") and row.get("reserves_per_s"):
                    best[workers] = max(best.get(workers, 0.0), float(row["reserves_per_s"]))
        print("\n## The reserve script called directly\n", flush=True)
        subprocess.run([sys.executable, str(HERE / "redis_ceiling.py"), "--seconds", str(args.duration)], check=True)
        if best:
            print("\nBest HTTP reserves/s on the Redis store: " +
                  ", ".join(f"{w} worker(s): {v:,.0f}" for w, v in sorted(best.items())))
    finally:
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def _rows(data: object) -> list[dict]:
    """Result rows of a load.py JSON file, whatever its nesting."""
    rows: list[dict] = []
    if isinstance(data, dict):
        if "workload" in data:
            rows.append(data)
        for v in data.values():
            rows += _rows(v)
    elif isinstance(data, list):
        for v in data:
            rows += _rows(v)
    return rows


if __name__ == "__main__":
    main()
