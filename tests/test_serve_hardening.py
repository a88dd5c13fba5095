"""`cycles serve` hardening (issue 14): connection limits, a weak operator key, workers that die with their
parent, private store files. Each test runs its own short-lived server on the embedded store."""

from __future__ import annotations

import http.client
import os
import resource
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from support import WEBHOOK_KEY, cycles_bin, free_port

ADMIN = "strong-test-admin-key-0123456789"
LIMITS = ["--max-connections", "20", "--timeout-keep-alive", "1", "--timeout-header", "1", "--timeout-body", "1",
          "--max-header-bytes", "8192", "--max-headers", "20"]


def _serve(tmp: Path, *args: str, env: dict[str, str] | None = None, preexec=None, port: int | None = None,
           ) -> tuple[subprocess.Popen, str, Path]:
    port = port or free_port()
    full_env = {**os.environ, "CYCLES_WEBHOOK_SECRET_KEY": WEBHOOK_KEY, "CYCLES_EMBEDDED_WORKER": "0", **(env or {})}
    full_env.setdefault("CYCLES_ADMIN_API_KEY", ADMIN)
    log = tmp / f"serve-{port}.log"
    proc = subprocess.Popen([cycles_bin(), "serve", "--port", str(port), "--log-level", "warning", *args],
                            env=full_env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), preexec_fn=preexec)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()}")
        try:
            if httpx.get(base + "/actuator/health", timeout=1).status_code == 200:
                return proc, base, log
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start: " + log.read_text())


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    tmp = tmp_path_factory.mktemp("limited")
    proc, base, _ = _serve(tmp, "--data-dir", str(tmp / "data"), *LIMITS)
    yield base, int(base.rsplit(":", 1)[1])
    _stop(proc)


def _conn(port: int, timeout: float = 5) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.settimeout(timeout)
    return s


