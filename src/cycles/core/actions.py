"""Action governance (v0.1.26): the action-kind registry, and what a tenant's policies say about one action.

`plan` runs the parts of the spec's reservation evaluation order that need no stored state: step 1 (the
allow / deny lists) is decided here; steps 2 and 3 (risk-class and per-kind quotas) become a list of
counters that the store checks and, on ALLOW, increments in the same atomic step as the budget hold.

Which policy's rules apply (the spec: "only the highest-priority matching policy's rules apply"): policies
are ordered as for every other setting (priority, then the deeper matched scope, then policy_id), and each
kind of rule is taken from the first policy that has it: the access lists from the first policy with a
non-empty list, a kind's quotas from the first policy with quotas for that kind, a risk class's quotas from
the first policy with quotas for that class. A policy that only sets caps does not switch off the lists of
a lower one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from . import action_registry
from .policies import is_effective, matches

RISK_CLASSES = ("read_only", "local_mutation", "side_effect", "external_side_effect", "high_risk")
WINDOWS = ("per_run", "per_minute_tumbling", "per_hour_tumbling", "per_day_tumbling", "per_tenant_per_day")
RISK = "__risk__"
DEFAULT_RISK = "side_effect"
DEFAULT_RUN_TTL_MS = 86_400_000
DEFAULT_THRESHOLD = 0.80
# window -> (length ms, stale-key cleanup ms, bucket format: 1 minute, 2 hour, 3 day); per_run has no bucket
WINDOW_SPEC = {
    "per_minute_tumbling": (60_000, 120_000, 1),
    "per_hour_tumbling": (3_600_000, 3_660_000, 2),
    "per_day_tumbling": (86_400_000, 90_000_000, 3),
    "per_tenant_per_day": (86_400_000, 90_000_000, 3),
}
RULE_FIELDS = ("action_quotas", "risk_class_quotas", "allowed_action_kinds", "denied_action_kinds")
CUSTOM_KINDS_ENV = "CYCLES_CUSTOM_ACTION_KINDS"
SAMPLE_RATE_ENV = "CYCLES_OBSERVE_ALLOW_SAMPLE_RATE"


class ActionError(ValueError):
    """A request or a declaration the action rules cannot accept (400 INVALID_REQUEST)."""


# ---- registry ----

class Registry:
    def __init__(self, custom: Iterable[dict[str, Any]] = ()) -> None:
        self.builtin = {k["kind"]: k for k in action_registry.KINDS}
        self.custom: dict[str, dict[str, Any]] = {}
        for decl in custom:
            kind, risk = decl.get("kind"), decl.get("risk_class")
            parts = kind.split(".") if isinstance(kind, str) else []
            if len(parts) < 3 or parts[0] != "custom" or not all(parts) or len(kind) > 64:
                raise ActionError(f"custom action kind {kind!r} must look like custom.<org>.<operation>")
            if risk not in RISK_CLASSES:
                raise ActionError(f"custom action kind {kind}: risk_class must be one of {', '.join(RISK_CLASSES)}")
            # deprecated / replacement_kind: the registry's ActionKind fields, so an operator can retire a custom
            # kind the way the spec retires built-in ones (reservations still pass, with X-Cycles-Deprecated-Kind)
            if "deprecated" in decl and not isinstance(decl["deprecated"], bool):
                raise ActionError(f"custom action kind {kind}: deprecated must be true or false")
            repl = decl.get("replacement_kind")
            if decl.get("deprecated") and not (isinstance(repl, str) and 0 < len(repl) <= 64 and repl.isascii()
                                               and repl.isprintable()):
                raise ActionError(f"custom action kind {kind}: a deprecated kind needs a replacement_kind "
                                  "(an action kind of at most 64 ASCII characters)")
            self.custom[kind] = {k: v for k, v in decl.items()
                                 if k in ("kind", "risk_class", "description", "policy_key_spec", "mcp_tool_prefixes",
                                          "deprecated", "replacement_kind")}
        self.version = action_registry.VERSION
        # kinds whose answers carry X-Cycles-Deprecated-Kind (the spec gives every deprecated kind a replacement)
        self.deprecated = {k: e for k, e in {**self.builtin, **self.custom}.items()
                           if e.get("deprecated") and e.get("replacement_kind")}

    def get(self, kind: str) -> dict[str, Any] | None:
        return self.builtin.get(kind) or self.custom.get(kind)

    def check(self, kind: str) -> None:
        """custom.* kinds must be declared (spec: no fallback risk class for them)."""
        if kind.startswith("custom.") and kind not in self.custom:
            raise ActionError(f"action kind {kind} is in the custom.* namespace and is not declared on this server "
                              f"(declare it in {CUSTOM_KINDS_ENV})")

    def risk_class(self, kind: str) -> str:
        entry = self.get(kind)
        return entry["risk_class"] if entry else DEFAULT_RISK


def load_registry(env: dict[str, str] | None = None) -> Registry:
    """The registry with the operator's custom kinds: CYCLES_CUSTOM_ACTION_KINDS holds a JSON list of
    declarations, or the path of a file holding one."""
    raw = (env if env is not None else os.environ).get(CUSTOM_KINDS_ENV, "").strip()
    if not raw:
        return Registry()
    if not raw.startswith("["):
        with open(raw, encoding="utf-8") as fh:
            raw = fh.read()
    try:
        decls = json.loads(raw)
    except ValueError as exc:
        raise ActionError(f"{CUSTOM_KINDS_ENV} is not a JSON list of declarations: {exc}") from None
    if not isinstance(decls, list) or not all(isinstance(d, dict) for d in decls):
        raise ActionError(f"{CUSTOM_KINDS_ENV} must be a JSON list of objects")
    return Registry(decls)


def load_sample_rate(env: dict[str, str] | None = None) -> float:
    """The share of observe-mode ALLOWs that emit reservation.observed_allowed (the spec's
    observe_allow_sample_rate): in (0, 1], 1 by default."""
    raw = (env if env is not None else os.environ).get(SAMPLE_RATE_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        rate = float(raw)
    except ValueError:
        rate = math.nan
    if not 0 < rate <= 1:
        raise ActionError(f"{SAMPLE_RATE_ENV} must be a number greater than 0 and at most 1 (got {raw!r})")
    return rate


class Sampler:
    """Which observe-mode ALLOWs emit an event: exactly `rate` of them, evenly spread (an accumulator, so a
    test or an operator sees the stated share and not a random one)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._acc = 0.0

    def take(self) -> bool:
        if self.rate >= 1:
            return True
        self._acc += self.rate
        if self._acc >= 1 - 1e-9:
            self._acc -= 1
            return True
        return False


