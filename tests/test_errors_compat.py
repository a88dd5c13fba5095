"""trace_id in error bodies: kept for spec readers, left out for the published runcycles SDK by default."""

from __future__ import annotations

import pytest
from starlette.datastructures import Headers

from cycles.server.errors_compat import parse_setting, trace_in_error_body

SDK = {"user-agent": "python-httpx/0.28.1", "x-cycles-api-key": "k", "accept": "*/*"}


@pytest.mark.parametrize("headers,configured,expected", [
    (SDK, None, False),  # runcycles 0.5.3 exactly: no trace_id, its ErrorResponse parses
    ({**SDK, "user-agent": "python-httpx/0.25.0"}, None, False),
    ({**SDK, "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}, None, True),  # sends trace context
    ({**SDK, "x-cycles-trace-id": "a" * 32}, None, True),
    ({**SDK, "user-agent": "curl/8.5.0"}, None, True),
    ({**SDK, "user-agent": "cycles-python-sdk"}, None, True),  # our own SDK
    ({**SDK, "user-agent": "node"}, None, True),  # the TypeScript client / MCP server
    ({**SDK, "user-agent": "Python-httpx/0.28.1"}, None, True),  # not what the SDK sends
    ({"accept": "*/*"}, None, True),  # no agent at all
    (SDK, True, True),  # --error-trace-id: always
    ({"user-agent": "curl/8.5.0"}, False, False),  # --no-error-trace-id: never
])
def test_trace_in_error_body(headers: dict[str, str], configured: bool | None, expected: bool) -> None:
    assert trace_in_error_body(headers, configured) is expected
    raw = Headers(headers={k.title(): v for k, v in headers.items()})  # what a Starlette request gives
    assert trace_in_error_body(raw, configured) is expected


@pytest.mark.parametrize("raw,expected", [(None, None), ("", None), ("auto", None), (" AUTO ", None), ("1", True),
                                          ("true", True), ("on", True), ("0", False), ("no", False), ("off", False)])
def test_setting(raw: str | None, expected: bool | None) -> None:
    assert parse_setting(raw) is expected


def test_bad_setting_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="must be 1, 0 or auto, not 'maybe'"):
        parse_setting("maybe")


def test_cli_refuses_a_bad_setting_in_one_line(tmp_path) -> None:
    import os
    import subprocess

    from support import WEBHOOK_KEY, cycles_bin

    out = subprocess.run([cycles_bin(), "serve", "--data-dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=30, env={**os.environ, "CYCLES_WEBHOOK_SECRET_KEY": WEBHOOK_KEY,
                                          "CYCLES_ERROR_TRACE_ID": "maybe"})
    assert out.returncode == 2
    assert out.stderr.strip() == "error: CYCLES_ERROR_TRACE_ID must be 1, 0 or auto, not 'maybe'"
