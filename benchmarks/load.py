#!/usr/bin/env python3
"""Load generator for a Cycles server: reserve+commit cycles against a bare JSON endpoint.

Runs as its own process, talks to the server over loopback only, and stops by itself: every phase
is bounded by time (--warmup + --duration) and by request count (--max-requests), and the whole
run by --max-runtime. By default it starts `cycles serve` itself (temporary data dir, free port,
CYCLES_ADMIN_API_KEY set) and stops it at the end; --base-url targets a running server instead.

Workloads, each run at every concurrency of --concurrency (one keep-alive connection per virtual
client, each client strictly sequential):

  cycle    POST /v1/reservations, then POST /v1/reservations/{id}/commit, fresh idempotency keys,
           with the headers and bodies the Python SDK sends (X-Cycles-API-Key, X-Idempotency-Key).
  reserve  POST /v1/reservations only (reservations stay ACTIVE until their TTL) - for comparing
           with published "reserve ops/s" figures.
  bare     GET /actuator/health/liveness (same server stack, the store is not touched) with the same
           Python client, and with wrk when it is installed (a C client: the server's ceiling).

The Python client is lean on purpose (the machine it was written for has 2 cores shared by server
and client): raw HTTP/1.1 over asyncio Protocols on uvloop, request bytes built from templates,
responses framed by Content-Length without a general HTTP parser. See docs/benchmarks.md.

Usage:
  .venv/bin/python benchmarks/load.py                      # 2 workers, c = 1, 8, 32, 64, 8 s each
  .venv/bin/python benchmarks/load.py --workers 1 --subject 3-level --json out.json
  .venv/bin/python benchmarks/load.py --base-url http://127.0.0.1:7878 --admin-key KEY
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import math
import multiprocessing
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

UNIT = "USD_MICROCENTS"
BUDGET = 10**15
ESTIMATE = 1_000
ACTUAL = 700
LIVENESS = "/actuator/health/liveness"
USER_AGENT = "python-httpx/0.28.1"  # what the SDK's httpx client sends
REQUEST_TIMEOUT_S = 10.0  # a request still unanswered this long after the phase ends counts as an error
ERROR_SAMPLES = 5


# --------------------------------------------------------------------------------------------
# HTTP/1.1 client
# --------------------------------------------------------------------------------------------


class Conn(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight (like one SDK client call)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1  # total length of the response being framed, -1 while its head is incomplete
        self.head_end = 0
        self.waiter: asyncio.Future | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            i = head.find(b"\r\ncontent-length:")
            if i < 0:
                self._fail(ConnectionError("response without Content-Length: " + head[:200].decode("latin-1")))
                return
            j = head.find(b"\r\n", i + 2)
            self.head_end = end + 4
            self.need = self.head_end + int(head[i + 17:j if j >= 0 else len(head)])
        if len(buf) < self.need:
            return
        status = int(buf[9:12])
        body = bytes(buf[self.head_end:self.need])
        del buf[:self.need]
        self.need = -1
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, body))

    def _fail(self, exc: BaseException) -> None:
        self.lost = exc
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("connection closed by the server"))

    def send(self, data: bytes) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        if self.lost is not None:
            fut.set_exception(self.lost)
            return fut
        self.waiter = fut
        self.transport.write(data)  # type: ignore[union-attr]
        return fut


def _head(method: str, path: str, host: str, extra: list[tuple[str, str]]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Accept: */*", "Accept-Encoding: gzip, deflate",
             "Connection: keep-alive", f"User-Agent: {USER_AGENT}"]
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n").encode()


@dataclass
class Templates:
    """Request bytes with the per-request parts (keys, ids) spliced in."""

    host: str
    api_key: str
    subject: dict[str, str]

    def __post_init__(self) -> None:
        self.liveness = _head("GET", LIVENESS, self.host, []) + b"\r\n"
        subject = json.dumps(self.subject, separators=(",", ":"))
        # Key order and fields as the SDK decorator sends them (ttl_ms and overage_policy always present).
        self._reserve_body = ('{"idempotency_key":"%s","subject":' + subject.replace("%", "%%") +
                              ',"action":{"kind":"llm.completion","name":"gpt-4o"},'
                              '"estimate":{"unit":"' + UNIT + '","amount":' + str(ESTIMATE) + '},'
                              '"ttl_ms":60000,"overage_policy":"ALLOW_IF_AVAILABLE"}')
        self._commit_body = ('{"idempotency_key":"%s","actual":{"unit":"' + UNIT + '","amount":' + str(ACTUAL) +
                             '},"metrics":{"latency_ms":12,"tokens_input":300,"tokens_output":100}}')
        self._auth = [("X-Cycles-API-Key", self.api_key), ("Content-Type", "application/json")]

    def _post(self, path: str, key: str, body: str) -> bytes:
        raw = body.encode()
        return (_head("POST", path, self.host, self._auth + [("X-Idempotency-Key", key),
                                                             ("Content-Length", str(len(raw)))]) + b"\r\n" + raw)

    def reserve(self, key: str) -> bytes:
        return self._post("/v1/reservations", key, self._reserve_body % key)

    def commit(self, reservation_id: str, key: str) -> bytes:
        return self._post(f"/v1/reservations/{reservation_id}/commit", key, self._commit_body % key)


_RID = b'"reservation_id":"'


def reservation_id_of(body: bytes) -> str | None:
    i = body.find(_RID)
    if i < 0:
        return None
    i += len(_RID)
    return body[i:body.index(b'"', i)].decode()


# --------------------------------------------------------------------------------------------
# One phase in one client process
# --------------------------------------------------------------------------------------------


@dataclass
class PhaseSpec:
    workload: str  # cycle | reserve | bare
    host: str
    port: int
    api_key: str
    subject: dict[str, str]
    connections: int
    start_mono: float  # time.monotonic() (system-wide CLOCK_MONOTONIC) at which the warm-up begins
    warmup: float
    duration: float
    max_requests: int
    use_uvloop: bool = True
    connect_stagger: float = 0.0  # seconds between opening two connections (0: all at once, like a pool)


@dataclass
class PhaseStats:
    ok_first: int = 0  # reserves (cycle, reserve) or GETs (bare) completed in the window
    ok_cycles: int = 0  # commits completed in the window (cycle)
    http_in_window: int = 0
    first_lat: list[float] = field(default_factory=list)  # seconds
    cycle_lat: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    issued: int = 0
    cpu_s: float = 0.0  # this client process's CPU time inside the window
    window_s: float = 0.0

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(what[:300])


async def _phase(spec: PhaseSpec) -> PhaseStats:
    loop = asyncio.get_running_loop()
    st = PhaseStats()
    tpl = Templates(f"{spec.host}:{spec.port}", spec.api_key, spec.subject)
    conns: list[Conn] = []
    for i in range(spec.connections):
        if i and spec.connect_stagger:
            await asyncio.sleep(spec.connect_stagger)
        _, proto = await loop.create_connection(Conn, spec.host, spec.port)
        conns.append(proto)
    pc = time.perf_counter
    # perf_counter and monotonic are both CLOCK_MONOTONIC on Linux; convert anyway to stay exact.
    start = pc() + (spec.start_mono - time.monotonic())
    ws = start + spec.warmup
    we = ws + spec.duration
    cpu: dict[str, float] = {}
    loop.call_at(loop.time() + (ws - pc()), lambda: cpu.__setitem__("a", time.process_time()))
    loop.call_at(loop.time() + (we - pc()), lambda: cpu.__setitem__("b", time.process_time()))
    limit = spec.max_requests
    if start > pc():
        await asyncio.sleep(start - pc())

    async def cycle(conn: Conn, commit: bool) -> None:
        while True:
            t0 = pc()
            if t0 >= we or st.issued >= limit:
                return
            key = str(uuid.uuid4())
            st.issued += 1
            status, body = await conn.send(tpl.reserve(key))
            t1 = pc()
            if ws <= t1 < we:
                st.http_in_window += 1
            if status != 200:
                st.error(f"reserve {status}: {body[:200]!r}")
                continue
            rid = reservation_id_of(body)
            if rid is None:
                st.error(f"reserve 200 without reservation_id: {body[:200]!r}")
                continue
            if ws <= t1 < we:
                st.ok_first += 1
                st.first_lat.append(t1 - t0)
            if not commit:
                continue
            st.issued += 1
            status, body = await conn.send(tpl.commit(rid, str(uuid.uuid4())))
            t2 = pc()
            if ws <= t2 < we:
                st.http_in_window += 1
            if status != 200:
                st.error(f"commit {status}: {body[:200]!r}")
                continue
            if ws <= t2 < we:
                st.ok_cycles += 1
                st.cycle_lat.append(t2 - t0)

    async def bare(conn: Conn) -> None:
        req = tpl.liveness
        while True:
            t0 = pc()
            if t0 >= we or st.issued >= limit:
                return
            st.issued += 1
            status, body = await conn.send(req)
            t1 = pc()
            if status != 200:
                st.error(f"liveness {status}: {body[:200]!r}")
                continue
            if ws <= t1 < we:
                st.http_in_window += 1
                st.ok_first += 1
                st.first_lat.append(t1 - t0)

    if spec.workload == "bare":
        tasks = [asyncio.ensure_future(bare(c)) for c in conns]
    else:
        tasks = [asyncio.ensure_future(cycle(c, spec.workload == "cycle")) for c in conns]
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, we - pc()) + REQUEST_TIMEOUT_S)
    for t in pending:
        t.cancel()
        st.error(f"request unanswered {REQUEST_TIMEOUT_S:.0f} s after the phase ended")
    for t in done:
        if t.exception() is not None:
            st.error(f"client connection failed: {t.exception()!r}")
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    st.window_s = spec.duration
    st.cpu_s = cpu.get("b", time.process_time()) - cpu.get("a", 0.0)
    return st


def run_phase(spec: PhaseSpec) -> PhaseStats:
    if spec.use_uvloop:
        try:
            import uvloop

            return uvloop.run(_phase(spec)) if hasattr(uvloop, "run") else _run_with_policy(spec, uvloop)
        except ImportError:
            pass
    return asyncio.run(_phase(spec))


def _run_with_policy(spec: PhaseSpec, uvloop: Any) -> PhaseStats:
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(_phase(spec))
    finally:
        loop.close()


# --------------------------------------------------------------------------------------------
# Measuring CPU of the server processes
# --------------------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(ppid, CPU seconds) of a process from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    rest = raw[raw.rindex(b")") + 2:].split()
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / _TICK


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            s = _proc_stat(int(name))
            if s is not None:
                children.setdefault(s[0], []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def tree_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        s = _proc_stat(pid)
        if s is not None:
            total += s[1]
    return total


def connections_per_process(pids: list[int], port: int) -> list[int]:
    """How many established TCP connections on local `port` each process holds, busiest first."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "01" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(cols[9])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    counts = []
    for pid in pids:
        n = 0
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    n += 1
        except OSError:
            continue
        if n:
            counts.append(n)
    return sorted(counts, reverse=True)


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores; idle and iowait excluded)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return math.nan
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICK


