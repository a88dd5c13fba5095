"""The Redis store's own ceiling: the reserve script called directly, without HTTP or Python in the way.

Starts a private redis-server on a free loopback port, provisions one tenant and budget through the
store, then measures EVALSHA of `reserve.lua`:
  * with redis-benchmark (a C client; every call uses a fresh random idempotency key), and
  * from a Python asyncio loop (redis-py, N concurrent callers), the ceiling a server worker could reach.
Compare these with benchmarks/load.py --store redis to see how much of the ceiling the HTTP path uses.

    python benchmarks/redis_ceiling.py [--requests 100000] [--clients 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cycles.store.redis import RedisStore, prefix


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reserve_args(tenant: str, key: str) -> list[str]:
    """ARGV of reserve.lua as RedisStore.reserve passes it (see the header of reserve.lua): a live reserve of a
    tenant-key request without policies, rate limits, action rules or a governance check, and the journal
    argument a runtime request sends (a context row only: no items)."""
    scopes = [f"tenant:{tenant}"]
    journal = json.dumps({"items": [], "ctx": json.dumps({"request_id": "req_bench", "trace_id": "0" * 31 + "1"}),
                          "rand": "0badcafe"})
    return [prefix(tenant), tenant, str(7 * 86400000), "0", "reserve", key, "h", "USD_MICROCENTS", "1000",
            scopes[0], json.dumps(scopes), "0", "60000", "5000", "", json.dumps({"tenant": tenant}),
            json.dumps({"kind": "llm", "name": "m"}), "", "rsv_" + tenant + "." + key, "ALLOW", "null", "{}", "[]",
            "", "", "", "", journal]


async def provision(url: str, tenant: str) -> tuple[RedisStore, str]:
    store = RedisStore(url)
    await store.create_tenant({"tenant_id": tenant, "name": tenant, "status": "ACTIVE"})
    await store.create_budget({"tenant_id": tenant, "scope": f"tenant:{tenant}", "unit": "USD_MICROCENTS",
                               "allocated": 10**17})
    script = store.scripts["reserve"]
    await script.registered_client.script_load(script.script)
    return store, script.sha


async def python_loop(store: RedisStore, sha: str, tenant: str, concurrency: int, seconds: float) -> tuple[int, list[float]]:
    p = prefix(tenant)
    done, lat = 0, []
    stop = time.perf_counter() + seconds

    async def caller(i: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < stop:
            n += 1
            t0 = time.perf_counter()
            await store.r.evalsha(sha, 1, p + "tenant", *reserve_args(tenant, f"py-{i}-{n}"))
            lat.append(time.perf_counter() - t0)
            done += 1

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return done, lat


def _run(coro):
    try:
        import uvloop  # the loop the server runs on (uvicorn[standard])

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of the Python loop")
    args = ap.parse_args()
    if not shutil.which("redis-server"):
        sys.exit("redis-server is required (apt-get install redis-server)")
    tmp = Path(tempfile.mkdtemp(prefix="cycles-redis-bench-"))
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        url = f"redis://127.0.0.1:{port}/0"
        tenant = "bench"
        store, sha = asyncio.run(provision(url, tenant))
        rows = []
        if shutil.which("redis-benchmark"):
            # -r: __rand_int__ is drawn from 0 .. 10^8 - 1 (with 10^12 redis-benchmark drew 0 every time, so
            # every call after the first was a replay)
            cmd = ["redis-benchmark", "-p", str(port), "-n", str(args.requests), "-c", str(args.clients), "-r",
                   "100000000", "-q", "evalsha", sha, "1", prefix(tenant) + "tenant",
                   *reserve_args(tenant, "rb-__rand_int__")]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
            m = re.search(r"([\d.]+) requests per second, p50=([\d.]+) msec", out)
            if m:
                rows.append(("redis-benchmark EVALSHA reserve.lua", args.clients, float(m.group(1)), float(m.group(2))))
            else:
                print(out)
        for conc in (1, 64):
            store2 = RedisStore(url)
            done, lat = _run(python_loop(store2, sha, tenant, conc, args.seconds))
            lat.sort()
            rows.append(("redis-py asyncio (uvloop, hiredis) EVALSHA reserve.lua", conc, done / args.seconds,
                         lat[len(lat) // 2] * 1000))
        info = subprocess.run(["redis-cli", "-p", str(port), "info", "commandstats"], capture_output=True,
                              text=True).stdout
        m = re.search(r"cmdstat_evalsha:calls=(\d+),usec=(\d+),usec_per_call=([\d.]+)", info)
        print("| client | concurrency | reserves/s | p50 ms |")
        print("|---|---|---|---|")
        for name, conc, rps, p50 in rows:
            print(f"| {name} | {conc} | {rps:,.0f} | {p50:.3f} |")
        if m:
            per = float(m.group(3))
            print(f"\nRedis server time per reserve script call: {per:.1f} µs "
                  f"(single-core ceiling ≈ {1e6 / per:,.0f} reserves/s)")
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
