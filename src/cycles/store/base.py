"""The store interface. Every mutating operation is one atomic step on the store: the idempotency
check, the tenant guard, the scope lookups, the ledger checks and every write happen together or
not at all, whichever process (or machine) runs it.

Operations return an `Outcome`: the result record of the operation (plain JSON data, see
`cycles.server.render`) and whether it is a replay. The same record is what the idempotency table
keeps, so a replay renders byte-for-byte the same body, except for volatile fields.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Outcome:
    result: dict[str, Any]
    replay: bool = False
    now_ms: int = 0
    reservation_active: bool = True


@dataclass(slots=True)
class ReserveCommand:
    tenant: str
    endpoint: str  # "reserve" (live and dry run share it) or "decide"
    idempotency_key: str
    payload_hash: str
    subject: dict[str, Any]
    action: dict[str, Any]
    unit: str
    amount: int
    scope_path: str
    scopes: list[str]
    dry_run: bool = False
    ttl_ms: int | None = None
    grace_ms: int | None = None
    overage_policy: str | None = None
    metadata: dict[str, Any] | None = None


@dataclass(slots=True)
class SettleCommand:
    """commit / release / extend on one reservation."""

    tenant: str | None  # None: admin acting on behalf of the owner
    reservation_id: str
    idempotency_key: str
    payload_hash: str
    actual: int | None = None
    unit: str | None = None
    extend_by_ms: int | None = None
    metadata: dict[str, Any] | None = None
    reason: str | None = None


@dataclass(slots=True)
class EventCommand:
    tenant: str
    idempotency_key: str
    payload_hash: str
    subject: dict[str, Any]
    action: dict[str, Any]
    unit: str
    amount: int
    scope_path: str
    scopes: list[str]
    overage_policy: str | None = None
    metadata: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    client_time_ms: int | None = None


@dataclass(slots=True)
class FundCommand:
    tenant: str
    scope: str
    unit: str
    operation: str
    amount: int
    spent: int | None
    idempotency_key: str | None
    payload_hash: str
    reason: str | None = None


@dataclass(slots=True)
class ReservationQuery:
    tenant: str
    status: str | None = None
    idempotency_key: str | None = None
    subject: dict[str, str] = field(default_factory=dict)
    windows: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    sort_by: str = "created_at_ms"
    sort_dir: str = "desc"
    limit: int = 50
    after: tuple[Any, str] | None = None


@dataclass(slots=True)
class Page:
    items: list[dict[str, Any]]
    has_more: bool


class Store(abc.ABC):
    """What every store provides. Methods are coroutines so network stores fit the same shape."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def health(self) -> bool: ...

    @abc.abstractmethod
    async def now_ms(self) -> int:
        """The store's clock: the one every expiry decision uses."""

    # settings and identities
    @abc.abstractmethod
    async def get_setting(self, name: str) -> str | None: ...

    @abc.abstractmethod
    async def put_setting(self, name: str, value: str, *, only_if_absent: bool) -> str:
        """Store a setting; with only_if_absent, return whichever value won."""

    @abc.abstractmethod
    async def create_tenant(self, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Insert a tenant unless it exists; returns (stored record, created)."""

    @abc.abstractmethod
    async def get_tenant(self, tenant_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def update_tenant(self, tenant_id: str, changes: dict[str, Any], now_iso: str) -> dict[str, Any]:
        """Apply changes atomically; a CLOSED tenant is terminal (409 TENANT_CLOSED)."""

    @abc.abstractmethod
    async def create_api_key(self, record: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def find_api_key(self, prefix: str) -> dict[str, Any] | None: ...

    # budgets
    @abc.abstractmethod
    async def create_budget(self, record: dict[str, Any]) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def list_budgets(
        self, tenant: str | None, filters: dict[str, Any], limit: int, after: tuple[str, str, str] | None
    ) -> Page: ...

    @abc.abstractmethod
    async def fund(self, cmd: FundCommand) -> Outcome: ...

    # runtime
    @abc.abstractmethod
    async def reserve(self, cmd: ReserveCommand) -> Outcome: ...

    @abc.abstractmethod
    async def commit(self, cmd: SettleCommand) -> Outcome: ...

    @abc.abstractmethod
    async def release(self, cmd: SettleCommand) -> Outcome: ...

    @abc.abstractmethod
    async def extend(self, cmd: SettleCommand) -> Outcome: ...

    @abc.abstractmethod
    async def create_event(self, cmd: EventCommand) -> Outcome: ...

    @abc.abstractmethod
    async def get_reservation(self, reservation_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def list_reservations(self, query: ReservationQuery) -> Page: ...

    @abc.abstractmethod
    async def balances(
        self, tenant: str, wanted: dict[str, str], include_children: bool, limit: int, after: tuple[str, str] | None
    ) -> Page: ...

    @abc.abstractmethod
    async def expire_due(self, limit: int = 500) -> int:
        """Expire leases past expires_at + grace and return their holds; each exactly once."""

    @abc.abstractmethod
    async def count_active(self) -> int: ...

    @abc.abstractmethod
    async def purge_idempotency(self, older_than_ms: int) -> int: ...
