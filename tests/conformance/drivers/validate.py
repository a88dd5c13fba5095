"""Check recorded responses with runcycles 0.5.3's own success validators and error model.

Input: CONFORMANCE_PARAMS = {"exchanges_file": <json list of proxy exchanges>}.
Output: {"checked": n, "kinds": {...}, "problems": [...], "error_bodies_with_trace_id": n}.

Checks per response:
  * create  -> exactly 200 and runcycles.lifecycle._schema_valid_create(...) is not None
  * extend  -> runcycles.lifecycle._schema_valid_extend(...) is not None
  * commit  -> runcycles.retry._is_schema_valid_commit_success(...)
  * events  -> runcycles.retry._is_schema_valid_event_success(...) (exactly 201)
  * release / decide / balances -> 200 and the SDK's strict response model
  * every 4xx/5xx -> runcycles ErrorResponse.model_validate(body), a known ErrorCode, request_id equal to
    X-Request-Id. The spec (CORRELATION AND TRACING) makes `trace_id` a MUST on error bodies while the
    SDK's ErrorResponse forbids unknown keys; `trace_id` is therefore checked on its own (32 lowercase
    hex, equal to X-Cycles-Trace-Id) and removed before model_validate. No other extra key is tolerated.
  * every body -> no JSON null anywhere, no float anywhere outside caller-supplied metadata, and
    integer-typed fields (amount, *_ms, token counts, caps) are real ints.
  * no 5xx at all, X-Request-Id on every response, JSON content type.
"""

from __future__ import annotations

import json
import re
from typing import Any

from _common import emit, params

from runcycles.lifecycle import _schema_valid_create, _schema_valid_extend
from runcycles.models import BalanceResponse, DecisionResponse, ErrorCode, ErrorResponse, ReleaseResponse
from runcycles.response import CyclesResponse
from runcycles.retry import _is_schema_valid_commit_success, _is_schema_valid_event_success

TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
INT_KEYS = {"amount", "max_tokens", "max_steps_remaining", "tokens_input", "tokens_output"}
FREEFORM_KEYS = {"metadata", "committed_metadata", "custom"}  # echoes of caller-supplied data
ERROR_KEYS = {"error", "message", "request_id", "trace_id", "details"}
SETTLE = re.compile(r"^/v1/reservations/[^/]+/(commit|release|extend)$")
ONE = re.compile(r"^/v1/reservations/[^/]+$")


def kind_of(method: str, path: str) -> str:
    if method == "POST" and path == "/v1/reservations":
        return "create"
    m = SETTLE.match(path)
    if method == "POST" and m:
        return m.group(1)
    if method == "POST" and path == "/v1/events":
        return "event"
    if method == "POST" and path == "/v1/decide":
        return "decide"
    if method == "GET" and path == "/v1/balances":
        return "balances"
    if method == "GET" and path == "/v1/reservations":
        return "list"
    if method == "GET" and ONE.match(path):
        return "get"
    return "other"


