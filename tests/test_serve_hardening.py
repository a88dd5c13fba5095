"""`cycles serve` hardening (issue 14): connection limits, a weak operator key, workers that die with their
parent, private store files. Each test runs its own short-lived server on the embedded store."""

from __future__ import annotations

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

LIMITS = ["--max-connections", "20", "--timeout-keep-alive", "1", "--timeout-header", "1", "--timeout-body", "1",
          "--max-header-bytes", "8192", "--max-headers", "20"]


def _serve(tmp: Path, *args: str, env: dict[str, str] | None = None, preexec=None, port: int | None = None,
           ) -> tuple[subprocess.Popen, str, Path]:
    port = port or free_port()
    full_env = {**os.environ, "CYCLES_WEBHOOK_SECRET_KEY": WEBHOOK_KEY, "CYCLES_EMBEDDED_WORKER": "0", **(env or {})}
    full_env.setdefault("CYCLES_ADMIN_API_KEY", "x" * 8 + "-strong-test-admin-key-0123456789")
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


# ---- item 8: private store files ----

def test_data_dir_and_database_files_are_private(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"
    proc, base, _ = _serve(tmp_path, "--data-dir", str(data), preexec=lambda: os.umask(0o022))
    try:
        r = httpx.post(base + "/v1/admin/tenants", headers={"X-Admin-API-Key": "x" * 8 + "-strong-test-admin-key-0123456789"},
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
