"""`cycles apply FILE.yaml`: make the server match a file of tenants with their budgets and policies.

It reads the current state through the admin API, prints a plan, then creates what is missing and updates
what differs. It never deletes or closes anything, so objects the file does not mention are left alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable

import httpx
import typer
import yaml

from ..core import scopes
from ..core.actions import RISK_CLASSES, WINDOWS
from . import render
from .client import AdminClient, ApiError

UNITS = ("USD_MICROCENTS", "TOKENS", "CREDITS", "RISK_POINTS")
OVERAGE = ("REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT")
INT64 = 2**63 - 1
TTL_MS = (1000, 86_400_000)
TENANT_ID = re.compile(r"[a-z0-9-]{3,64}")

CREATE, UPDATE, SAME, CONFLICT = "create", "update", "unchanged", "conflict"
SYMBOL = {CREATE: "+", UPDATE: "~", SAME: "=", CONFLICT: "!"}


class FileError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# ---- the file's schema: each check returns the value and appends "path: problem" for what is wrong ----

Check = Callable[[Any, str, list[str]], Any]


def _int(lo: int = 0, hi: int = INT64) -> Check:
    def check(v: Any, path: str, problems: list[str]) -> Any:
        # bool is an int in Python, and a float amount would be silently rounded: both are refused
        if type(v) is not int:
            problems.append(f"{path}: must be an integer")
        elif not lo <= v <= hi:
            problems.append(f"{path}: must be between {lo} and {hi}")
        return v
    return check


def _str(max_length: int = 256, pattern: re.Pattern[str] | None = None, hint: str = "") -> Check:
    def check(v: Any, path: str, problems: list[str]) -> Any:
        if not isinstance(v, str) or not v:
            problems.append(f"{path}: must be a non-empty string")
        elif len(v) > max_length:
            problems.append(f"{path}: must be at most {max_length} characters")
        elif pattern is not None and not pattern.fullmatch(v):
            problems.append(f"{path}: {hint}")
        return v
    return check


def _ratio(lo: float, hi: float) -> Check:
    def check(v: Any, path: str, problems: list[str]) -> Any:
        if type(v) not in (int, float) or not lo <= v <= hi:
            problems.append(f"{path}: must be a number from {lo} to {hi}")
        return v
    return check


def _enum(*values: str) -> Check:
    def check(v: Any, path: str, problems: list[str]) -> Any:
        if v not in values:
            problems.append(f"{path}: must be one of {', '.join(values)}")
        return v
    return check


def _list(item: Check) -> Check:
    def check(v: Any, path: str, problems: list[str]) -> Any:
        if not isinstance(v, list):
            problems.append(f"{path}: must be a list")
            return []
        return [item(x, f"{path}[{i}]", problems) for i, x in enumerate(v)]
    return check


def _str_map(v: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        problems.append(f"{path}: must be a mapping of strings to strings")
    return v


def _obj(fields: dict[str, Check], required: tuple[str, ...] = ()) -> Check:
    def check(v: Any, path: str, problems: list[str]) -> Any:
        where = path or "top level"
        if not isinstance(v, dict):
            problems.append(f"{where}: must be a mapping")
            return {}
        for key in v:
            if key not in fields:
                problems.append(f"{_join(path, key)}: unknown key (expected one of {', '.join(fields)})")
        for key in required:
            if key not in v:
                problems.append(f"{_join(path, key)}: required")
        return {k: fields[k](x, _join(path, k), problems) for k, x in v.items() if k in fields}
    return check


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


_AMOUNT = _int()
_OVERAGE = _enum(*OVERAGE)
# v0.1.26 action governance (cycles-action-kinds ActionQuota, RiskClassQuota)
_KIND = _str(64)
_QUOTA_COMMON = {"max_calls": _int(1, 100_000), "window": _enum(*WINDOWS),
                 "per_run_counter_ttl_ms": _int(60_000, 604_800_000), "threshold_pct": _ratio(0.01, 0.99)}
ACTION_QUOTA = _obj({"action_kind": _KIND, **_QUOTA_COMMON, "host_allowlist": _list(_str(253)),
                     "recipient_domain_allowlist": _list(_str(253)), "resource_type_allowlist": _list(_str(128))},
                    required=("action_kind", "max_calls", "window"))
RISK_CLASS_QUOTA = _obj({"risk_class": _enum(*RISK_CLASSES), **_QUOTA_COMMON},
                        required=("risk_class", "max_calls", "window"))
BUDGET = _obj({"scope": _str(1024), "unit": _enum(*UNITS), "allocated": _AMOUNT, "overdraft_limit": _AMOUNT,
               "commit_overage_policy": _OVERAGE}, required=("scope", "unit", "allocated"))
POLICY = _obj({
    "name": _str(256), "scope_pattern": _str(1024), "description": _str(1024), "priority": _int(),
    "caps": _obj({"max_tokens": _int(), "max_steps_remaining": _int(), "tool_allowlist": _list(_str()),
                  "tool_denylist": _list(_str()), "cooldown_ms": _int()}),
    "rate_limits": _obj({"max_reservations_per_minute": _int(1), "max_commits_per_minute": _int(1)}),
    "commit_overage_policy": _OVERAGE,
    "reservation_ttl_override": _obj({"default_ttl_ms": _int(*TTL_MS), "max_ttl_ms": _int(*TTL_MS),
                                      "max_extensions": _int()}),
    "status": _enum("ACTIVE", "DISABLED"),
    "allowed_action_kinds": _list(_KIND), "denied_action_kinds": _list(_KIND),
    "action_quotas": _list(ACTION_QUOTA), "risk_class_quotas": _list(RISK_CLASS_QUOTA),
}, required=("name", "scope_pattern"))
TENANT_SETTINGS = ("name", "default_commit_overage_policy", "default_reservation_ttl_ms", "max_reservation_ttl_ms",
                   "max_reservation_extensions", "metadata", "observe_mode")
TENANT = _obj({
    "tenant_id": _str(64, TENANT_ID, "must be 3-64 characters of a-z, 0-9 and -"), "name": _str(256),
    "default_commit_overage_policy": _OVERAGE, "default_reservation_ttl_ms": _int(*TTL_MS),
    "max_reservation_ttl_ms": _int(*TTL_MS), "max_reservation_extensions": _int(), "metadata": _str_map,
    "observe_mode": _enum("ENFORCE", "OBSERVE", "DISABLED"),
    "budgets": _list(BUDGET), "policies": _list(POLICY),
}, required=("tenant_id", "name"))
ROOT = _obj({"tenants": _list(TENANT)}, required=("tenants",))


def _cross_check(tenants: list[dict[str, Any]], problems: list[str]) -> None:
    """What one entry cannot check alone: duplicates, and budget scopes inside their tenant."""
    seen_tenants: dict[str, int] = {}
    for i, t in enumerate(tenants):
        tid, here = t["tenant_id"], f"tenants[{i}]"
        if tid in seen_tenants:
            problems.append(f"{here}.tenant_id: {tid} is already declared at tenants[{seen_tenants[tid]}]")
        seen_tenants.setdefault(tid, i)
        seen_budgets: dict[tuple[str, str], int] = {}
        for j, b in enumerate(t.get("budgets", [])):
            path = f"{here}.budgets[{j}].scope"
            try:
                canonical = scopes.canonical(b["scope"])
            except scopes.ScopeError as err:
                problems.append(f"{path}: {err}")
                continue
            if canonical != b["scope"]:
                problems.append(f"{path}: write it in canonical form: {canonical}")
            elif canonical.split("/")[0] != f"tenant:{tid}":
                problems.append(f"{path}: must be tenant:{tid} or below it")
            ident = (b["scope"], b["unit"])
            if ident in seen_budgets:
                problems.append(f"{path}: {ident[0]} {ident[1]} is already declared at "
                                f"{here}.budgets[{seen_budgets[ident]}]")
            seen_budgets.setdefault(ident, j)
        seen_policies: dict[str, int] = {}
        for j, p in enumerate(t.get("policies", [])):
            if p.get("allowed_action_kinds") and p.get("denied_action_kinds"):
                problems.append(f"{here}.policies[{j}]: allowed_action_kinds and denied_action_kinds are mutually "
                                "exclusive: keep one of them")
            if p["name"] in seen_policies:
                problems.append(f"{here}.policies[{j}].name: {p['name']} is already declared at "
                                f"{here}.policies[{seen_policies[p['name']]}]")
            seen_policies.setdefault(p["name"], j)


class _Loader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; in a declarative file that hides a mistake, so refuse it."""