def check_env(env: dict[str, str] | None = None) -> None:
    """Validate the action-governance settings (at `cycles serve` start)."""
    load_registry(env)
    load_sample_rate(env)


_REGISTRY: Registry | None = None


def registry() -> Registry:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_registry()
    return _REGISTRY


# ---- policies ----

def has_rules(policy: dict[str, Any]) -> bool:
    return any(policy.get(name) for name in RULE_FIELDS)


def validate_policy(rec: dict[str, Any], reg: Registry | None = None) -> None:
    """The v0.1.26 rules of a whole policy record; fills the spec's empty-list defaults."""
    reg = reg or registry()
    for name in RULE_FIELDS:
        if rec.get(name) is None:
            rec[name] = []
    if rec["allowed_action_kinds"] and rec["denied_action_kinds"]:
        raise ActionError("allowed_action_kinds and denied_action_kinds are mutually exclusive: clear one of them")
    for name in ("allowed_action_kinds", "denied_action_kinds"):
        for kind in rec[name]:
            reg.check(kind)
    for i, q in enumerate(rec["action_quotas"]):
        reg.check(q["action_kind"])
        _check_window(q, f"action_quotas[{i}]")
    for i, q in enumerate(rec["risk_class_quotas"]):
        _check_window(q, f"risk_class_quotas[{i}]")


def _check_window(q: dict[str, Any], where: str) -> None:
    if q.get("per_run_counter_ttl_ms") is not None and q["window"] != "per_run":
        raise ActionError(f"{where}.per_run_counter_ttl_ms is only allowed with window per_run")


# ---- evaluation ----