def walk(value: Any, where: str, problems: list[str], freeform: bool = False, key: str | None = None) -> None:
    if value is None:
        problems.append(f"JSON null at {where}")
        return
    if isinstance(value, float) and not freeform:
        problems.append(f"float {value!r} at {where}")
    if key is not None and not freeform and (key in INT_KEYS or key.endswith("_ms")):
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{where} must be an integer, got {type(value).__name__} {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            walk(v, f"{where}.{k}", problems, freeform or k in FREEFORM_KEYS, k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            walk(v, f"{where}[{i}]", problems, freeform, None)


def strict(model: Any, body: Any) -> str | None:
    try:
        model.model_validate_json(json.dumps(body), strict=True)
        return None
    except Exception as exc:  # noqa: BLE001
        return f"{model.__name__} rejects the body: {exc}"


def check(ex: dict[str, Any], counts: dict[str, int], no_trace_in_errors: bool = False) -> list[str]:
    problems: list[str] = []
    method, path, status = ex["method"], ex["path"], ex["status"]
    headers = ex["response_headers"]
    body = ex["response_json"]
    kind = kind_of(method, path)
    counts[kind] = counts.get(kind, 0) + 1
    if kind == "other":
        return problems
    if not headers.get("x-request-id"):
        problems.append("no X-Request-Id header")
    if not (headers.get("content-type") or "").startswith("application/json"):
        problems.append(f"content-type {headers.get('content-type')!r}")
    if not isinstance(body, dict):
        problems.append(f"body is not a JSON object: {ex['response_text'][:200]!r}")
        return problems
    walk(body, "$", problems)
    resp = CyclesResponse(status=status, body=body, headers=headers)

    if status >= 500:
        problems.append(f"server error {status}")
    if status >= 400:
        extra = set(body) - ERROR_KEYS
        if extra:
            problems.append(f"error body has keys outside the spec/SDK set: {sorted(extra)}")
        trace_id = body.get("trace_id")
        if no_trace_in_errors:
            # server run with --no-error-trace-id: the body must parse as the SDK sees it, untouched
            if "trace_id" in body:
                problems.append("error body carries trace_id although the server runs with --no-error-trace-id")
            if not TRACE_ID.match(headers.get("x-cycles-trace-id") or ""):
                problems.append("no valid X-Cycles-Trace-Id header on an error response")
        elif not isinstance(trace_id, str) or not TRACE_ID.match(trace_id):
            problems.append(f"error body trace_id {trace_id!r} is not 32 lowercase hex (spec MUST)")
        elif trace_id != headers.get("x-cycles-trace-id"):
            problems.append("error body trace_id differs from the X-Cycles-Trace-Id header")
        sdk_view = body if no_trace_in_errors else {k: v for k, v in body.items() if k != "trace_id"}
        try:
            parsed = ErrorResponse.model_validate(sdk_view)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"ErrorResponse.model_validate fails: {exc}")
        else:
            if parsed.error_code in (None, ErrorCode.UNKNOWN):
                problems.append(f"error code {parsed.error!r} is not a protocol ErrorCode")
            if parsed.request_id != headers.get("x-request-id"):
                problems.append("error body request_id differs from the X-Request-Id header")
        return problems
    if not 200 <= status < 300:
        problems.append(f"unexpected status {status}")
        return problems

    if kind == "create":
        if _schema_valid_create(resp) is None:
            problems.append("runcycles.lifecycle._schema_valid_create rejects the create response")
    elif kind == "extend":
        if _schema_valid_extend(resp) is None:
            problems.append("runcycles.lifecycle._schema_valid_extend rejects the extend response")
    elif kind == "commit":
        if not _is_schema_valid_commit_success(resp):
            problems.append("runcycles.retry._is_schema_valid_commit_success rejects the commit response")
    elif kind == "event":
        if not _is_schema_valid_event_success(resp):
            problems.append("runcycles.retry._is_schema_valid_event_success rejects the event response")
    else:
        if status != 200:
            problems.append(f"{kind} answered {status}, the spec says 200")
        model = {"release": ReleaseResponse, "decide": DecisionResponse, "balances": BalanceResponse}.get(kind)
        if model is not None:
            err = strict(model, body)
            if err:
                problems.append(err)
    return problems


def main() -> None:
    p = params()
    with open(p["exchanges_file"]) as fh:
        exchanges = json.load(fh)
    counts: dict[str, int] = {}
    problems: list[dict[str, Any]] = []
    with_trace = 0
    for ex in exchanges:
        if ex["status"] >= 400 and isinstance(ex["response_json"], dict) and "trace_id" in ex["response_json"]:
            with_trace += 1
        for msg in check(ex, counts, bool(p.get("no_trace_in_errors"))):
            problems.append({"seq": ex["seq"], "method": ex["method"], "path": ex["path"], "status": ex["status"],
                             "problem": msg, "body": ex["response_text"][:400]})
    emit({"checked": len(exchanges), "kinds": counts, "problems": problems,
          "error_bodies_with_trace_id": with_trace})


main()
