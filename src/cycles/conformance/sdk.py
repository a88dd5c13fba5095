"""`cycles conformance sdk`: the client-recovery profile run against our Python SDK, and its evidence report
(client-recovery/report.schema.json). The claimed level follows from the results: durable when every
scenario passed, core when every core and boundary scenario passed."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import httpx
import yaml
from jsonschema import Draft202012Validator

from . import specdocs
from .faultproxy import FaultProxy
from .sdk_scenarios import SCENARIOS, Env

CATALOG = "client-recovery/scenarios.yaml"
SCHEMA = "client-recovery/report.schema.json"
LEVELS = {"core": ("core", "boundary"), "durable": ("core", "durable", "boundary")}


def catalog() -> dict[str, Any]:
    return yaml.safe_load(specdocs.spec_text(CATALOG))


def catalog_sha256() -> str:
    return hashlib.sha256(specdocs.spec_text(CATALOG).replace("\r\n", "\n").encode("utf-8")).hexdigest()


class _LocalServer:
    """A private `cycles serve` on a temporary SQLite store, for when no --server is given."""

    def __init__(self) -> None:
        import socket

        self.dir = Path(tempfile.mkdtemp(prefix="cycles-sdk-conformance-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.admin_key = "sdk-conformance-" + secrets.token_hex(16)
        env = dict(os.environ, CYCLES_ADMIN_API_KEY=self.admin_key, CYCLES_DATA_DIR=str(self.dir))
        cmd = [sys.executable, "-c", "from cycles.cli import main; main()", "serve", "--port", str(port), "--store",
               f"sqlite:///{self.dir / 'cycles.db'}", "--sweep-interval-ms", "100", "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.dir / "server.log", "wb"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cycles serve exited: {(self.dir / 'server.log').read_text()[-500:]}")
            try:
                if httpx.get(self.url + "/actuator/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("cycles serve did not become healthy")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_sdk(server: str | None, admin_key: str | None, implementation_commit: str = "unknown",
            evidence_url: str | None = None, *, only: list[str] | None = None,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    if server and not admin_key:
        raise RuntimeError("--server needs --admin-key (each scenario provisions its own tenant)")
    local = None if server else _LocalServer()
    base, key = (server, admin_key) if server else (local.url, local.admin_key)  # type: ignore[union-attr]
    proxy = FaultProxy(base).start()
    work = Path(tempfile.mkdtemp(prefix="cycles-sdk-journal-"))
    results = []
    try:
        for entry in catalog()["scenarios"]:
            sid = entry["id"]
            if only and sid not in only:
                continue
            if progress:
                progress(sid)
            fn = SCENARIOS.get(sid)
            result: dict[str, Any] = {"id": sid, "level": entry["level"], "name": entry["name"]}
            if fn is None:
                result.update(passed=False, native_tests=[], diagnostic="no runner for this scenario in this kit")
            else:
                result["native_tests"] = [f"cycles.conformance.sdk_scenarios:{fn.__name__}"]
                try:
                    problems = fn(Env(base, key, proxy, work / sid).setup())  # type: ignore[arg-type]
                except Exception as e:  # noqa: BLE001 (a scenario that breaks is a failed scenario, reported)
                    problems = [f"{type(e).__name__}: {e}",
                                traceback.format_exc(limit=3).strip().splitlines()[-1]]
                result["passed"] = not problems
                if problems:
                    result["diagnostic"] = "; ".join(problems)[:2000]
            results.append(result)
    finally:
        proxy.stop()
        shutil.rmtree(work, ignore_errors=True)
        if local is not None:
            local.stop()
    return build_report(results, implementation_commit, evidence_url)


def claimed_level(results: list[dict[str, Any]]) -> str:
    """durable when every scenario of the catalog ran and passed, else core (a failing core claim stays
    visible as failed: see claim_holds)."""
    ran = {r["id"] for r in results if r["passed"]}
    if {s["id"] for s in catalog()["scenarios"]} <= ran:
        return "durable"
    return "core"


def build_report(results: list[dict[str, Any]], implementation_commit: str,
                 evidence_url: str | None) -> dict[str, Any]:
    from .. import __version__

    claim = claimed_level(results)
    report: dict[str, Any] = {
        "$schema": "https://raw.githubusercontent.com/runcycles/cycles-protocol/main/client-recovery/report.schema.json",
        "schema_version": "1.0",
        "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "profile": {"name": "cycles-sdk-recovery", "version": str(catalog()["version"]),
                    "commit": f"packaged-copy-sha256-{catalog_sha256()[:12]}", "catalog_sha256": catalog_sha256()},
        "claim": claim,
        "implementation": {"id": "cycles (Python SDK, cycles.client)", "commit": implementation_commit or "unknown",
                           "version": __version__},
        "summary": {"total": len(results), "passed": sum(r["passed"] for r in results),
                    "failed": sum(not r["passed"] for r in results)},
        "scenarios": results,
    }
    if evidence_url:
        report["evidence_url"] = evidence_url
    errors = schema_errors(report)
    if errors:
        raise RuntimeError(f"the report does not validate against {SCHEMA}: {errors[:3]}")
    return report


def schema_errors(report: dict[str, Any]) -> list[str]:
    import json

    schema = json.loads(specdocs.spec_text(SCHEMA))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in Draft202012Validator(schema).iter_errors(report)]


def claim_holds(report: dict[str, Any], *, complete: bool = False) -> bool:
    """Every scenario of the claimed level that ran passed (`complete`: and every one of them ran)."""
    wanted = LEVELS[report["claim"]]
    if complete:
        ran = {s["id"] for s in report["scenarios"]}
        if any(s["level"] in wanted and s["id"] not in ran for s in catalog()["scenarios"]):
            return False
    return all(s["passed"] for s in report["scenarios"] if s["level"] in wanted)