def busy_pct(interval: float) -> float:
    """Percent of one core the machine was busy over `interval` seconds (200% = 2 cores)."""
    a = machine_busy()
    time.sleep(interval)
    return 100 * (machine_busy() - a) / interval


class CpuWindow(threading.Thread):
    """Samples the CPU time of the server processes and of the whole machine at the start and end of
    a window (monotonic times)."""

    def __init__(self, pids: list[int], start: float, end: float, port: int | None = None) -> None:
        super().__init__(daemon=True)
        self.pids, self.start_at, self.end_at, self.port = pids, start, end, port
        self.seconds: float | None = None
        self.machine_seconds: float | None = None
        self.connections: list[int] = []  # established client connections held by each server process

    def run(self) -> None:
        time.sleep(max(0.0, self.start_at - time.monotonic()))
        a, ma = tree_cpu(self.pids), machine_busy()
        if self.port and self.pids:
            self.connections = connections_per_process(self.pids, self.port)
        time.sleep(max(0.0, self.end_at - time.monotonic()))
        self.seconds = tree_cpu(self.pids) - a
        self.machine_seconds = machine_busy() - ma

    def other_pct(self, window: float, client_pct: float) -> float | None:
        """CPU used by neither the server nor the load generator: noise from other work on the machine."""
        if self.machine_seconds is None or self.seconds is None or not self.pids:
            return None
        return max(0.0, 100 * (self.machine_seconds - self.seconds) / window - client_pct)


