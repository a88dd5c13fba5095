#!/usr/bin/env python3
"""The hot path under load: reserves/s and commits/s of `cycles serve`, against a raw-ASGI floor, in one run.

Each run, on this machine and in this order:
  1. floor: benchmarks/raw_asgi.py (a fixed JSON answer, no framework, no store) on the same uvicorn;
  2. reserve: `cycles serve` on a fresh store, POST /v1/reservations with unique idempotency keys;
  3. commit: each reservation of step 2 committed once (POST /v1/reservations/{id}/commit).
wrk drives every step (-t2, --connections, default 32, keep-alive). For each step it prints requests/s,
p50 / p99 latency and the server's CPU time per request (its whole process tree, plus redis-server when
the script started one), and the ratios to the floor: these machines are shared and noisy, so the ratios
and the CPU per request mean more than absolute figures. Only loopback is used; every step is bounded.

  .venv/bin/python benchmarks/hotpath.py                   # embedded SQLite store, 1 worker, 10 s steps
  .venv/bin/python benchmarks/hotpath.py --store redis     # a redis-server started for the run
  .venv/bin/python benchmarks/hotpath.py --workers 2
  .venv/bin/python benchmarks/hotpath.py --quick           # ~25 s: one line, reserves/s and the ratio
  .venv/bin/python benchmarks/hotpath.py --json out.json   # every figure, for docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ADMIN_KEY = "hotpath-admin-" + secrets.token_hex(16)
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def cpu_s(pids: list[int]) -> float:
    total = 0
    for root in pids:
        for p in tree(root):
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError):
                pass
    return total / TICK


def wait_up(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"no answer from {url}")


def post(base: str, path: str, body: dict, headers: dict) -> dict:
    req = urllib.request.Request(base + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json", **headers})
    return json.load(urllib.request.urlopen(req, timeout=10))


def wrk(url: str, seconds: float, connections: int, script: Path | None, env: dict[str, str]) -> dict:
    args = ["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", url]
    if script is not None:
        args[1:1] = ["-s", str(script)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, env={**os.environ, **env}).stdout

    def ms(text: str) -> float:
        value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"requests": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "p50_ms": ms(lat["50"]), "p99_ms": ms(lat["99"]), "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errors.group(1) if errors else None}


def measured(name: str, url: str, seconds: float, args: argparse.Namespace, pids: list[int],
             script: Path | None = None, env: dict[str, str] | None = None) -> dict:
    c0 = cpu_s(pids)
    out = wrk(url, seconds, args.connections, script, env or {})
    out["cpu_us_per_req"] = round((cpu_s(pids) - c0) * 1e6 / max(out["requests"], 1), 1)
    out["name"] = name
    return out


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.p = subprocess.Popen(args, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                  start_new_session=True)

    def stop(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    subprocess.run("apt-get install -y -qq wrk >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq wrk)",
                   shell=True, check=False)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is required (apt-get install wrk)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="sqlite", help="sqlite (a fresh file), redis (a redis-server started "
                    "for the run), or a store URL")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the floor and reserve steps")
    ap.add_argument("--quick", action="store_true", help="5 s steps, no commit step, one line of output")
    ap.add_argument("--json", help="write every figure to this file")
    args = ap.parse_args()
    if args.quick:
        args.seconds = 5.0
    ensure_wrk()
    py = sys.executable
    cycles = shutil.which("cycles", path=str(Path(py).parent)) or shutil.which("cycles")
    if cycles is None:
        raise SystemExit("no cycles command: install the project first (pip install -e .)")
    tmp = Path(tempfile.mkdtemp(prefix="cycles-hotpath-"))
    procs: list[Proc] = []
    results: dict = {"store": args.store, "workers": args.workers, "connections": args.connections}
    try:
        # 1. the floor
        port = free_port()
        raw = Proc([py, "-m", "uvicorn", "raw_asgi:app", "--host", "127.0.0.1", "--port", str(port),
                    "--no-access-log", "--log-level", "warning"], {**os.environ, "PYTHONPATH": str(HERE)},
                   tmp / "raw.log")
        procs.append(raw)
        wait_up(f"http://127.0.0.1:{port}/")
        wrk(f"http://127.0.0.1:{port}/", 1, args.connections, None, {})  # warm-up
        results["floor"] = measured("raw ASGI floor", f"http://127.0.0.1:{port}/", args.seconds, args, [raw.p.pid])
        raw.stop()

        # 2. the server
        counted: list[int] = []
        store = args.store
        if store == "redis":
            rport = free_port()
            redis_server = shutil.which("redis-server")
            if redis_server is None:
                raise SystemExit("redis-server is required for --store redis (apt-get install redis-server)")
            rs = Proc([redis_server, "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp),
                       "--daemonize", "no"], dict(os.environ), tmp / "redis.log")
            procs.append(rs)
            counted.append(rs.p.pid)
            store = f"redis://127.0.0.1:{rport}/0"
            time.sleep(0.5)
        sport = free_port()
        env = {**os.environ, "CYCLES_ADMIN_API_KEY": ADMIN_KEY,
               "CYCLES_WEBHOOK_SECRET_KEY": base64.b64encode(os.urandom(32)).decode()}
        serve = [cycles, "serve", "--host", "127.0.0.1", "--port", str(sport), "--workers", str(args.workers)]
        serve += ["--data-dir", str(tmp / "data")] if store == "sqlite" else ["--store", store]
        server = Proc(serve, env, tmp / "server.log")
        procs.append(server)
        base = f"http://127.0.0.1:{sport}"
        wait_up(base + "/actuator/health")
        tenant = "hp" + secrets.token_hex(4)
        admin = {"X-Admin-API-Key": ADMIN_KEY}
        post(base, "/v1/admin/tenants", {"tenant_id": tenant, "name": tenant}, admin)
        key = post(base, "/v1/admin/api-keys", {"tenant_id": tenant, "name": "hp", "permissions": [
            "reservations:create", "reservations:commit"]}, admin)["key_secret"]
        post(base, "/v1/admin/budgets", {"tenant_id": tenant, "scope": f"tenant:{tenant}", "unit": "USD_MICROCENTS",
                                         "allocated": {"unit": "USD_MICROCENTS", "amount": 10**15}}, admin)
        counted.insert(0, server.p.pid)
        ids = tmp / "ids"
        ids.mkdir()
        wenv = {"TENANT": tenant, "APIKEY": key, "IDS_DIR": "", "RUN_TAG": "warm" + secrets.token_hex(3)}
        wrk(base, 1, args.connections, HERE / "wrk" / "reserve.lua", wenv)  # warm-up (caches, page cache)
        wenv.update(IDS_DIR=str(ids), RUN_TAG=secrets.token_hex(4))
        results["reserve"] = measured("reserve", base, args.seconds, args, counted, HERE / "wrk" / "reserve.lua", wenv)
        if not args.quick:
            made = sum(len(f.read_text().split()) for f in ids.glob("ids-*.txt"))
            commit = measured("commit", base, args.seconds / 2, args, counted, HERE / "wrk" / "commit.lua", wenv)
            commit["reservations"] = made
            commit["replays"] = max(0, commit["requests"] - made)
            results["commit"] = commit
        server.stop()
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    floor = results["floor"]
    for step in ("reserve", "commit"):
        if step in results:
            r = results[step]
            r["ratio"] = round(r["rps"] / floor["rps"], 3)
            r["cpu_ratio"] = round(r["cpu_us_per_req"] / max(floor["cpu_us_per_req"], 0.1), 1)
    res = results["reserve"]
    if args.quick:
        print(f"reserve {res['rps']:.0f}/s, {res['cpu_us_per_req']:.0f} us CPU/req, p99 {res['p99_ms']:.1f} ms, "
              f"non-2xx {res['non_2xx']}; raw ASGI floor {floor['rps']:.0f}/s, {floor['cpu_us_per_req']:.0f} us CPU/req; "
              f"ratio {res['ratio']:.3f}, CPU ratio {res['cpu_ratio']}")
    else:
        print(f"store {args.store}, {args.workers} worker(s), wrk -t2 -c{args.connections}")
        print(f"{'step':<16}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}{'ratio':>8}{'non-2xx':>9}")
        for step in ("floor", "reserve", "commit"):
            if step in results:
                r = results[step]
                print(f"{r['name']:<16}{r['rps']:>9.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                      f"{r['cpu_us_per_req']:>12.0f}{r.get('ratio', 1.0):>8.3f}{r['non_2xx']:>9}")
        if results.get("commit", {}).get("replays"):
            print(f"note: the commit step ran out of reservations; {results['commit']['replays']} commits were replays")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    bad = res["non_2xx"] or results.get("commit", {}).get("non_2xx")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
