"""Small assertions shared by the conformance tests (they read our server directly, not via the proxy)."""

from __future__ import annotations

from typing import Any

from support import Tenant


def reservation(tenant: Tenant, rid: str) -> tuple[int, dict[str, Any]]:
    with tenant.client() as c:
        r = c.get(f"/v1/reservations/{rid}")
    return r.status_code, r.json()


def amounts(balance: dict[str, Any]) -> dict[str, int]:
    """allocated / spent / reserved / remaining / debt of one balance as plain ints."""
    return {k: balance[k]["amount"] for k in ("allocated", "spent", "reserved", "remaining", "debt")}


def all_balances_in(body: Any) -> list[dict[str, Any]]:
    """Every Balance object found anywhere in a response body."""
    found: list[dict[str, Any]] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            if "remaining" in v and "scope" in v:
                found.append(v)
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(body)
    return found
