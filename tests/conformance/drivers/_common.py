"""Shared plumbing for the conformance drivers.

Drivers run under the conformance virtualenv's python (runcycles==0.5.3, never our package). They read
their parameters from the CONFORMANCE_PARAMS environment variable (JSON), talk to the recording proxy
in front of our server, and print exactly one result line: RESULT_MARKER followed by a JSON object.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

RESULT_MARKER = "@@CONFORMANCE-RESULT@@ "

# Our own package must not be importable here: the driver exercises the *published* client only.
if importlib.util.find_spec("cycles") is not None:  # pragma: no cover - environment guard
    raise SystemExit("the Cycles server package is importable from the conformance venv; refusing to run")

import runcycles  # noqa: E402
from runcycles import CyclesConfig  # noqa: E402

if runcycles.__version__ != "0.5.3":  # pragma: no cover - environment guard
    raise SystemExit(f"expected runcycles 0.5.3, found {runcycles.__version__}")

logging.basicConfig(stream=sys.stderr, level=os.environ.get("CONFORMANCE_LOG_LEVEL", "WARNING"),
                    format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")


def params() -> dict[str, Any]:
    return json.loads(os.environ["CONFORMANCE_PARAMS"])


def config(p: dict[str, Any], **overrides: Any) -> CyclesConfig:
    """The per-test client config of clients.md §8.1: private journal dir, short retries, no exit flush."""
    kw: dict[str, Any] = dict(
        base_url=p["base_url"], api_key=p["api_key"], tenant=p["tenant"], journal_dir=p["journal_dir"],
        retry_initial_delay=0.05, retry_max_attempts=3, retry_flush_timeout=0,
    )
    kw.update(overrides)
    return CyclesConfig(**kw)


def exc_info(exc: BaseException | None) -> dict[str, Any] | None:
    if exc is None:
        return None
    return {
        "type": type(exc).__name__,
        "mro": [c.__name__ for c in type(exc).__mro__],
        "message": str(exc),
        "status": getattr(exc, "status", None),
        "error_code": getattr(exc, "error_code", None),
        "reason_code": getattr(exc, "reason_code", None),
        "request_id": getattr(exc, "request_id", None),
    }


def response_info(resp: Any) -> dict[str, Any]:
    """A CyclesResponse as plain JSON."""
    return {"status": resp.status, "body": resp.body, "error_message": resp.error_message,
            "headers": dict(resp.headers), "is_success": resp.is_success}


def journal_files(p: dict[str, Any]) -> list[str]:
    root = Path(p["journal_dir"])
    if not root.exists():
        return []
    return sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file())


def flush_sync_engines(timeout: float) -> None:
    """Wait (bounded) for the background commit/event retries of every sync retry engine."""
    from runcycles import retry

    deadline = time.monotonic() + timeout
    for engine in list(retry._live_engines):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        engine.flush(remaining)


def wait_journal_empty(p: dict[str, Any], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    files = journal_files(p)
    while files and time.monotonic() < deadline:
        time.sleep(0.05)
        files = journal_files(p)
    return files


def emit(result: dict[str, Any]) -> None:
    sys.stdout.write(RESULT_MARKER + json.dumps(result, default=str) + "\n")
    sys.stdout.flush()