# --------------------------------------------------------------------------------------------
# wrk (optional, bare endpoint only)
# --------------------------------------------------------------------------------------------

WRK_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
    .. '"p50_us":%d,"p95_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def run_wrk(wrk: str, url: str, connections: int, duration: float, workdir: Path) -> dict[str, Any]:
    script = workdir / "report.lua"
    script.write_text(WRK_LUA)
    before = os.times()
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s", "-s", str(script),
           url + LIVENESS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    after = os.times()
    line = next((l for l in proc.stdout.splitlines() if l.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-500:]} {proc.stderr[-500:]}")
    r = json.loads(line[len("WRKJSON "):])
    secs = r["duration_us"] / 1e6
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return {
        "rps": r["requests"] / secs, "requests": r["requests"], "window_s": secs, "errors": errors,
        "p50_ms": r["p50_us"] / 1000, "p95_ms": r["p95_us"] / 1000, "p99_ms": r["p99_us"] / 1000,
        "client_cpu_pct": 100 * ((after.children_user + after.children_system)
                                 - (before.children_user + before.children_system)) / secs,
        "command": " ".join(cmd),
    }


# --------------------------------------------------------------------------------------------
# Server and provisioning
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    try:  # PR_SET_PDEATHSIG = 1: the server gets SIGTERM if this generator dies without cleaning up
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Server:
    base_url: str
    admin_key: str
    proc: subprocess.Popen | None = None
    tmp: str | None = None
    log_path: Path | None = None
    command: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def cycles_bin() -> str:
    here = Path(sys.executable).with_name("cycles")
    return str(here) if here.exists() else (shutil.which("cycles") or "cycles")