def _read_all(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return out


# ---- item 2: connection limits ----

def test_huge_header_is_refused_before_it_is_buffered(limited: tuple[str, int]) -> None:
    _, port = limited
    s = _conn(port)
    s.sendall(b"GET /actuator/health HTTP/1.1\r\nHost: x\r\nX-Big: ")
    sent, refused = 0, False
    try:
        while sent < 8 * 1024 * 1024:
            s.sendall(b"a" * 16384)
            sent += 16384
            if sent > 64 * 1024:
                s.settimeout(0.2)
                try:
                    if s.recv(1, socket.MSG_PEEK):
                        refused = True
                        break
                except socket.timeout:
                    pass
    except (BrokenPipeError, ConnectionResetError):
        refused = True
    assert refused and sent < 1024 * 1024, f"8 MB header still being accepted after {sent} bytes"
    s.settimeout(5)
    assert _read_all(s).startswith(b"HTTP/1.1 431 ")


def test_too_many_headers_get_431(limited: tuple[str, int]) -> None:
    _, port = limited
    s = _conn(port)
    s.sendall(b"GET /actuator/health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(21)) + b"\r\n")
    assert _read_all(s).startswith(b"HTTP/1.1 431 ")
    s = _conn(port)  # 20,000 headers: refused by the byte cap on the way
    try:
        s.sendall(b"GET /actuator/health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(20000)) + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert _read_all(s).startswith(b"HTTP/1.1 431 ")
    # at the limit it is served
    s = _conn(port)
    s.sendall(b"GET /actuator/health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(19)) + b"\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 200 ")


def test_idle_half_sent_and_slow_connections_are_closed(limited: tuple[str, int]) -> None:
    _, port = limited
    idle, half_head, half_body = _conn(port), _conn(port), _conn(port)
    started = time.monotonic()
    half_head.sendall(b"GET /actuator/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    # authenticated, so the route is waiting for the body when the timeout closes the connection
    half_body.sendall(b"POST /v1/admin/tenants HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"X-Admin-API-Key: " + ADMIN.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"a\":")
    assert _read_all(idle) == b""  # closed, nothing said: no request was in progress
    assert _read_all(half_head).startswith(b"HTTP/1.1 408 ")
    assert _read_all(half_body) == b""
    assert time.monotonic() - started < 4, "timeouts of 1 s took too long"
    # a keep-alive connection is closed after its idle timeout, not before serving more requests
    with httpx.Client(base_url=limited[0]) as c:
        assert c.get("/actuator/health").status_code == 200
        assert c.get("/actuator/health").status_code == 200


def test_default_idle_timeout_outlives_client_pools(tmp_path: Path) -> None:
    """httpx (the published SDK's client) and Node's fetch drop pooled connections after 5 s idle; a server that
    closed at the same 5 s raced them, and a request sent on a connection being closed failed."""
    proc, base, _ = _serve(tmp_path, "--data-dir", str(tmp_path / "data"))
    conn = http.client.HTTPConnection("127.0.0.1", int(base.rsplit(":", 1)[1]), timeout=10)
    try:
        conn.request("GET", "/actuator/health")
        first = conn.getresponse()
        assert first.status == 200 and first.read()
        sock = conn.sock
        time.sleep(6)  # past a 5 s pool expiry: the client may still pick this connection just before it
        conn.request("GET", "/actuator/health")  # a closed connection fails here or in getresponse
        second = conn.getresponse()
        assert second.status == 200 and second.read()
        assert conn.sock is sock, "the connection was not reused"
    finally:
        conn.close()
        _stop(proc)


def test_connection_cap_evicts_idle_then_refuses(limited: tuple[str, int]) -> None:
    base, port = limited
    idle = [_conn(port) for _ in range(30)]  # over the cap of 20: idle ones give way to newer ones
    assert httpx.get(base + "/actuator/health", timeout=5).status_code == 200
    for s in idle:
        s.close()
    time.sleep(0.2)
    busy = [_conn(port) for _ in range(20)]
    for s in busy:  # requests in progress are not evicted
        s.sendall(b"GET /actuator/health HTTP/1.1\r\nHost: x\r\n")
    time.sleep(0.1)
    s = _conn(port)
    assert _read_all(s).startswith(b"HTTP/1.1 503 ")
    for s in busy:
        s.close()
    time.sleep(0.2)
    assert httpx.get(base + "/actuator/health", timeout=5).status_code == 200


def test_idle_connections_cannot_exhaust_descriptors(tmp_path: Path) -> None:
    """With a 400-descriptor limit, 500 idle connections used to make every request fail for 20 s."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 700:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2048), hard))

    def limit_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400))

    proc, base, _ = _serve(tmp_path, "--data-dir", str(tmp_path / "data"), preexec=limit_fds)
    port = int(base.rsplit(":", 1)[1])
    conns: list[socket.socket] = []
    try:
        for _ in range(500):
            try:
                conns.append(_conn(port))
            except OSError:
                pass
        started = time.monotonic()
        assert httpx.get(base + "/actuator/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 2
    finally:
        for s in conns:
            s.close()
        _stop(proc)


def test_bad_limits_are_one_clear_line(tmp_path: Path) -> None:
    out = subprocess.run([cycles_bin(), "serve", "--data-dir", str(tmp_path), "--timeout-header", "0"],
                         capture_output=True, text=True, timeout=30,
                         env={**os.environ, "CYCLES_WEBHOOK_SECRET_KEY": WEBHOOK_KEY})
    assert out.returncode == 2
    assert out.stderr.strip() == "error: timeout-header must be more than 0 seconds"


# ---- item 5: weak operator key ----

@pytest.mark.parametrize("key,weak", [
    ("demo-admin-key", True), ("changeme", True), ("short-key-123", True), ("a" * 40, True),
    ("test-admin-key-0123456789", False), ("cyc_admin_" + "Ab3" * 10, False),
    ("strong-key-number-one-0123456789,demo-admin-key", True),
])
def test_weak_key_rule(key: str, weak: bool) -> None:
    from cycles.server.keystrength import weak_reasons

    reasons = weak_reasons(key)
    assert bool(reasons) is weak
    assert not any(k in r for r in reasons for k in key.split(",")), "the key itself must never be printed"


def test_weak_admin_key_warns_at_start_and_in_health_but_works(tmp_path: Path) -> None:
    proc, base, log = _serve(tmp_path, "--data-dir", str(tmp_path / "data"), env={"CYCLES_ADMIN_API_KEY": "demo-admin-key"})
    try:
        health = httpx.get(base + "/actuator/health").json()
        assert health["status"] == "UP"
        assert any("weak admin key" in w for w in health["details"]["warnings"]), health
        r = httpx.post(base + "/v1/admin/tenants", headers={"X-Admin-API-Key": "demo-admin-key"},
                       json={"tenant_id": "demo-tenant", "name": "d"})
        assert r.status_code == 201, r.text
    finally:
        _stop(proc)
    err = log.read_text()
    assert "WARNING: weak operator key" in err and "well-known" in err


def test_strong_admin_key_gives_a_plain_health(tmp_path: Path) -> None:
    proc, base, log = _serve(tmp_path, "--data-dir", str(tmp_path / "data"))
    try:
        assert httpx.get(base + "/actuator/health").json() == {"status": "UP"}
    finally:
        _stop(proc)
    assert "weak" not in log.read_text()


# ---- item 6: workers die with their parent ----

def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_kill_9_of_the_parent_stops_its_workers(tmp_path: Path) -> None:
    proc, base, _ = _serve(tmp_path, "--data-dir", str(tmp_path / "data"), "--workers", "2")
    port = int(base.rsplit(":", 1)[1])
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            workers = [p for p in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
            if len(workers) >= 2:
                break
            time.sleep(0.1)
        assert len(workers) >= 2, _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers), "workers outlived their parent"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        for p in workers:  # orphans of a failed run must not keep serving
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        _stop(proc)


# ---- item 8: private store files ----

def test_data_dir_and_database_files_are_private(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"
    proc, base, _ = _serve(tmp_path, "--data-dir", str(data), preexec=lambda: os.umask(0o022))
    try:
        r = httpx.post(base + "/v1/admin/tenants", headers={"X-Admin-API-Key": ADMIN},
                       json={"tenant_id": "perm-tenant", "name": "p"})
        assert r.status_code == 201, r.text
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [data, *data.iterdir()]}
    finally:
        _stop(proc)
    assert modes["data"] == 0o700, modes
    for name in ("cycles.db", "cycles.db-wal", "cycles.db-shm"):
        assert modes[name] == 0o600, modes


def test_existing_database_mode_is_left_alone(tmp_path: Path) -> None:
    from cycles.store import open_store

    db = tmp_path / "cycles.db"
    db.touch(mode=0o640)
    os.chmod(db, 0o640)
    open_store(f"sqlite:///{db}")
    assert stat.S_IMODE(db.stat().st_mode) == 0o640
