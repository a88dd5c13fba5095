"""What the runtime routes cache about a tenant between requests, and why it is never stale when used.

Each tenant has a governance generation in the store (Store.governance_gen), changed in the same step as
any change to the tenant's record, its API keys or its policies. A TenantView holds the tenant's policies
as read *after* the generation it carries, so anything changed later moves the generation past it. Every
runtime operation is sent to the store with the generation of the view (and of the key principal) it was
decided with; the store refuses it (StaleGovernance) when the generation moved on, in the same atomic
step as the operation, and the route reloads and decides again. So a policy change, a suspended tenant
or a revoked key applies to the very next operation, whichever process or server made the change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.actions import has_rules
from ..store.base import Store

POLICY_KIND = "policy"
_MAX_TENANTS = 10_000


@dataclass(slots=True)
class TenantView:
    gen: int
    policies: list[dict[str, Any]] = field(default_factory=list)
    # whether any policy has an effective window (then resolving needs the store's time)
    timed: bool = False
    # whether any policy carries v0.1.26 action rules (otherwise reserve skips action evaluation)
    actions: bool = False
    # action plans already worked out from these policies (server.action_rules), by what they depend on
    plans: dict[Any, Any] = field(default_factory=dict)
    # the tenant's record as read after `gen` (None: not found or unreadable); a store that checked `gen` in
    # the operation's own transaction may use it instead of reading the record again (a change to the record
    # moves the generation). Shared by every request: never modified.
    tenant: dict[str, Any] | None = None


class GovernanceCache:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._views: dict[str, TenantView] = {}

    def cached(self, tenant: str) -> TenantView | None:
        return self._views.get(tenant)

    async def load(self, tenant: str) -> TenantView:
        gen = await self.store.governance_gen(tenant)  # first: what is read below is at least this new
        policies = await self.store.list_docs(POLICY_KIND, tenant)
        timed = any(p.get("effective_from_ms") is not None or p.get("effective_until_ms") is not None
                    for p in policies)
        view = TenantView(gen, policies, timed, any(has_rules(p) for p in policies), tenant=_usable(
            await self.store.get_tenant(tenant)))
        if len(self._views) >= _MAX_TENANTS:
            self._views.clear()
        self._views[tenant] = view
        return view

    def forget(self, tenant: str) -> None:
        self._views.pop(tenant, None)


def _usable(record: Any) -> dict[str, Any] | None:
    """A record the store may use in place of its own read; anything odd is left for the store to read and
    refuse (it fails closed on a malformed record)."""
    if isinstance(record, dict) and record.get("status") in ("ACTIVE", "SUSPENDED", "CLOSED"):
        return record
    return None