@dataclass
class Plan:
    """What the rules say about one action: a step-1 denial [reason_code, deny_detail, message], or the counters to
    check and count (risk-class ones first, the spec's step 2 before step 3)."""

    deny: list[Any] | None = None
    quotas: list[list[Any]] = field(default_factory=list)

    def store_arg(self) -> dict[str, Any] | None:
        if self.deny is not None:
            return {"deny": self.deny}
        return {"quotas": self.quotas} if self.quotas else None


def counter_key(scope: str, action_kind: str, risk_class: str | None, window: str) -> str:
    """A counter's key without its window instance (the store appends `|<window_key>`)."""
    return f"{scope}|{RISK + ':' + risk_class if risk_class else action_kind}|{window}"


def split_key(key: str) -> tuple[str, str, str | None, str, str]:
    """(scope, action_kind, risk_class, window, window_key) of a full counter key."""
    scope, label, window, window_key = key.split("|", 3)
    if label.startswith(RISK + ":"):
        return scope, RISK, label[len(RISK) + 1:], window, window_key
    return scope, label, None, window, window_key


def _governing(policies: Iterable[dict[str, Any]], scopes: list[str], now_ms: int) -> list[tuple[dict[str, Any], str]]:
    out = []
    for policy in policies:
        if not has_rules(policy) or not is_effective(policy, now_ms):
            continue
        matched = [s for s in scopes if matches(policy["scope_pattern"], s)]
        if matched:
            out.append((policy, matched[-1]))
    out.sort(key=lambda pm: (-(pm[0].get("priority") or 0), -pm[1].count("/"), pm[0]["policy_id"]))
    return out


def _keys_value(keys: dict[str, Any], spec: dict[str, Any] | None, name: str) -> Any:
    """A policy_keys dimension, when the kind declares it (undeclared dimensions are ignored for matching)."""
    if not spec or not spec.get(name):
        return None
    return keys.get(name)


def _rule_applies(rule: dict[str, Any], keys: dict[str, Any], spec: dict[str, Any] | None) -> bool:
    for allow, dim in (("host_allowlist", "host"), ("recipient_domain_allowlist", "recipient_domain"),
                       ("resource_type_allowlist", "resource_type")):
        if rule.get(allow):
            value = _keys_value(keys, spec, dim)
            if value is None or value not in rule[allow]:
                return False
    return True


def _threshold(rule: dict[str, Any]) -> int:
    pct = rule.get("threshold_pct") or DEFAULT_THRESHOLD
    return max(1, math.ceil(pct * rule["max_calls"] - 1e-9))


def _quota(rule: dict[str, Any], scope: str, kind: str, risk: str | None, run_id: str | None,
           policy_id: str) -> list[Any]:
    window = rule["window"]
    violation: dict[str, Any] = {"action_kind": kind, "window": window, "limit": rule["max_calls"], "scope": scope,
                                 "policy_id": policy_id}
    if risk:
        violation["risk_class"] = risk
    # the store fills quota_violation.used and .window_key when this counter denies
    detail = {"reason_code": "ACTION_QUOTA_EXCEEDED", "quota_violation": violation, "blocked_by_scope": scope,
              "blocked_by_policy": policy_id, "suggested_fix": quota_fix(violation)}
    if window == "per_run":
        size, ttl, fmt, bucket = 0, rule.get("per_run_counter_ttl_ms") or DEFAULT_RUN_TTL_MS, 0, run_id
    else:
        (size, ttl, fmt), bucket = WINDOW_SPEC[window], ""
    # [key, window length ms (0: per_run), window key ('' : the store's time bucket), bucket format, limit,
    #  stale-key TTL ms, threshold count, deny detail]
    return [counter_key(scope, kind, risk, window), size, bucket, fmt, rule["max_calls"], ttl, _threshold(rule),
            detail]


