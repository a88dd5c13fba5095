"""The Redis store's key layout and the small codecs every part of it shares (docs/redis.md): the tenant
prefix with its hash tag, the global records of the admin plane on one primary, and the helpers that turn
script answers and hashes into records."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import msgspec

from ..core.ledger import Ledger

TENANTS = "cy:tenants"
_TENANT = re.compile(r"^[a-z0-9-]{1,64}$")
AUDIT_REC, AUDIT = "cy:audit:rec", "cy:audit"
EVENTS_REC, EVENTS = "cy:events:rec", "cy:events"
KEY_IDS, KEYS = "cy:apikeys:id", "cy:apikeys"
PERIODS = "cy:periods"  # zset: <tenant>|<scope>|<unit> of budgets with periods, by period_end_ms
KEYS_INDEXED = "cy:apikeys:indexed"  # set once keys stored before the key id index have been indexed
PURGE_BATCH = 1000

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def prefix(tenant: str) -> str:
    return f"cy:{{{tenant}}}:"


def tenant_of_reservation(rid: str) -> str | None:
    if not rid.startswith("rsv_") or "." not in rid:
        return None
    tenant = rid[4:rid.rindex(".")]
    return tenant if _TENANT.match(tenant) else None


def _s(obj: Any) -> str:
    return _encode(obj).decode()


def _opt(value: Any) -> str:
    return "" if value is None else str(value)


def _iso_ms(text: Any) -> int:
    try:
        return int(datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return 0


def _flat(pairs: Any) -> dict[str, str]:
    """A hash from a script (HGETALL's flat list) as a dict."""
    if not isinstance(pairs, list):
        return {}
    return dict(zip(pairs[::2], pairs[1::2]))


def _budget_row(tenant: str, h: dict[str, str]) -> dict[str, Any]:
    return {
        "tenant_id": tenant, "ledger_id": h["ledger_id"], "created_at_ms": int(h["created_at_ms"]),
        "updated_at_ms": int(h["updated_at_ms"]), "extra": _decode(h.get("extra") or "{}"),
        "commit_overage_policy": h.get("commit_overage_policy") or None,
        "ledger": Ledger(h["scope"], h["unit"], int(h["allocated"]), int(h["spent"]), int(h["reserved"]),
                         int(h["debt"]), int(h["overdraft_limit"]), h["is_over_limit"] == "1", h["status"]),
    }
