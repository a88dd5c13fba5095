"""Runs the checks against a server and folds their findings into one result per requirement.

The JSON report (`REPORT_SCHEMA`, documented in docs/conformance.md) is keyed by requirement id.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

import httpx

from . import checks_plane  # noqa: F401  (registers its checks)
from . import specdocs
from .checks_runtime import CHECKS
from .probe import FAIL, NA, PASS, UNTESTED, Context, Finding, Untestable
from .requirements import CATALOG, GROUPS, MUST

NOT_RUN = "not_run"
REPORT_SCHEMA = "cycles-conformance-report/1"
KIT_VERSION = "1.0"
ORDER = ["operations", "idempotency", "errors", "units", "atomic", "concurrency", "overdraft", "auth",
         "correlation", "events", "webhooks", "should", "upcoming", "ttl", "closed"]


class Unreachable(Exception):
    pass


def report_errors(report: dict[str, Any]) -> list[str]:
    """Where `report` departs from report.schema.json (the documented, stable shape)."""
    import json
    from importlib import resources

    from jsonschema import Draft202012Validator

    schema = json.loads(resources.files("cycles.conformance").joinpath("report.schema.json").read_text())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in Draft202012Validator(schema).iter_errors(report)]


def selected_checks(only: list[str] | None) -> list[tuple[str, str, Callable[[Context], None]]]:
    checks = sorted(CHECKS, key=lambda c: ORDER.index(c[0]) if c[0] in ORDER else len(ORDER))
    if only:
        unknown = sorted(set(only) - set(GROUPS))
        if unknown:
            raise ValueError(f"unknown group(s) {', '.join(unknown)}; groups: {', '.join(GROUPS)}")
        checks = [c for c in checks if c[0] in only]
    return checks


def run(url: str, api_key: str | None, admin_key: str | None, tenant: str | None, *, only: list[str] | None = None,
        concurrency: int = 16, timeout: float = 15.0, webhook_url: str = "https://example.com/cycles/hook",
        progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    checks = selected_checks(only)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]
    started, t0 = datetime.now(timezone.utc), time.monotonic()
    ctx = Context(url, api_key, admin_key, tenant, run_id, timeout=timeout, concurrency=concurrency,
                  webhook_url=webhook_url)
    skipped: list[str] = []
    try:
        try:
            httpx.get(ctx.base_url + "/v1/balances", timeout=timeout)
        except httpx.HTTPError as e:
            raise Unreachable(f"cannot reach {ctx.base_url}: {e}") from None
        try:
            ctx.provision()
        except Untestable as e:
            skipped.append(f"provisioning: {e}")
        if not ctx.provisioned:
            skipped.append("no isolated budgets (needs --admin-key): atomic, concurrency, overdraft and "
                           "BUDGET_EXCEEDED checks cannot run; other checks spend a few units of an existing budget")
        cleanup: dict[str, Any] | None = None
        for i, (group, name, fn) in enumerate(checks):
            if progress:
                progress(name, i, len(checks))
            if group == "closed" and cleanup is None:  # delete what the run made while its keys still work
                cleanup = _cleanup(ctx)
            ctx.check_name = name
            try:
                fn(ctx)
            except Untestable as e:
                skipped.append(f"{name}: {e}")
                _untested_group(ctx, group, str(e))
            except httpx.HTTPError as e:
                skipped.append(f"{name}: transport error {e!r}")
                _untested_group(ctx, group, f"transport error: {e!r}")
        if progress:
            progress("done", len(checks), len(checks))
        if cleanup is None:
            cleanup = _cleanup(ctx)
    finally:
        ctx.close()
    groups = {g for g, _, _ in checks}
    return _report(ctx, groups, skipped, _cleanup_summary(ctx, cleanup), started, time.monotonic() - t0)


def _untested_group(ctx: Context, group: str, why: str) -> None:
    """The check stopped early: what it had not yet decided in its group could not be tested."""
    for r in CATALOG:
        if r.group == group:
            ctx.findings.append(Finding(r, UNTESTED, why, [], ctx.check_name))


def _cleanup(ctx: Context) -> dict[str, Any]:
    done, failed = 0, 0
    for fn in ctx.cleanup:
        try:
            ok = fn()
        except Exception:  # noqa: BLE001 (cleanup is best effort; the report says how it went)
            ok = False
        done, failed = (done + 1, failed) if ok else (done, failed + 1)
    ctx.cleanup = []
    return {"deleted": done, "failed": failed}


def _cleanup_summary(ctx: Context, cleanup: dict[str, Any]) -> dict[str, Any]:
    made = (ctx.tenant or "").startswith(f"conformance-{ctx.run_id}")
    closed = any(f.check == "closed_tenant" and f.status != UNTESTED for f in ctx.findings)
    note = ("the run's tenant was closed (its budgets closed, its keys revoked)" if closed else
            "budgets made under the run's tenant remain (run group `closed` to close the tenant)" if made else
            "nothing was provisioned; subscriptions the kit created were deleted")
    return {"tenant": ctx.tenant if made else None, **cleanup, "note": note}


def _fold(findings: list) -> tuple[str, str, list[dict[str, Any]], list[str]]:
    statuses = [f.status for f in findings]
    checks = sorted({f.check for f in findings})
    if FAIL in statuses:
        fails = [f for f in findings if f.status == FAIL]
        return FAIL, "; ".join(dict.fromkeys(f.detail for f in fails)), [e for f in fails for e in f.evidence][:5], checks
    for status in (PASS, UNTESTED, NA):
        if status in statuses:
            details = [f.detail for f in findings if f.status == status and f.detail]
            return status, "; ".join(dict.fromkeys(details)), [], checks
    return NOT_RUN, "", [], checks


def _report(ctx: Context, groups: set[str], skipped: list[str], cleanup: dict[str, Any], started: datetime,
            elapsed: float) -> dict[str, Any]:
    by_req: dict[str, list] = {}
    for f in ctx.findings:
        by_req.setdefault(f.requirement.id, []).append(f)
    schema_req = next(r for r in CATALOG if r.id.endswith("shared Amount, Subject, Balance"))
    if ctx.schema_checked and not any(f.status == FAIL for f in by_req.get(schema_req.id, [])):
        by_req.setdefault(schema_req.id, []).append(
            _pass(schema_req, f"{ctx.schema_checked} responses validated against the spec's schemas"))
    rows = []
    for r in CATALOG:
        status, detail, evidence, checks = _fold(by_req.get(r.id, []))
        if status == NOT_RUN and r.group in groups:
            status, detail = UNTESTED, "no check reached this requirement"
        elif status == NOT_RUN:
            detail = "group not selected (--only)"
        rows.append({"id": r.id, "level": r.level, "section": r.section, "source": r.source, "text": r.text,
                     "group": r.group, "status": status, "detail": detail, "checks": checks, "evidence": evidence})
    summary: dict[str, Any] = {}
    for level in ("MUST", "SHOULD"):
        counts = {s: 0 for s in (PASS, FAIL, NA, UNTESTED, NOT_RUN)}
        for row in rows:
            if row["level"] == level:
                counts[row["status"]] += 1
        summary[level.lower()] = counts
    must_rows = [row for row in rows if row["level"] == MUST and row["status"] != NOT_RUN]
    summary["conformant"] = bool(must_rows) and all(row["status"] in (PASS, NA) for row in must_rows)
    summary["complete"] = all(row["status"] != NOT_RUN for row in rows)
    return {
        "report_schema": REPORT_SCHEMA,
        "kit": {"name": "cycles-conformance", "version": KIT_VERSION},
        "run_id": ctx.run_id,
        "started_at": started.isoformat().replace("+00:00", "Z"),
        "duration_ms": int(elapsed * 1000),
        "target": {"url": ctx.base_url, "tenant": ctx.tenant, "admin_key": bool(ctx.admin_key),
                   "provisioned": cleanup.get("tenant") is not None},
        "spec": {"conformance_target": "v0.1.25",
                 "documents": {n: {"version": specdocs.doc_version(n), "sha256": specdocs.digest(n)}
                               for n in specdocs.DOCS}},
        "groups": sorted(groups),
        "summary": summary,
        "requirements": rows,
        "skipped": skipped,
        "cleanup": cleanup,
    }


def _pass(r, detail):
    return Finding(r, PASS, detail, [], "schema validation")