def plan(policies: Sequence[dict[str, Any]], scopes: list[str], action: dict[str, Any], subject: dict[str, Any],
         now_ms: int, reg: Registry | None = None) -> Plan:
    reg = reg or registry()
    kind = action["kind"]
    governing = _governing(policies, scopes, now_ms)
    out = Plan()
    if not governing:
        return out
    for policy, scope in governing:
        allowed, denied = policy.get("allowed_action_kinds"), policy.get("denied_action_kinds")
        if not allowed and not denied:
            continue
        pid = policy["policy_id"]
        if denied and kind in denied:
            out.deny = ["ACTION_KIND_DENIED", {
                "reason_code": "ACTION_KIND_DENIED", "blocked_by_policy": pid, "blocked_by_scope": scope,
                "suggested_fix": f"Remove {kind} from denied_action_kinds of policy '{pid}'"[:512]},
                f"Action kind {kind} is denied by policy {pid} (denied_action_kinds)"]
            return out
        if allowed and kind not in allowed:
            out.deny = ["ACTION_KIND_NOT_ALLOWED", {
                "reason_code": "ACTION_KIND_NOT_ALLOWED", "blocked_by_policy": pid, "blocked_by_scope": scope,
                "suggested_fix": f"Add {kind} to allowed_action_kinds of policy '{pid}'"[:512]},
                f"Action kind {kind} is not in allowed_action_kinds of policy {pid}"]
            return out
        break  # only the first policy with lists decides access
    entry = reg.get(kind)
    risk = entry["risk_class"] if entry else DEFAULT_RISK
    spec = entry.get("policy_key_spec") if entry else None
    keys = action.get("policy_keys") or {}
    run_id = (subject.get("dimensions") or {}).get("run_id")
    risk_rules: list[list[Any]] = []
    kind_rules: list[list[Any]] = []
    for target, name, match in ((risk_rules, "risk_class_quotas", lambda r: r["risk_class"] == risk),
                                (kind_rules, "action_quotas", lambda r: r["action_kind"] == kind)):
        for policy, scope in governing:
            rules = [r for r in policy.get(name) or () if match(r)]
            if not rules:
                continue
            for rule in rules:
                if name == "action_quotas" and not _rule_applies(rule, keys, spec):
                    continue
                if rule["window"] == "per_run" and not run_id:
                    raise ActionError(f"policy {policy['policy_id']} has a per_run quota for this action: "
                                      "subject.dimensions.run_id is required")
                counted = scopes[0] if rule["window"] == "per_tenant_per_day" else scope
                target.append(_quota(rule, counted, kind, risk if name == "risk_class_quotas" else None, run_id,
                                     policy["policy_id"]))
            break  # only the first policy with rules for this kind (or class) applies
    out.quotas = risk_rules + kind_rules
    return out


def pick_violation(checked: Sequence[tuple[int, int]], quotas: Sequence[Sequence[Any]]) -> int | None:
    """Index of the quota that denies, given (index, used) of every counter that is at its limit: the first
    risk-class one, else the per-kind one with the least headroom."""
    if not checked:
        return None
    risk = [i for i, _ in checked if quotas[i][7]["quota_violation"].get("risk_class")]
    if risk:
        return risk[0]
    return min(checked, key=lambda iu: (quotas[iu[0]][4] - iu[1], iu[0]))[0]


def window_key(now_ms: int, fmt: int) -> str:
    """The calendar bucket of a time window (UTC), as the stores write it."""
    import datetime as dt

    t = dt.datetime.fromtimestamp(now_ms // 1000, dt.timezone.utc)
    if fmt == 1:
        return t.strftime("%Y-%m-%dT%H:%M")
    if fmt == 2:
        return t.strftime("%Y-%m-%dT%H")
    return t.strftime("%Y-%m-%d")


def quota_message(detail: dict[str, Any]) -> str:
    """The message of a live 409 ACTION_QUOTA_EXCEEDED (`detail`: a filled quota_violation)."""
    what = f"risk class {detail['risk_class']}" if detail.get("risk_class") else f"action kind {detail['action_kind']}"
    return (f"Action quota exceeded: {what} used {detail['used']} of {detail['limit']} {detail['window']} "
            f"at scope {detail['scope']} (policy {detail.get('policy_id')})")


def quota_fix(detail: dict[str, Any]) -> str:
    what = detail.get("risk_class") or detail["action_kind"]
    return (f"Increase the {what} quota above {detail['limit']} {detail['window']} in policy "
            f"'{detail.get('policy_id')}', or wait for the window to end")[:512]
