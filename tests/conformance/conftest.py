"""Fixtures of the black-box conformance suite: the published runcycles SDK drives our server.

* `sdk_python` (session): `.venv-conformance/bin/python` with runcycles==0.5.3 installed in its own
  virtualenv, so the SDK is never importable from our package's environment (and vice versa).
* `proxy`: a recording reverse proxy in front of the session server. At teardown every response it
  recorded is checked with the SDK's own validators (drivers/validate.py); any problem fails the test.
* `sdk`: runs a driver script from drivers/ with the conformance python, pointed at the proxy, with a
  fresh tenant and a private journal dir, and returns the JSON the driver printed.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from published_sdk import SDK_VERSION, ensure_runcycles
from support import Server, Tenant

from .proxy import RecordingProxy

DRIVERS = Path(__file__).resolve().parent / "drivers"
RESULT_MARKER = "@@CONFORMANCE-RESULT@@ "


@pytest.fixture(scope="session")
def sdk_python() -> str:
    """The conformance venv's python with runcycles==0.5.3 (created on first use)."""
    return ensure_runcycles()


def run_driver(python: str, script: str, params: dict[str, Any], workdir: Path, timeout: float = 120) -> dict[str, Any]:
    """Run drivers/<script>.py with the conformance python; return the JSON object it printed."""
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),  # the SDK's default journal dir lives under HOME; keep it inside tmp
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "CONFORMANCE_PARAMS": json.dumps(params),
        "CONFORMANCE_LOG_LEVEL": os.environ.get("CONFORMANCE_LOG_LEVEL", "WARNING"),
    }
    proc = subprocess.run([python, str(DRIVERS / f"{script}.py")], env=env, cwd=str(workdir),
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or len(lines) != 1:
        pytest.fail(f"driver {script} exited {proc.returncode} with {len(lines)} result lines\n"
                    f"params={params}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}")
    result = json.loads(lines[0][len(RESULT_MARKER):])
    result["_stderr"] = proc.stderr
    return result


def validate_exchanges(python: str, exchanges: list[dict[str, Any]], workdir: Path,
                       no_trace_in_errors: bool = False) -> dict[str, Any]:
    """Run the SDK's validators (drivers/validate.py) over recorded exchanges."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "exchanges.json"
    path.write_text(json.dumps(exchanges))
    return run_driver(python, "validate", {"exchanges_file": str(path), "no_trace_in_errors": no_trace_in_errors},
                      workdir)


@pytest.fixture
def proxy(server: Server, sdk_python: str, tmp_path: Path) -> Iterator[RecordingProxy]:
    rec = RecordingProxy(server.base_url).start()
    try:
        yield rec
    finally:
        rec.stop()
    exchanges = rec.dump()
    if exchanges:
        report = validate_exchanges(sdk_python, exchanges, tmp_path / "validate",
                                    no_trace_in_errors=getattr(server, "no_trace_in_errors", False))
        assert report["checked"] == len(exchanges)
        assert not report["problems"], (
            "responses rejected by runcycles 0.5.3's validators:\n" + json.dumps(report["problems"], indent=1))


@dataclass
class Sdk:
    """Runs drivers against the proxy with one tenant's credentials and a private journal dir."""

    python: str
    proxy: RecordingProxy
    tenant: Tenant
    tmp: Path
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def journal_dir(self) -> Path:
        return self.tmp / "journal"

    def params(self, **extra: Any) -> dict[str, Any]:
        return {"base_url": self.proxy.base_url, "api_key": self.tenant.key, "tenant": self.tenant.tenant_id,
                "journal_dir": str(self.journal_dir), **extra}

    def run(self, script: str, *, timeout: float = 120, **extra: Any) -> dict[str, Any]:
        result = run_driver(self.python, script, self.params(**extra), self.tmp / f"run-{len(self.runs)}", timeout)
        self.runs.append(result)
        return result


@pytest.fixture
def sdk(sdk_python: str, proxy: RecordingProxy, tenant: Tenant, tmp_path: Path) -> Sdk:
    return Sdk(sdk_python, proxy, tenant, tmp_path)
