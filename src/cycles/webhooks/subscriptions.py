"""Webhook subscriptions: the stored record, request → record, the merge of a patch,
and their validation (the wire structs: cycles.webhooks.wire). No I/O here except `load_url_policy` (one document read); the route layer
(cycles.server.webhooks) resolves URLs and writes.

THE STORED RECORD is a contract with the delivery engine (cycles.webhooks.dispatch / deliver): document
kind "webhook", doc_id = subscription_id, document tenant = the owning tenant_id or "__system__".

    subscription_id        "whsub_" + 24 hex
    tenant_id              owning tenant or "__system__"
    name, description      str | None
    url                    str (checked against the URL policy at create and on every change)
    event_types            list[str]   (INVARIANTS 1 and 2, cycles.webhooks.rules.check_selectors)
    event_categories       list[str]
    scope_filter           str | None  (exact, or a trailing `*` prefix)
    thresholds             dict | None (WebhookThresholdConfig shape, only the fields given)
    headers                {name: sealed value}  (values never leave the server: "********" on reads)
    secrets                [{"sealed", "created_at_ms", "expires_at_ms"}], newest first; every entry
                           whose expires_at_ms is None or in the future signs (rotation grace period)
    status                 ACTIVE | PAUSED | DISABLED
    retry_policy           {max_retries, initial_delay_ms, backoff_multiplier, max_delay_ms}
    disable_after_failures int (default 10)
    consecutive_failures   int
    last_triggered_at_ms, last_success_at_ms, last_failure_at_ms   int | None
    disabled_reason        str | None
    created_at, updated_at ISO 8601
    metadata               dict | None
    version                the store's document version

Sealing uses the app's SecretBox (cycles.webhooks.crypto); a write that must seal without one answers
500 INTERNAL_ERROR.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import secrets as _secrets
from dataclasses import dataclass, field
from typing import Any

import msgspec
from msgspec import UNSET

from ..core.events import EVENT_TYPES
from ..protocol.errors import ErrorCode, ProtocolError
from . import rules, urlpolicy
from .wire import (
    WebhookCreateRequest, WebhookRetryPolicy, WebhookSecurityConfig, WebhookSubscription, WebhookThresholdConfig,
    WebhookUpdateRequest, WebhookUpdateResponse,
)

KIND = "webhook"
CONFIG_KIND = "config"
SECURITY_DOC_ID = "webhook-security"
ID_PREFIX = "whsub_"
MASK = "********"
STATUSES = ("ACTIVE", "PAUSED", "DISABLED")
DEFAULT_DISABLE_AFTER = 10
DEFAULT_GRACE_SECONDS = 86_400
MAX_SECRETS = 5  # newest first; older ones past their grace period are dropped on every write
SECRET_KEY_MISSING = "webhook secrets need CYCLES_WEBHOOK_SECRET_KEY"
SORT_KEYS = ("url", "tenant_id", "status", "consecutive_failures")

# Headers the delivery engine sets itself (framing, signature, tracing): a subscription cannot override them.
RESERVED_HEADERS = frozenset({
    "host", "content-length", "content-type", "content-encoding", "transfer-encoding", "connection",
    "keep-alive", "te", "trailer", "upgrade", "expect", "proxy-authorization", "proxy-connection",
    "traceparent", "tracestate",
})
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")

# ---- helpers ----

def invalid(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_REQUEST, message)


def url_invalid(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.WEBHOOK_URL_INVALID, message)


def new_subscription_id() -> str:
    return ID_PREFIX + _secrets.token_hex(12)


def generate_secret() -> str:
    # standard base64 of 30 bytes (40 characters, no padding): what Standard Webhooks libraries decode
    return "whsec_" + base64.b64encode(os.urandom(30)).decode()


def iso(ms: int) -> str:
    from datetime import datetime, timezone

    dt = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def require_box(box: Any) -> Any:
    if box is None:
        raise ProtocolError(ErrorCode.INTERNAL_ERROR, SECRET_KEY_MISSING)
    return box


def check_selectors(owner: str, event_types: list[str], event_categories: list[str]) -> None:
    try:
        rules.check_selectors(owner, event_types, event_categories)
    except rules.InvariantViolation as exc:
        raise invalid(str(exc)) from None


def check_url_syntax(url: str, policy: urlpolicy.UrlPolicy) -> None:
    """What can be refused without a name lookup (the route layer then resolves the host)."""
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise url_invalid("url must not contain whitespace or control characters")
    try:
        urlpolicy.check_syntax(url, policy)
    except ValueError as exc:  # UrlRejected and anything urlsplit raises
        raise url_invalid(str(exc)) from None


def _dedupe(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _scope_filter(value: str | None) -> str | None:
    if value is None or value.strip() == "":
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise invalid("scope_filter must not contain control characters")
    if "*" in value[:-1]:
        raise invalid("scope_filter supports a single trailing * wildcard only (e.g. tenant:acme/*)")
    return value


def header_problem(name: str, value: str) -> str | None:
    """Why this custom header cannot be sent on the wire, or None. Values are sent as ASCII (httpx, and
    most receivers, refuse anything else): visible characters, spaces and tabs only (RFC 9110 field-value)."""
    if not _HEADER_NAME.fullmatch(name):
        return f"header name {name[:64]!r} is not a valid HTTP header name"
    for i, c in enumerate(value):
        if not (" " <= c <= "~" or c == "\t"):
            what = "CR, LF and NUL" if c in "\r\n\x00" else ("control characters" if c < " " or c == "\x7f"
                                                              else "non-ASCII characters")
            return (f"header {name} value must be printable ASCII (no {what}): "
                    f"U+{ord(c):04X} at position {i}")
    return None


def _check_headers(headers: dict[str, str]) -> None:
    seen: set[str] = set()
    for name, value in headers.items():
        lowered = name.lower()
        if not _HEADER_NAME.fullmatch(name):
            raise invalid(f"header name {name[:64]!r} is not a valid HTTP header name")
        if lowered in RESERVED_HEADERS or lowered.startswith("x-cycles-"):
            raise invalid(f"header {name} is set by the server and cannot be overridden")
        if lowered in seen:
            raise invalid(f"header {name} is given twice (header names are case-insensitive)")
        seen.add(lowered)
        problem = header_problem(name, value)
        if problem:
            raise invalid(problem)


def _check_retry(policy: dict[str, Any]) -> None:
    if policy["initial_delay_ms"] > policy["max_delay_ms"]:
        raise invalid("retry_policy.initial_delay_ms must not exceed retry_policy.max_delay_ms")


def _retry_dict(p: WebhookRetryPolicy | None) -> dict[str, Any]:
    p = p or WebhookRetryPolicy()
    return {"max_retries": p.max_retries, "initial_delay_ms": p.initial_delay_ms,
            "backoff_multiplier": float(p.backoff_multiplier), "max_delay_ms": p.max_delay_ms}


def _thresholds(t: WebhookThresholdConfig | None) -> dict[str, Any] | None:
    if t is None:
        return None
    out = msgspec.to_builtins(t)
    if "budget_utilization" in out:
        out["budget_utilization"] = sorted(set(out["budget_utilization"]))
    return out or None


def _open(box: Any, sealed: str) -> str | None:
    try:
        return box.open(sealed) if box is not None else None
    except Exception:  # noqa: BLE001 - a value sealed under another key cannot be compared
        return None


def _seal_headers(box: Any, headers: dict[str, str], previous: dict[str, str] | None) -> dict[str, str]:
    """Seal header values; a value equal to the stored one keeps its sealed form (no spurious change)."""
    out: dict[str, str] = {}
    previous = previous or {}
    for name, value in headers.items():
        old = previous.get(name)
        out[name] = old if old is not None and _open(box, old) == value else require_box(box).seal(value)
    return out


def _reseal(box: Any, sealed: str) -> str:
    """Values stored in plaintext (no key then) are sealed on the next write once a key is set."""
    if box is not None and getattr(box, "encrypts", False) and sealed.startswith("plain:"):
        return box.seal(box.open(sealed))
    return sealed


def live_secrets(rec: dict[str, Any], now_ms: int) -> list[dict[str, Any]]:
    """Secret entries that still sign (newest first)."""
    return [s for s in rec.get("secrets") or [] if s.get("expires_at_ms") is None or s["expires_at_ms"] > now_ms]


# ---- create ----

def build_record(req: WebhookCreateRequest, owner: str, box: Any, now_ms: int) -> tuple[dict[str, Any], str]:
    """A new subscription record (status ACTIVE) and the plaintext signing secret it signs with.
    The URL is checked by the caller (it needs a name lookup)."""
    event_types = _dedupe(req.event_types)
    categories = _dedupe(req.event_categories or [])
    check_selectors(owner, event_types, categories)
    headers = req.headers or {}
    _check_headers(headers)
    retry = _retry_dict(req.retry_policy)
    _check_retry(retry)
    box = require_box(box)
    secret = req.signing_secret if req.signing_secret is not None else generate_secret()
    now = iso(now_ms)
    rec: dict[str, Any] = {
        "subscription_id": new_subscription_id(), "tenant_id": owner, "name": req.name,
        "description": req.description, "url": req.url, "event_types": event_types,
        "event_categories": categories, "scope_filter": _scope_filter(req.scope_filter),
        "thresholds": _thresholds(req.thresholds), "headers": _seal_headers(box, headers, None),
        "secrets": [{"sealed": box.seal(secret), "created_at_ms": now_ms, "expires_at_ms": None}],
        "status": "ACTIVE", "retry_policy": retry,
        "disable_after_failures": req.disable_after_failures or DEFAULT_DISABLE_AFTER,
        "consecutive_failures": 0, "last_triggered_at_ms": None, "last_success_at_ms": None,
        "last_failure_at_ms": None, "disabled_reason": None, "created_at": now, "updated_at": now,
        "metadata": req.metadata,
    }
    return rec, secret


# ---- update ----

@dataclass
class Merge:
    record: dict[str, Any]
    changed: list[str] = field(default_factory=list)  # mutated fields other than status
    previous_status: str = "ACTIVE"
    new_status: str = "ACTIVE"
    generated_secret: str | None = None  # plaintext, when the server generated the new secret
    url_changed: bool = False

    @property
    def status_changed(self) -> bool:
        return self.previous_status != self.new_status

    @property
    def noop(self) -> bool:
        return not self.changed and not self.status_changed

    def event_type(self) -> str:
        if self.new_status == "PAUSED" and self.status_changed:
            return "webhook.paused"
        if self.new_status == "ACTIVE" and self.status_changed:
            return "webhook.resumed"
        return "webhook.updated"


_PLAIN_FIELDS = ("name", "description", "url", "disable_after_failures", "metadata")


def merge_patch(rec: dict[str, Any], req: WebhookUpdateRequest, box: Any, now_ms: int) -> Merge:
    """Apply a PATCH to a stored record; validates the resulting state (not the URL's resolution)."""
    owner = rec["tenant_id"]
    merged = dict(rec)
    changed: list[str] = []

    def put(name: str, value: Any) -> None:
        if rec.get(name) != value:
            merged[name] = value
            changed.append(name)

    for name in _PLAIN_FIELDS:
        value = getattr(req, name)
        if value is not UNSET:
            put(name, value)
    if req.event_types is not UNSET:
        put("event_types", _dedupe(req.event_types))
    if req.event_categories is not UNSET:
        put("event_categories", _dedupe(req.event_categories))
    if req.scope_filter is not UNSET:
        put("scope_filter", _scope_filter(req.scope_filter))
    if req.thresholds is not UNSET:
        put("thresholds", _thresholds(req.thresholds))
    if req.retry_policy is not UNSET:
        retry = dict(rec.get("retry_policy") or _retry_dict(None))
        retry.update(msgspec.to_builtins(req.retry_policy))
        retry["backoff_multiplier"] = float(retry["backoff_multiplier"])
        _check_retry(retry)
        put("retry_policy", retry)
    # INVARIANTS 1 and 2 on the resulting state, whatever the patch touched.
    check_selectors(owner, merged.get("event_types") or [], merged.get("event_categories") or [])

    if req.headers is not UNSET:
        _check_headers(req.headers)
        put("headers", _seal_headers(box, req.headers, rec.get("headers")))

    result = Merge(record=merged, previous_status=rec.get("status", "ACTIVE"))
    _rotate(result, rec, req, box, now_ms, changed)

    result.new_status = result.previous_status
    if req.status is not UNSET and req.status != result.previous_status:
        if result.previous_status == "DISABLED" and req.status == "PAUSED":
            raise invalid("a DISABLED subscription delivers nothing already; re-enable it with status ACTIVE")
        result.new_status = merged["status"] = req.status
        if req.status == "ACTIVE" and result.previous_status == "DISABLED":
            merged["consecutive_failures"] = 0
            merged["disabled_reason"] = None
    result.changed = changed
    result.url_changed = "url" in changed
    if not result.noop:
        merged["updated_at"] = iso(now_ms)
        # Every write drops secrets past their grace period and seals values kept in plaintext.
        merged["secrets"] = [{**s, "sealed": _reseal(box, s["sealed"])} for s in live_secrets(merged, now_ms)]
        merged["headers"] = {n: _reseal(box, v) for n, v in (merged.get("headers") or {}).items()}
    return result


def _rotate(result: Merge, rec: dict[str, Any], req: WebhookUpdateRequest, box: Any, now_ms: int,
            changed: list[str]) -> None:
    rotate = req.rotate_signing_secret is True
    if rotate and req.signing_secret is not UNSET:
        raise invalid("send either signing_secret or rotate_signing_secret, not both")
    if req.secret_grace_seconds is not UNSET and not rotate and req.signing_secret is UNSET:
        raise invalid("secret_grace_seconds applies only to a rotation (signing_secret or rotate_signing_secret)")
    if not rotate and req.signing_secret is UNSET:
        return
    current = live_secrets(rec, now_ms)
    if not rotate and current and _open(box, current[0]["sealed"]) == req.signing_secret:
        return  # the secret in use, sent again: nothing to rotate
    box = require_box(box)
    secret = generate_secret() if rotate else str(req.signing_secret)
    grace = DEFAULT_GRACE_SECONDS if req.secret_grace_seconds is UNSET else int(req.secret_grace_seconds)
    until = now_ms + grace * 1000
    kept = [{**s, "expires_at_ms": until if s.get("expires_at_ms") is None else min(s["expires_at_ms"], until)}
            for s in current]
    kept = [s for s in kept if s["expires_at_ms"] > now_ms]  # a zero grace period ends the old secret now
    fresh = {"sealed": box.seal(secret), "created_at_ms": now_ms, "expires_at_ms": None}
    result.record["secrets"] = [fresh, *kept][:MAX_SECRETS]
    changed.append("signing_secret")
    if rotate:
        result.generated_secret = secret


# ---- reads ----

def to_wire(rec: dict[str, Any]) -> WebhookSubscription:
    return msgspec.convert(_wire_fields(rec), WebhookSubscription)


def to_update_response(rec: dict[str, Any], generated_secret: str | None) -> WebhookUpdateResponse:
    return msgspec.convert({**_wire_fields(rec), "signing_secret": generated_secret}, WebhookUpdateResponse)


def _wire_fields(rec: dict[str, Any]) -> dict[str, Any]:
    # Tolerant of records written by other tools (a missing field reads as its default, never a 500).
    out = {k: rec.get(k) for k in ("name", "description", "scope_filter", "thresholds", "metadata")}
    for k in ("subscription_id", "tenant_id", "url", "created_at"):
        out[k] = str(rec.get(k) or "")
    out["status"] = rec.get("status") if rec.get("status") in STATUSES else "DISABLED"
    out["updated_at"] = str(rec.get("updated_at") or out["created_at"])
    out["event_types"] = list(rec.get("event_types") or [])
    out["event_categories"] = list(rec.get("event_categories") or [])
    out["retry_policy"] = rec.get("retry_policy") or _retry_dict(None)
    out["disable_after_failures"] = rec.get("disable_after_failures") or DEFAULT_DISABLE_AFTER
    out["consecutive_failures"] = int(rec.get("consecutive_failures") or 0)
    # Header values never leave the server.
    out["headers"] = {name: MASK for name in rec["headers"]} if rec.get("headers") else None
    for name in ("last_triggered_at", "last_success_at", "last_failure_at"):
        ms = rec.get(f"{name}_ms")
        out[name] = iso(ms) if isinstance(ms, int) else None
    return out


def event_data(rec: dict[str, Any], *, previous: str | None = None, new: str | None = None,
               changed: list[str] | None = None) -> dict[str, Any]:
    """EventDataWebhookLifecycle."""
    data: dict[str, Any] = {"subscription_id": rec.get("subscription_id"), "tenant_id": rec.get("tenant_id"),
                            "changed_fields": list(changed or [])}
    if previous is not None:
        data["previous_status"] = previous
    if new is not None:
        data["new_status"] = new
    return data


# ---- list filters (shared by the list routes and the bulk action) ----

def check_event_type(event_type: str | None) -> str | None:
    if event_type is None:
        return None
    if event_type not in EVENT_TYPES and not event_type.startswith("custom."):
        raise invalid(f"event_type must be a known event type; {event_type[:128]!r} is not")
    return event_type


def matches(rec: dict[str, Any], *, status: str | None = None, event_type: str | None = None,
            search: str | None = None) -> bool:
    """status exact; event_type: the subscription selects it (by type or by its category); search:
    case-insensitive substring of subscription_id or url."""
    if status is not None and rec.get("status") != status:
        return False
    if event_type is not None and event_type not in (rec.get("event_types") or ()) \
            and event_type.split(".", 1)[0] not in (rec.get("event_categories") or ()):
        return False
    if search is not None and search not in str(rec.get("subscription_id") or "").lower() \
            and search not in str(rec.get("url") or "").lower():
        return False
    return True


def sort_key(sort_by: str) -> Any:
    if sort_by == "consecutive_failures":
        return lambda r: (int(r.get("consecutive_failures") or 0), str(r.get("subscription_id") or ""))
    return lambda r: (str(r.get(sort_by) or ""), str(r.get("subscription_id") or ""))


# ---- security config ----

def security_config(doc: dict[str, Any] | None) -> WebhookSecurityConfig:
    if doc is None:
        return WebhookSecurityConfig()
    return WebhookSecurityConfig(blocked_cidr_ranges=list(doc.get("blocked_cidr_ranges") or []),
                                 allowed_url_patterns=list(doc.get("allowed_url_patterns") or []),
                                 allow_http=bool(doc.get("allow_http")))


def url_policy(doc: dict[str, Any] | None) -> urlpolicy.UrlPolicy:
    cfg = security_config(doc)
    return urlpolicy.UrlPolicy(blocked_cidr_ranges=list(cfg.blocked_cidr_ranges),
                               allowed_url_patterns=list(cfg.allowed_url_patterns), allow_http=cfg.allow_http)


async def load_url_policy(store: Any) -> urlpolicy.UrlPolicy:
    """The server's current webhook security config as a UrlPolicy (defaults when none was PUT)."""
    return url_policy(await store.get_doc(CONFIG_KIND, SECURITY_DOC_ID))


def normalize_security_config(cfg: WebhookSecurityConfig) -> dict[str, Any]:
    """Validated record of a PUT: CIDRs canonical and unique, patterns unique."""
    ranges: list[str] = []
    for raw in cfg.blocked_cidr_ranges:
        try:
            net = ipaddress.ip_network(raw.strip(), strict=False)
        except ValueError:
            raise invalid(f"blocked_cidr_ranges: {raw[:64]!r} is not a CIDR range") from None
        ranges.append(str(net))
    for pattern in cfg.allowed_url_patterns:
        if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in pattern):
            raise invalid("allowed_url_patterns must not contain whitespace or control characters")
    return {"blocked_cidr_ranges": _dedupe(ranges), "allowed_url_patterns": _dedupe(list(cfg.allowed_url_patterns)),
            "allow_http": cfg.allow_http}


# ---- for the delivery engine ----

def signing_secrets(rec: dict[str, Any], box: Any, now_ms: int) -> list[str]:
    """Plaintext secrets that sign a delivery now, newest first."""
    return [box.open(s["sealed"]) for s in live_secrets(rec, now_ms)]


def header_values(rec: dict[str, Any], box: Any) -> dict[str, str]:
    return {name: box.open(sealed) for name, sealed in (rec.get("headers") or {}).items()}
