"""Issue 15: every startup and connection failure is one clear line with a distinct exit code, the
same mistake answers the same way, and a key of the wrong kind says which kind is needed. Real
subprocesses of the installed `cycles` command; real SQLite files, a real (or closed) Redis port."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from support import Server, cycles_bin, free_port, new_tenant

KEY = "dGVzdC13ZWJob29rLXNlY3JldC1rZXktMzItYnl0ZXM="


def cycles(*args: str, tmp: Path, timeout: float = 30, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CYCLES_")}
    clean.update(HOME=str(tmp), CYCLES_DATA_DIR=str(tmp / "data"), COLUMNS="80", **env)
    return subprocess.run([cycles_bin(), *args], capture_output=True, text=True, timeout=timeout, env=clean, cwd=tmp)


def one_line(run: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    err = run.stderr.strip()
    assert run.returncode == code, (run.returncode, run.stdout, run.stderr)
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, run.stderr
    for needle in needles:
        assert needle in err, err
    return err


def test_redis_store_without_webhook_key_says_how_to_make_one(tmp_path: Path) -> None:
    err = one_line(cycles("serve", "--store", "redis://127.0.0.1:6379/0", tmp=tmp_path), 3,
                   "CYCLES_WEBHOOK_SECRET_KEY", "make one with: export CYCLES_WEBHOOK_SECRET_KEY=$(python3")
    made = subprocess.run(["bash", "-c", err.split("make one with: ")[1].split(" (or set")[0] +
                           "; printf %s \"$CYCLES_WEBHOOK_SECRET_KEY\" | base64 -d | wc -c"],
                          capture_output=True, text=True)
    assert made.stdout.strip() == "32"  # the printed command really makes a valid key


def test_malformed_webhook_key(tmp_path: Path) -> None:
    one_line(cycles("serve", "--store", "redis://127.0.0.1:6379/0", tmp=tmp_path, CYCLES_WEBHOOK_SECRET_KEY="short"),
             3, "32 bytes", "make a new one")


@pytest.mark.parametrize("url, needle", [
    ("sqlite://relative.db", "sqlite:///relative.db (absolute) or sqlite:relative.db"),
    ("postgres://x", "unsupported store"),
    ("sqlite://", "no database file"),
])
def test_bad_store_urls_are_usage_errors_before_any_key_question(tmp_path: Path, url: str, needle: str) -> None:
    one_line(cycles("serve", "--store", url, tmp=tmp_path), 2, needle)
    one_line(cycles("serve", "--store", url, tmp=tmp_path, CYCLES_WEBHOOK_SECRET_KEY=KEY), 2, needle)
    one_line(cycles("admin", "--store", url, "tenants", "list", tmp=tmp_path), 2, needle)


def test_data_dir_problems(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    one_line(cycles("serve", "--data-dir", str(tmp_path / "afile" / "sub"), tmp=tmp_path), 4,
             "cannot create data directory", "--data-dir")
    one_line(cycles("serve", "--data-dir", str(tmp_path / "afile"), tmp=tmp_path), 4, "is a file")
    one_line(cycles("serve", "--data-dir", "/sys/cycles-not-writable", tmp=tmp_path), 4, "cannot create")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "cycles.db").write_bytes(b"not a database " * 100)
    one_line(cycles("serve", "--data-dir", str(garbage), "--port", str(free_port()), tmp=tmp_path), 4,
             "is not a Cycles SQLite database")
    blocked = tmp_path / "blocked"
    (blocked / "webhook-secret.key").mkdir(parents=True)  # the key file cannot be written or read
    one_line(cycles("serve", "--data-dir", str(blocked), tmp=tmp_path), 4, "webhook-secret.key")


def test_redis_not_running(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    one_line(cycles("serve", "--store", url, tmp=tmp_path, CYCLES_WEBHOOK_SECRET_KEY=KEY), 5,
             "cannot connect to Redis", "start redis-server")
    one_line(cycles("worker", "--store", url, tmp=tmp_path, CYCLES_WEBHOOK_SECRET_KEY=KEY), 5, "cannot connect to Redis")
    err = one_line(cycles("admin", "--store", url, "tenants", "list", tmp=tmp_path), 5, "cannot connect to Redis")
    assert "idempotency" not in err
    debug = cycles("--debug", "serve", "--store", url, tmp=tmp_path, CYCLES_WEBHOOK_SECRET_KEY=KEY)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_server_not_running(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    one_line(cycles("admin", "--url", url, "--admin-key", "k", "tenants", "list", tmp=tmp_path), 5,
             "cannot reach", "cycles serve")
    one_line(cycles("balance", "--url", url, "--api-key", "k", "--tenant", "t", tmp=tmp_path), 5, "cannot reach")


def test_port_in_use_shows_no_key_and_no_serving_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        run = cycles("serve", "--port", str(port), tmp=tmp_path)
    one_line(run, 6, f"cannot listen on 127.0.0.1:{port}", "--port")
    assert "shown only this once" not in run.stdout and "serving" not in run.stdout


def test_missing_tenant_answers_400_for_keys_and_budgets(server: Server) -> None:
    with server.admin() as c:
        key = c.post("/v1/admin/api-keys", json={"tenant_id": "no-such-tenant-15", "name": "k"})
        budget = c.post("/v1/admin/budgets", json={"tenant_id": "no-such-tenant-15", "scope": "tenant:no-such-tenant-15",
                                                   "unit": "USD_MICROCENTS",
                                                   "allocated": {"unit": "USD_MICROCENTS", "amount": 1}})
    assert key.status_code == budget.status_code == 400
    assert key.json()["error"] == budget.json()["error"] == "INVALID_REQUEST"
    assert key.json()["message"] == budget.json()["message"]
    assert "cycles admin tenants create no-such-tenant-15" in key.json()["message"]


def test_key_of_the_wrong_kind_gets_a_hint(server: Server, tmp_path: Path) -> None:
    tenant = new_tenant(server)
    err = one_line(cycles("admin", "--url", server.base_url, "--admin-key", tenant.key, "tenants", "list",
                          tmp=tmp_path), 1, "UNAUTHORIZED", "this is a tenant API key")
    assert "CYCLES_ADMIN_API_KEY" in err
    with server.admin() as c:
        op = c.post("/v1/admin/operator-keys", json={"name": f"op-{tenant.tenant_id}"})
    assert op.status_code == 201, op.text
    one_line(cycles("reservations", "--url", server.base_url, "--api-key", server.admin_key if
                    server.admin_key.startswith("cyc_admin_") else "cyc_admin_" + server.admin_key,
                    "--tenant", tenant.tenant_id, tmp=tmp_path), 1, "this is an operator key")
    one_line(cycles("balance", "--url", server.base_url, "--api-key", op.json()["key_secret"], "--tenant",
                    tenant.tenant_id, tmp=tmp_path), 1, "this is an operator key")


def test_deprecated_names_are_read_with_a_note(server: Server, tmp_path: Path) -> None:
    run = cycles("admin", "tenants", "list", "--limit", "1", tmp=tmp_path, CYCLES_URL=server.base_url,
                 CYCLES_ADMIN_API_KEY=server.admin_key)
    assert run.returncode == 0, run.stderr
    assert "CYCLES_URL is deprecated; set CYCLES_BASE_URL" in run.stderr
    run = cycles("admin", "tenants", "list", "--limit", "1", tmp=tmp_path, CYCLES_BASE_URL=server.base_url,
                 CYCLES_ADMIN_API_KEY=server.admin_key)
    assert run.returncode == 0 and "deprecated" not in run.stderr