def _mapping(loader: _Loader, node: yaml.MappingNode) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, Hashable):
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


@dataclass
class Spec:
    tenants: list[dict[str, Any]]
    digest: str


def load(path: Path) -> Spec:
    raw = path.read_bytes()
    try:
        data = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as err:
        raise FileError([f"not valid YAML: {err}"]) from None
    problems: list[str] = []
    doc = ROOT(data, "", problems)
    if not problems:
        _cross_check(doc["tenants"], problems)
    if problems:
        raise FileError(problems)
    return Spec(doc["tenants"], hashlib.sha256(raw).hexdigest())


# ---- the plan ----

@dataclass
class Call:
    method: str
    path: str  # may name fields of the previous call's answer, e.g. {policy_id}
    params: dict[str, Any] | None = None
    body: Any = None
    retry: bool = False


@dataclass
class Change:
    kind: str  # tenant, budget, policy
    target: str
    op: str
    fields: list[tuple[str, Any, Any]] = field(default_factory=list)  # (name, old, new)
    calls: list[Call] = field(default_factory=list)
    note: str = ""


def _clean(value: Any) -> Any:
    """Drop nulls and treat an absent mapping as empty, so a server's fuller echo compares equal."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if v is not None}
    return {} if value is None else value


def _same(old: Any, new: Any) -> bool:
    if isinstance(new, dict) or isinstance(old, dict):
        return _clean(old) == _clean(new)
    return old == new


def _get_or_none(client: AdminClient, path: str) -> Any:
    try:
        return client.get(path)
    except ApiError as err:
        if err.status == 404:
            return None
        raise


def _amount(unit: str, value: int) -> dict[str, Any]:
    return {"unit": unit, "amount": value}


def _fund_key(spec: Spec, tenant: str, b: dict[str, Any], ledger: dict[str, Any]) -> str:
    # From the file and the ledger state this plan read: a re-run after a crash sends the same key, so the
    # server applies the RESET at most once; once the ledger changes (new updated_at) the key is new too, so
    # a later re-apply of the same file is applied rather than answered from the old replay.
    material = [spec.digest, tenant, b["scope"], b["unit"], b["allocated"], ledger["allocated"]["amount"],
                ledger.get("updated_at")]
    return "apply-" + hashlib.sha256(json.dumps(material).encode()).hexdigest()[:48]


def _tenant(t: dict[str, Any], current: dict[str, Any] | None) -> Change:
    tid = t["tenant_id"]
    wanted = {k: t[k] for k in TENANT_SETTINGS if k in t}
    if current is None:
        return Change("tenant", tid, CREATE, [(k, None, v) for k, v in wanted.items()],
                      [Call("POST", "/v1/admin/tenants", body={"tenant_id": tid, **wanted})])
    if current.get("status") == "CLOSED":
        return Change("tenant", tid, CONFLICT, note="the tenant is CLOSED; closed tenants cannot be changed")
    diff = [(k, current.get(k), v) for k, v in wanted.items() if not _same(current.get(k), v)]
    if not diff:
        return Change("tenant", tid, SAME)
    return Change("tenant", tid, UPDATE, diff,
                  [Call("PATCH", f"/v1/admin/tenants/{tid}", body={k: new for k, _, new in diff})])


def _budget(spec: Spec, tenant: str, b: dict[str, Any], ledger: dict[str, Any] | None) -> Change:
    scope, unit = b["scope"], b["unit"]
    target, where = f"{scope} {unit}", {"tenant_id": tenant, "scope": scope, "unit": unit}
    if ledger is None:
        body: dict[str, Any] = {"tenant_id": tenant, "scope": scope, "unit": unit,
                                "allocated": _amount(unit, b["allocated"])}
        if "overdraft_limit" in b:
            body["overdraft_limit"] = _amount(unit, b["overdraft_limit"])
        if "commit_overage_policy" in b:
            body["commit_overage_policy"] = b["commit_overage_policy"]
        fields = [(k, None, b[k]) for k in ("allocated", "overdraft_limit", "commit_overage_policy") if k in b]
        return Change("budget", target, CREATE, fields, [Call("POST", "/v1/admin/budgets", body=body)])
    change = Change("budget", target, SAME)
    patch: dict[str, Any] = {}
    old_overdraft = (ledger.get("overdraft_limit") or {}).get("amount", 0)
    if "overdraft_limit" in b and b["overdraft_limit"] != old_overdraft:
        change.fields.append(("overdraft_limit", old_overdraft, b["overdraft_limit"]))
        patch["overdraft_limit"] = _amount(unit, b["overdraft_limit"])
    if "commit_overage_policy" in b and b["commit_overage_policy"] != ledger.get("commit_overage_policy"):
        change.fields.append(("commit_overage_policy", ledger.get("commit_overage_policy"), b["commit_overage_policy"]))
        patch["commit_overage_policy"] = b["commit_overage_policy"]
    if patch:
        change.calls.append(Call("PATCH", "/v1/admin/budgets", params=where, body=patch))
    old_allocated = ledger["allocated"]["amount"]
    if b["allocated"] != old_allocated:
        if ledger.get("status") != "ACTIVE":
            return Change("budget", target, CONFLICT, note=f"the budget is {ledger.get('status')}; its allocation "
                          f"({render.num(old_allocated)} → {render.num(b['allocated'])}) can change only when ACTIVE")
        # The API's PATCH cannot change the allocation; RESET sets it exactly and keeps spent, reserved and debt.
        change.fields.insert(0, ("allocated", old_allocated, b["allocated"]))
        body = {"operation": "RESET", "amount": _amount(unit, b["allocated"]),
                "idempotency_key": _fund_key(spec, tenant, b, ledger), "reason": "cycles apply"}
        change.calls.append(Call("POST", "/v1/admin/budgets/fund", params=where, body=body, retry=True))
    if change.calls:
        change.op = UPDATE
    return change


POLICY_FIELDS = ("description", "priority", "caps", "rate_limits", "commit_overage_policy",
                 "reservation_ttl_override", "status", "allowed_action_kinds", "denied_action_kinds", "action_quotas",
                 "risk_class_quotas")


def _policy(tenant: str, p: dict[str, Any], found: list[dict[str, Any]]) -> Change:
    target = f"{tenant} {p['name']}"
    if not found:
        # A new policy is ACTIVE; the create request has no status field, so DISABLED is a PATCH after it.
        body = {"tenant_id": tenant, **{k: v for k, v in p.items() if k != "status"}}
        calls = [Call("POST", "/v1/admin/policies", body=body)]
        if p.get("status", "ACTIVE") != "ACTIVE":
            calls.append(Call("PATCH", "/v1/admin/policies/{policy_id}", body={"status": p["status"]}))
        return Change("policy", target, CREATE, [(k, None, v) for k, v in p.items() if k != "name"], calls)
    if len(found) > 1:
        return Change("policy", target, CONFLICT, note=f"{len(found)} policies have this name; the name must be unique")
    current = found[0]
    if current.get("scope_pattern") != p["scope_pattern"]:
        return Change("policy", target, CONFLICT, note=f"scope_pattern {current.get('scope_pattern')} → "
                      f"{p['scope_pattern']}: the API cannot change a policy's scope pattern; give it a new name")
    lists = ("allowed_action_kinds", "denied_action_kinds")
    for mine, other in (lists, lists[::-1]):
        if p.get(mine) and other not in p and current.get(other):
            return Change("policy", target, CONFLICT, note=f"the policy has {other} and a policy cannot have both "
                          f"lists; add `{other}: []` to the file to replace it with {mine}")
    diff = [(k, current.get(k), p[k]) for k in POLICY_FIELDS if k in p and not _same(current.get(k), p[k])]
    if not diff:
        return Change("policy", target, SAME)
    return Change("policy", target, UPDATE, diff, [Call("PATCH", f"/v1/admin/policies/{current['policy_id']}",
                                                        body={k: new for k, _, new in diff})])


def plan(client: AdminClient, spec: Spec) -> list[Change]:
    changes: list[Change] = []
    for t in spec.tenants:
        tid = t["tenant_id"]
        current = _get_or_none(client, f"/v1/admin/tenants/{tid}")
        tenant_change = _tenant(t, current)
        changes.append(tenant_change)
        if tenant_change.op == CONFLICT:
            continue
        ledgers: dict[tuple[str, str], dict[str, Any]] = {}
        named: dict[str, list[dict[str, Any]]] = {}
        if current is not None and t.get("budgets"):
            page = client.page("/v1/admin/budgets", {"tenant_id": tid, "limit": 100}, "ledgers", all_pages=True)
            ledgers = {(b["scope"], b["unit"]): b for b in page["ledgers"]}
        if current is not None and t.get("policies"):
            page = client.page("/v1/admin/policies", {"tenant_id": tid, "limit": 100}, "policies", all_pages=True)
            for p in page["policies"]:
                named.setdefault(p.get("name"), []).append(p)
        # parents first: a scope's budget may require the budgets of the scopes above it
        for b in sorted(t.get("budgets", []), key=lambda b: b["scope"].count("/")):
            changes.append(_budget(spec, tid, b, ledgers.get((b["scope"], b["unit"]))))
        for p in t.get("policies", []):
            changes.append(_policy(tid, p, named.get(p["name"], [])))
    return changes


# ---- output and the run ----

def _show(value: Any) -> str:
    return render.num(value) if isinstance(value, int) else render.text(value)


def _describe(c: Change) -> str:
    if c.op == CREATE:
        return "; ".join(f"{k}: {_show(new)}" for k, _, new in c.fields)
    if c.op == UPDATE:
        return "; ".join(f"{k}: {_show(old)} → {_show(new)}" for k, old, new in c.fields)
    return c.note or "unchanged"


def _as_json(c: Change) -> dict[str, Any]:
    return {"op": c.op, "kind": c.kind, "target": c.target, "note": c.note or None,
            "changes": [{"field": k, "old": old, "new": new} for k, old, new in c.fields]}


def run(client: AdminClient, spec: Spec, *, plan_only: bool, as_json: bool) -> int:
    """Plan, print, and unless plan_only apply. Returns the exit code."""
    out: dict[str, Any] = {"plan": [], "applied": []}

    def finish(code: int) -> int:
        if as_json:
            render.emit_json(out)
        return code

    try:
        changes = plan(client, spec)
    except (ApiError, httpx.HTTPError) as err:
        _report(err, "reading the current state")
        return finish(1)
    out["plan"] = [_as_json(c) for c in changes]
    pending = [c for c in changes if c.op in (CREATE, UPDATE)]
    conflicts = [c for c in changes if c.op == CONFLICT]
    if not as_json:
        render.table("Plan", ["", "Kind", "Target", "Changes"],
                     ([SYMBOL[c.op], c.kind, c.target, _describe(c)] for c in changes))
        counts = {op: sum(c.op == op for c in changes) for op in (CREATE, UPDATE, SAME, CONFLICT)}
        summary = ", ".join(f"{n} to {op}" if op in (CREATE, UPDATE) else f"{n} {op}" for op, n in counts.items() if n)
        if summary:
            typer.echo(summary)
    if conflicts:
        typer.echo(f"error: {len(conflicts)} conflict(s) (marked !); nothing applied.", err=True)
        return finish(1)
    if not pending:
        if not as_json:
            typer.echo("No changes.")
        return finish(0)
    if plan_only:
        if not as_json:
            typer.echo("Plan only: nothing applied.")
        return finish(0)
    for c in pending:
        try:
            answer: Any = None
            for call in c.calls:
                path = call.path.format_map(answer) if isinstance(answer, dict) else call.path
                answer = client.call(call.method, path, params=call.params, body=call.body, retry=call.retry)
        except (ApiError, httpx.HTTPError) as err:
            _report(err, f"{SYMBOL[c.op]} {c.kind} {c.target}")
            out["error"] = {"target": c.target, "message": str(err)}
            typer.echo(f"Applied {len(out['applied'])} of {len(pending)} changes. Fix the cause and run apply "
                       "again: it starts from the current state.", err=True)
            return finish(1)
        out["applied"].append(c.target)
        if not as_json:
            typer.echo(f"{SYMBOL[c.op]} {c.kind} {c.target}: done")
    if not as_json:
        typer.echo(f"Applied {len(pending)} change(s).")
    return finish(0)


def _report(err: Exception, during: str) -> None:
    if isinstance(err, ApiError):
        render.error(err.code, f"{during}: {err.message}", err.request_id)
    else:
        render.error("CONNECTION_FAILED", f"{during}: {err}")