def start_server(workers: int, extra_args: list[str]) -> Server:
    tmp = tempfile.mkdtemp(prefix="cycles-bench-")
    port = free_port()
    admin_key = "bench-admin-" + secrets.token_hex(16)
    env = dict(os.environ, CYCLES_ADMIN_API_KEY=admin_key)
    log_path = Path(tmp) / "server.log"
    cmd = [cycles_bin(), "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(Path(tmp) / "data"),
           "--workers", str(workers), "--log-level", "warning", *extra_args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    server = Server(f"http://127.0.0.1:{port}", admin_key, proc, tmp, log_path, cmd)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = server.log()
            server.stop()
            raise RuntimeError(f"server exited with {proc.returncode}:\n{out}")
        try:
            with urllib.request.urlopen(server.base_url + "/actuator/health", timeout=1) as r:
                if r.status == 200 and _ready_workers(proc.pid, workers):
                    return server
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    out = server.log()
    server.stop()
    raise RuntimeError(f"server did not become healthy in 60 s:\n{out}")


def _ready_workers(pid: int, workers: int) -> bool:
    # With --workers N uvicorn spawns N processes (plus multiprocessing's resource tracker); wait
    # until all workers exist so the load is spread over them.
    if workers == 1:
        return True
    spawned = 0
    for child in process_tree(pid)[1:]:
        try:
            spawned += b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            pass
    return spawned >= workers


def _call(base: str, method: str, path: str, headers: dict[str, str], body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def provision(base: str, admin_key: str, tenant: str, levels: int) -> tuple[str, dict[str, str], list[str]]:
    """Tenant, an API key and budgets along the subject's scopes. Returns (key, subject, scopes)."""
    admin = {"X-Admin-API-Key": admin_key}
    status, body = _call(base, "POST", "/v1/admin/tenants", admin, {"tenant_id": tenant, "name": tenant})
    if status not in (200, 201):
        raise RuntimeError(f"creating tenant {tenant}: {status} {body}")
    status, body = _call(base, "POST", "/v1/admin/api-keys", admin, {
        "tenant_id": tenant, "name": "bench",
        "permissions": ["reservations:create", "reservations:commit", "reservations:release", "balances:read"]})
    if status != 201:
        raise RuntimeError(f"creating an API key: {status} {body}")
    key = body["key_secret"]
    subject = {"tenant": tenant}
    if levels == 3:
        subject.update(workspace="bench-ws", agent="bench-agent")
    scopes, path = [], ""
    for level, value in subject.items():
        path = f"{path}/{level}:{value}" if path else f"{level}:{value}"
        scopes.append(path)
    for scope in scopes:
        status, body = _call(base, "POST", "/v1/admin/budgets", admin, {
            "tenant_id": tenant, "scope": scope, "unit": UNIT, "allocated": {"unit": UNIT, "amount": BUDGET}})
        if status != 201 and not (status == 409 and "DUPLICATE" in str(body)):
            raise RuntimeError(f"creating budget {scope}: {status} {body}")
    return key, subject, scopes


def smoke(host: str, port: int, key: str, subject: dict[str, str]) -> None:
    """One reserve+commit cycle with the client's own bytes, so a wrong request fails loudly and early."""
    spec = PhaseSpec("cycle", host, port, key, subject, 1, time.monotonic(), 0.0, 0.3, 50)
    st = run_phase(spec)
    if st.errors or st.ok_cycles == 0:
        raise RuntimeError(f"smoke cycle failed: {st.error_samples or 'no cycle completed'}")


# --------------------------------------------------------------------------------------------
# Orchestration and reporting
# --------------------------------------------------------------------------------------------


def pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    i = min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[i] * 1000


def merge(parts: list[PhaseStats]) -> PhaseStats:
    out = PhaseStats()
    for p in parts:
        out.ok_first += p.ok_first
        out.ok_cycles += p.ok_cycles
        out.http_in_window += p.http_in_window
        out.first_lat += p.first_lat
        out.cycle_lat += p.cycle_lat
        out.errors += p.errors
        out.error_samples += p.error_samples[:ERROR_SAMPLES - len(out.error_samples)]
        out.issued += p.issued
        out.cpu_s += p.cpu_s
        out.window_s = max(out.window_s, p.window_s)
    return out


class Runner:
    def __init__(self, args: argparse.Namespace, host: str, port: int, key: str, subject: dict[str, str],
                 server_root: int | None) -> None:
        self.args, self.host, self.port, self.key, self.subject = args, host, port, key, subject
        self.server_root = server_root  # pid of the server's main process, if known
        self.pool = (ProcessPoolExecutor(args.client_procs, mp_context=multiprocessing.get_context("spawn"))
                     if args.client_procs > 1 else None)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def python_phase(self, workload: str, conc: int) -> dict[str, Any]:
        a = self.args
        procs = max(1, min(a.client_procs, conc))
        # Give spawned processes time to start, and every client time to connect.
        start = time.monotonic() + (1.0 if self.pool else 0.05) + a.connect_stagger_ms / 1000 * conc / procs
        per = [conc // procs + (1 if i < conc % procs else 0) for i in range(procs)]
        specs = [PhaseSpec(workload, self.host, self.port, self.key, self.subject, n, start, a.warmup, a.duration,
                           max(1, a.max_requests // procs), not a.no_uvloop, a.connect_stagger_ms / 1000)
                 for n in per]
        pids = process_tree(self.server_root) if self.server_root else []
        sampler = CpuWindow(pids, start + a.warmup, start + a.warmup + a.duration, self.port)
        sampler.start()
        if self.pool is None:
            parts = [run_phase(specs[0])]
        else:
            parts = list(self.pool.map(run_phase, specs))
        sampler.join(timeout=5)
        st = merge(parts)
        first = sorted(st.first_lat)
        w = st.window_s
        row: dict[str, Any] = {
            "workload": workload, "client": f"python x{procs}" if procs > 1 else "python", "concurrency": conc,
            "window_s": w, "errors": st.errors, "error_samples": st.error_samples,
            "http_rps": st.http_in_window / w,
            "client_cpu_pct": 100 * st.cpu_s / w,
            "server_cpu_pct": (100 * sampler.seconds / w) if (pids and sampler.seconds is not None) else None,
        }
        row["other_cpu_pct"] = sampler.other_pct(w, row["client_cpu_pct"])
        row["conns_per_server_process"] = sampler.connections
        row["server_cpu_us_per_req"] = _per_req(row["server_cpu_pct"], row["http_rps"])
        row["client_cpu_us_per_req"] = _per_req(row["client_cpu_pct"], row["http_rps"])
        if workload == "bare":
            row.update(rps=st.ok_first / w, p50_ms=pct(first, 50), p95_ms=pct(first, 95), p99_ms=pct(first, 99))
        else:
            row.update(reserves_per_s=st.ok_first / w, reserve_p50_ms=pct(first, 50), reserve_p95_ms=pct(first, 95),
                       reserve_p99_ms=pct(first, 99))
        if workload == "cycle":
            cyc = sorted(st.cycle_lat)
            row.update(cycles_per_s=st.ok_cycles / w, cycle_p50_ms=pct(cyc, 50), cycle_p95_ms=pct(cyc, 95),
                       cycle_p99_ms=pct(cyc, 99))
        return row

    def wrk_phase(self, conc: int, workdir: Path) -> dict[str, Any]:
        a = self.args
        start = time.monotonic()
        pids = process_tree(self.server_root) if self.server_root else []
        sampler = CpuWindow(pids, start + 0.2, start + 0.2 + max(1, round(a.duration)) - 0.4, self.port)
        sampler.start()
        r = run_wrk(a.wrk_path, f"http://{self.host}:{self.port}", conc, a.duration, workdir)
        sampler.join(timeout=5)
        window = max(1, round(a.duration)) - 0.4
        r.update(workload="bare", client="wrk", concurrency=conc, error_samples=[], http_rps=r["rps"],
                 server_cpu_pct=(100 * sampler.seconds / window) if (pids and sampler.seconds is not None)
                 else None)
        r["other_cpu_pct"] = sampler.other_pct(window, r["client_cpu_pct"])
        r["conns_per_server_process"] = sampler.connections
        r["server_cpu_us_per_req"] = _per_req(r["server_cpu_pct"], r["http_rps"])
        r["client_cpu_us_per_req"] = _per_req(r["client_cpu_pct"], r["http_rps"])
        return r


def fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def _per_req(cpu_pct: float | None, rps: float) -> float | None:
    """CPU microseconds per HTTP request: steadier than throughput when other work shares the cores."""
    return None if cpu_pct is None or not rps else cpu_pct * 1e4 / rps


def _split(counts: list[int] | None) -> str:
    return "+".join(str(c) for c in counts) if counts else "-"


def cpu(v: Any) -> str:
    return "-" if v is None else f"{v:.0f}%"


def cpu_req(r: dict[str, Any], who: str) -> str:
    pct = r.get(f"{who}_cpu_pct")
    per = _per_req(pct, r.get("http_rps") or 0)
    return cpu(pct) if per is None else f"{cpu(pct)} · {per:,.0f} µs"


def markdown(results: dict[str, Any]) -> str:
    rows = results["phases"]
    out = []
    for workload, title in (("cycle", "Reserve + commit cycles"), ("reserve", "Reserve only")):
        sel = [r for r in rows if r["workload"] == workload]
        if not sel:
            continue
        out.append(f"**{title}** ({results['config']['subject_levels']}-level subject, "
                   f"{results['config']['workers_label']})\n")
        if workload == "cycle":
            out.append("| clients | cycles/s | reserves/s | HTTP req/s | reserve p50 / p95 / p99 ms "
                       "| cycle p50 / p95 / p99 ms | errors | server CPU | client CPU | other CPU | conns/worker |")
            out.append("|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---|")
            for r in sel:
                out.append(
                    f"| {r['concurrency']} | {fmt(r['cycles_per_s'], 0)} | {fmt(r['reserves_per_s'], 0)} "
                    f"| {fmt(r['http_rps'], 0)} | {fmt(r['reserve_p50_ms'], 2)} / {fmt(r['reserve_p95_ms'], 2)} / "
                    f"{fmt(r['reserve_p99_ms'], 2)} | {fmt(r['cycle_p50_ms'], 2)} / {fmt(r['cycle_p95_ms'], 2)} / "
                    f"{fmt(r['cycle_p99_ms'], 2)} | {r['errors']} | {cpu_req(r, 'server')} "
                    f"| {cpu_req(r, 'client')} | {cpu(r.get('other_cpu_pct'))} | {_split(r.get('conns_per_server_process'))} |")
        else:
            out.append("| clients | reserves/s | reserve p50 / p95 / p99 ms | errors | server CPU | client CPU | other CPU "
                       "| conns/worker |")
            out.append("|---:|---:|---|---:|---:|---:|---:|---|")
            for r in sel:
                out.append(
                    f"| {r['concurrency']} | {fmt(r['reserves_per_s'], 0)} | {fmt(r['reserve_p50_ms'], 2)} / "
                    f"{fmt(r['reserve_p95_ms'], 2)} / {fmt(r['reserve_p99_ms'], 2)} | {r['errors']} "
                    f"| {cpu_req(r, 'server')} | {cpu_req(r, 'client')} | {cpu(r.get('other_cpu_pct'))} "
                    f"| {_split(r.get('conns_per_server_process'))} |")
        out.append("")
    bare = [r for r in rows if r["workload"] == "bare"]
    if rows:
        note = ("CPU columns: percent of one core over the measured window · CPU microseconds per HTTP request. "
                "'other' is CPU used on the machine by neither the server nor the load generator.\n")
    else:
        note = ""
    if bare:
        out.append(f"**Bare endpoint** `GET {LIVENESS}` ({results['config']['workers_label']}); ratio = "
                   "reserves/s of the cycle workload ÷ bare req/s at the same concurrency\n")
        out.append("| clients | client | req/s | p50 / p95 / p99 ms | errors | server CPU | client CPU | other CPU "
                   "| conns/worker | reserves/s ÷ bare | cycle HTTP req/s ÷ bare |")
        out.append("|---:|---|---:|---|---:|---:|---:|---:|---|---:|---:|")
        cyc = {r["concurrency"]: r for r in rows if r["workload"] == "cycle"}
        for r in bare:
            c = cyc.get(r["concurrency"])
            ratio = c["reserves_per_s"] / r["rps"] if c and r["rps"] else None
            hratio = c["http_rps"] / r["rps"] if c and r["rps"] else None
            out.append(
                f"| {r['concurrency']} | {r['client']} | {fmt(r['rps'], 0)} | {fmt(r['p50_ms'], 2)} / "
                f"{fmt(r['p95_ms'], 2)} / {fmt(r['p99_ms'], 2)} | {r['errors']} | {cpu_req(r, 'server')} "
                f"| {cpu_req(r, 'client')} | {cpu(r.get('other_cpu_pct'))} | {_split(r.get('conns_per_server_process'))} "
                f"| {fmt(ratio, 3)} | {fmt(hratio, 3)} |")
        out.append("")
    if note:
        out.append(note)
    return "\n".join(out)


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    from importlib import metadata

    for pkg in ("cycles", "uvicorn", "starlette", "uvloop", "httptools", "msgspec", "prometheus-client"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    import sqlite3

    versions["sqlite"] = sqlite3.sqlite_version
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform(), "packages": versions}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="`cycles serve --workers N` (default 2)")
    p.add_argument("--base-url", help="target a running server (loopback only) instead of starting one")
    p.add_argument("--admin-key", default=os.environ.get("CYCLES_ADMIN_API_KEY"),
                   help="X-Admin-API-Key of the server given by --base-url (default $CYCLES_ADMIN_API_KEY)")
    p.add_argument("--server-pid", type=int, help="with --base-url: pid of the server, to report its CPU use")
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for `cycles serve` (repeatable)")
    p.add_argument("--subject", choices=("tenant", "3-level"), default="tenant",
                   help="tenant: one budget at tenant:T; 3-level: tenant/workspace/agent, all three budgeted")
    p.add_argument("--tenant", help="tenant id (default 'bench', or 'bench-<random>' with --base-url)")
    p.add_argument("--concurrency", default="1,8,32,64", help="comma-separated virtual clients (default 1,8,32,64)")
    p.add_argument("--workloads", default="cycle,bare", help="comma-separated: cycle, reserve, bare (default cycle,bare)")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per phase (default 8)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each phase (default 1)")
    p.add_argument("--max-requests", type=int, default=2_000_000, help="request cap per phase (default 2,000,000)")
    p.add_argument("--max-runtime", type=float, default=900, help="hard limit on the whole run in seconds (default 900)")
    p.add_argument("--client-procs", type=int, default=1, help="client processes sharing the connections (default 1)")
    p.add_argument("--bare-client", choices=("auto", "python", "wrk", "both"), default="auto",
                   help="auto = both when wrk is installed, else python (default auto)")
    p.add_argument("--wrk-path", default=shutil.which("wrk"), help="wrk binary (default: wrk on PATH)")
    p.add_argument("--no-uvloop", action="store_true", help="client on the stdlib asyncio loop")
    p.add_argument("--connect-stagger-ms", type=float, default=0.0,
                   help="pause between opening two client connections (default 0: all at once, as a client "
                        "pool does; uvicorn workers then tend to accept them unevenly)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before starting, wait up to SECONDS for other work on the machine to drop below "
                        "--quiet-below (default 0: measure and warn only)")
    p.add_argument("--quiet-below", type=float, default=15, metavar="PCT",
                   help="machine CPU percent (of one core) that counts as quiet (default 15)")
    p.add_argument("--nice", type=int, default=0,
                   help="scheduling niceness for this generator, wrk and the server it starts; a negative value "
                        "(root only) keeps other work on a shared machine from skewing the numbers (default 0)")
    p.add_argument("--json", help="also write the results as JSON to this path")
    p.add_argument("--render", metavar="JSON", help="only print the Markdown tables of an earlier --json file")
    args = p.parse_args(argv)
    args.concurrency_list = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.workload_list = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in args.workload_list:
        if w not in ("cycle", "reserve", "bare"):
            p.error(f"unknown workload {w}")
    if args.bare_client == "auto":
        args.bare_client = "both" if args.wrk_path else "python"
    if args.bare_client in ("wrk", "both") and not args.wrk_path:
        print("wrk not found; measuring the bare endpoint with the Python client only", file=sys.stderr)
        args.bare_client = "python"
    return args


class Timeout(Exception):
    pass


def _write_autogroup(nice: str) -> bool:
    try:
        Path("/proc/self/autogroup").write_text(nice)
        return True
    except OSError:
        return False


def set_niceness(nice: int) -> str | None:
    """Renice this generator (and so the server and wrk it starts). With the kernel's autogroup
    scheduling, niceness only ranks processes of the same session, so the session's autogroup is
    reniced too; returns the autogroup's previous niceness to restore at exit."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:
        print(f"warning: cannot set niceness {nice}: {exc}", file=sys.stderr)
        return None
    try:
        previous = Path("/proc/self/autogroup").read_text().split("nice")[-1].strip()
    except (OSError, IndexError):
        return None
    return previous if _write_autogroup(str(nice)) else None


def wait_quiet(limit: float, below: float) -> float:
    """Busy percent of the machine before the run; waits up to `limit` seconds for it to drop below `below`."""
    deadline = time.monotonic() + limit
    while True:
        busy = busy_pct(1.0 if limit <= 0 else 5.0)  # test suites run in bursts: ask for 5 quiet seconds
        if busy < below or time.monotonic() >= deadline:
            break
        print(f"machine busy {busy:.0f}% (other work); waiting for < {below:.0f}%", file=sys.stderr, flush=True)
    if busy >= below:
        print(f"warning: machine already {busy:.0f}% busy before the run; numbers will be noisy "
              "(see the 'other CPU' column)", file=sys.stderr, flush=True)
    return busy


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())))
        return 0

    def on_alarm(signum: int, frame: Any) -> None:
        raise Timeout(f"run exceeded --max-runtime {args.max_runtime:.0f} s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(args.max_runtime)))
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(143))

    server: Server | None = None
    runner: Runner | None = None
    restore_autogroup: str | None = None
    t_start = time.monotonic()
    try:
        if args.nice:
            restore_autogroup = set_niceness(args.nice)
        idle_before = wait_quiet(args.wait_quiet, args.quiet_below)
        if args.base_url:
            base = args.base_url.rstrip("/")
            if not args.admin_key:
                print("--base-url needs --admin-key (or $CYCLES_ADMIN_API_KEY)", file=sys.stderr)
                return 2
            server_root = args.server_pid
            workers_label = "external server"
            tenant = args.tenant or "bench-" + secrets.token_hex(4)
        else:
            server = start_server(args.workers, args.serve_arg)
            base = server.base_url
            server_root = server.proc.pid  # type: ignore[union-attr]
            workers_label = f"{args.workers} worker{'s' if args.workers > 1 else ''}"
            tenant = args.tenant or "bench"
            print(f"started: {' '.join(server.command)}", file=sys.stderr)
        if args.connect_stagger_ms:
            workers_label += f", Python client connections opened {args.connect_stagger_ms:g} ms apart"
        url = urlparse(base)
        if url.hostname not in ("127.0.0.1", "localhost", "::1"):
            print(f"refusing non-loopback target {base}", file=sys.stderr)
            return 2
        host, port = url.hostname, url.port or 80
        key, subject, scopes = provision(base, args.admin_key if args.base_url else server.admin_key,  # type: ignore[union-attr]
                                         tenant, 3 if args.subject == "3-level" else 1)
        smoke(host, port, key, subject)
        runner = Runner(args, host, port, key, subject, server_root)
        phases: list[dict[str, Any]] = []
        workdir = Path(tempfile.mkdtemp(prefix="cycles-load-"))
        try:
            for conc in args.concurrency_list:
                for workload in args.workload_list:
                    if workload == "bare":
                        if args.bare_client in ("python", "both"):
                            phases.append(runner.python_phase("bare", conc))
                            _progress(phases[-1])
                        if args.bare_client in ("wrk", "both"):
                            phases.append(runner.wrk_phase(conc, workdir))
                            _progress(phases[-1])
                    else:
                        phases.append(runner.python_phase(workload, conc))
                        _progress(phases[-1])
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        results = {
            "machine": machine(),
            "config": {
                "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
                "server_command": " ".join(server.command) if server else base,
                "workers": None if args.base_url else args.workers, "workers_label": workers_label,
                "subject": subject, "subject_levels": len(scopes), "budget_scopes": scopes,
                "duration_s": args.duration, "warmup_s": args.warmup, "client_procs": args.client_procs,
                "uvloop_client": not args.no_uvloop, "bare_client": args.bare_client,
                "connect_stagger_ms": args.connect_stagger_ms,
                "wrk": args.wrk_path if args.bare_client in ("wrk", "both") else None,
                "nice": os.getpriority(os.PRIO_PROCESS, 0),
            },
            "machine_busy_before_pct": idle_before,
            "phases": phases,
            "total_errors": sum(p["errors"] for p in phases),
            "elapsed_s": time.monotonic() - t_start,
        }
        print()
        print(markdown(results))
        print(f"total errors: {results['total_errors']}; elapsed {results['elapsed_s']:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        if results["total_errors"]:
            for p in phases:
                for s in p.get("error_samples", []):
                    print(f"  error ({p['workload']}, c={p['concurrency']}): {s}", file=sys.stderr)
            return 1
        return 0
    except Timeout as exc:
        print(str(exc), file=sys.stderr)
        return 3
    except (RuntimeError, OSError) as exc:  # server start, provisioning or the smoke cycle failed
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.alarm(0)
        if restore_autogroup is not None:
            _write_autogroup(restore_autogroup)
        if runner is not None:
            runner.close()
        if server is not None:
            if server.proc is not None and server.proc.poll() is not None:
                print(server.log()[-3000:], file=sys.stderr)
            server.stop()


def _progress(row: dict[str, Any]) -> None:
    if row["workload"] == "bare":
        msg = f"{row['rps']:,.0f} req/s p50 {row['p50_ms']:.2f} ms"
    elif row["workload"] == "cycle":
        msg = (f"{row['cycles_per_s']:,.0f} cycles/s, reserve p50 {row['reserve_p50_ms']:.2f} ms, "
               f"cycle p99 {row['cycle_p99_ms']:.2f} ms")
    else:
        msg = f"{row['reserves_per_s']:,.0f} reserves/s, p50 {row['reserve_p50_ms']:.2f} ms"
    print(f"  {row['workload']:<7} {row['client']:<9} c={row['concurrency']:<3} {msg}, errors {row['errors']}, "
          f"CPU server {cpu(row.get('server_cpu_pct'))} client {cpu(row.get('client_cpu_pct'))} "
          f"other {cpu(row.get('other_cpu_pct'))}, conns/worker {_split(row.get('conns_per_server_process'))}",
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
