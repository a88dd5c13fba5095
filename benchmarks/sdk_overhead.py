#!/usr/bin/env python3
"""Guarded-call overhead of the Python SDK: ours (cycles.client) vs the published runcycles 0.5.3.

One `cycles serve` (temporary SQLite store, free loopback port) serves both SDKs in the same run. For
each SDK a sync no-op function is called N times unguarded and N times under `@cycles(...)` (estimate
1000, actual 700, default TTL 60 s, journal enabled in a temporary directory for both SDKs). Reported
per call: HTTP round trips (counted by wrapping httpx.Client.send in the measuring process) and the
added latency (mean, p50, p99) against the unguarded function. runcycles runs in its own virtualenv
(.venv-conformance, created like tests/conformance/conftest.py does) so it never shares our process.

Usage:  .venv/bin/python benchmarks/sdk_overhead.py [--calls 500] [--json out.json] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "bench-admin-key-0123456789"
CONFORMANCE_VENV = ROOT / ".venv-conformance"

DRIVER = textwrap.dedent('''
import json, os, statistics, sys, time
import httpx
params = json.loads(sys.argv[1])
count = {"n": 0}
_send = httpx.Client.send
def counting(self, *a, **k):
    count["n"] += 1
    return _send(self, *a, **k)
httpx.Client.send = counting

if params["sdk"] == "runcycles":
    from runcycles import CyclesClient, CyclesConfig, cycles
    cfg = CyclesConfig(base_url=params["base_url"], api_key=params["api_key"], tenant=params["tenant"],
                       journal_dir=params["journal_dir"])
    client = CyclesClient(cfg)
else:
    from cycles.client import CyclesClient, CyclesConfig, cycles
    cfg = CyclesConfig(base_url=params["base_url"], api_key=params["api_key"], tenant=params["tenant"],
                       journal_dir=params["journal_dir"], journal_replay=False)
    client = CyclesClient(cfg)

def work():
    return 1

guarded = cycles(1000, actual=700, action_kind="bench", action_name="noop", client=client)(work)

def timed(fn, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return out

n = params["calls"]
timed(guarded, params["warmup"])
timed(work, params["warmup"])
base = timed(work, n)
count["n"] = 0
g = timed(guarded, n)
trips = count["n"] / n
time.sleep(0.5)
extra = count["n"] / n - trips
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]
print("@@RESULT@@" + json.dumps({
    "sdk": params["sdk"], "calls": n, "round_trips_per_call": trips, "late_round_trips_per_call": extra,
    "unguarded_mean_us": statistics.fmean(base),
    "guarded_mean_us": statistics.fmean(g), "guarded_p50_us": pct(g, 0.5), "guarded_p99_us": pct(g, 0.99),
    "added_mean_us": statistics.fmean(g) - statistics.fmean(base),
    "added_p50_us": pct(g, 0.5) - pct(base, 0.5),
}))
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, CYCLES_ADMIN_API_KEY=ADMIN_KEY)
    cycles_bin = str(Path(sys.executable).with_name("cycles"))
    proc = subprocess.Popen([cycles_bin, "serve", "--port", str(port), "--store", f"sqlite:///{tmp / 'bench.db'}",
                             "--workers", "1", "--log-level", "warning"], env=env,
                            stdout=open(tmp / "server.log", "wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/actuator/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start")


def provision(base: str) -> tuple[str, str]:
    tenant = f"bench-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=base, headers={"X-Admin-API-Key": ADMIN_KEY}, timeout=30) as c:
        c.post("/v1/admin/tenants", json={"tenant_id": tenant, "name": tenant}).raise_for_status()
        r = c.post("/v1/admin/api-keys", json={"tenant_id": tenant, "name": "bench",
                                                "permissions": ["reservations:create", "reservations:commit",
                                                                "reservations:release", "reservations:extend",
                                                                "reservations:list", "balances:read"]})
        r.raise_for_status()
        key = r.json()["key_secret"]
        c.post("/v1/admin/budgets", json={"tenant_id": tenant, "scope": f"tenant:{tenant}", "unit": "USD_MICROCENTS",
                                          "allocated": {"unit": "USD_MICROCENTS", "amount": 10**15}}).raise_for_status()
    return tenant, key


def runcycles_python() -> str | None:
    py = CONFORMANCE_VENV / "bin" / "python"
    probe = "import runcycles; assert runcycles.__version__ == '0.5.3'"
    if py.exists() and subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0:
        return str(py)
    base = shutil.which("python3") or "python3"
    subprocess.run([base, "-m", "venv", str(CONFORMANCE_VENV)], check=True)
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "runcycles==0.5.3"], capture_output=True, text=True)
    return str(py) if r.returncode == 0 else None


def run_driver(python: str, params: dict, tmp: Path) -> dict:
    script = tmp / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ, HOME=str(tmp), PYTHONNOUSERSITE="1")
    proc = subprocess.run([python, str(script), json.dumps(params)], capture_output=True, text=True, env=env,
                          cwd=str(tmp), timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@"):])
    raise RuntimeError(f"driver failed ({params['sdk']}):\n{proc.stdout}\n{proc.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--json")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cycles-sdk-bench-") as d:
        tmp = Path(d)
        proc, base = start_server(tmp)
        try:
            results = []
            sdks = [("cycles.client", sys.executable)]
            rc = runcycles_python()
            if rc:
                sdks.append(("runcycles", rc))
            else:
                print("runcycles 0.5.3 unavailable; measuring our SDK only", file=sys.stderr)
            for sdk, python in sdks:
                tenant, key = provision(base)
                work = tmp / sdk
                work.mkdir()
                results.append(run_driver(python, {"sdk": sdk, "base_url": base, "api_key": key, "tenant": tenant,
                                                   "journal_dir": str(work / "journal"), "calls": args.calls,
                                                   "warmup": args.warmup}, work))
        finally:
            proc.terminate()
            proc.wait(10)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    rows = ["| SDK | HTTP round trips / call | unguarded mean | guarded mean | guarded p50 | guarded p99 | added mean | added p50 |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['sdk']} | {r['round_trips_per_call']:.2f} | {r['unguarded_mean_us']:.2f} µs | "
                    f"{r['guarded_mean_us'] / 1000:.2f} ms | {r['guarded_p50_us'] / 1000:.2f} ms | "
                    f"{r['guarded_p99_us'] / 1000:.2f} ms | {r['added_mean_us'] / 1000:.2f} ms | "
                    f"{r['added_p50_us'] / 1000:.2f} ms |")
    print("\n".join(rows))
    if not args.markdown:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
