"""Authentication: tenant API keys (X-Cycles-API-Key) and operator keys (X-Admin-API-Key).

Secrets are stored as scrypt hashes. A verification costs tens of milliseconds of CPU, so it runs in
a small thread pool, once per presented secret and key (process-local caches remember verified and
refused secrets), and failed checks are throttled per source address and key prefix. The runtime
routes also cache a key's principal; revocation stays immediate (Authenticator.runtime).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from ..core.scopes import within_filter
from ..protocol.errors import ErrorCode, ProtocolError
from ..store.base import Store
from .govcache import GovernanceCache, TenantView
from .throttle import WindowCounter

KEY_PREFIX_LEN = 14  # "cyc_live_" + 5 characters, as in the reference
ADMIN_HASH_SETTING = "admin_key_hash"
BOOTSTRAP_DISABLED_SETTING = "bootstrap_admin_disabled"
OPERATOR_KIND = "operator_key"
OPERATOR_KEY_PREFIX = "cyc_op_"
OPERATOR_PREFIX_LEN = 16  # "cyc_op_" + 9 characters
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
_CACHE_MAX = 10_000
T = TypeVar("T")


def _remember(table: dict[bytes, str], fingerprint: bytes, key_id: str) -> None:
    """A key check's outcome, in a table bounded by _CACHE_MAX (cleared when full)."""
    if len(table) >= _CACHE_MAX:
        table.clear()
    table[fingerprint] = key_id


def hash_secret(secret: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, **_SCRYPT)
    return "scrypt$" + base64.b64encode(salt).decode() + "$" + base64.b64encode(digest).decode()


def verify_secret(secret: str, stored: str) -> bool:
    try:
        scheme, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(secret.encode(), salt=base64.b64decode(salt_b64), **_SCRYPT)
        return hmac.compare_digest(digest, base64.b64decode(digest_b64))
    except (ValueError, TypeError):
        return False


def new_tenant_key() -> str:
    return "cyc_live_" + secrets.token_urlsafe(24)


def new_operator_key() -> str:
    return OPERATOR_KEY_PREFIX + secrets.token_urlsafe(32)


def new_admin_key() -> str:
    return "cyc_admin_" + secrets.token_urlsafe(32)


@dataclass(slots=True, frozen=True)
class Principal:
    kind: str  # "tenant" | "admin"
    tenant_id: str | None
    key_id: str | None
    permissions: frozenset[str]
    scope_filter: tuple[str, ...] = ()
    name: str | None = None
    revoked_by_close: bool = False
    expires_at_ms: int | None = None

    def expired(self, now_ms: int | None = None) -> bool:
        if self.expires_at_ms is None:
            return False
        return (time.time() * 1000 if now_ms is None else now_ms) >= self.expires_at_ms

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    def require_scope(self, scope: str) -> None:
        """Refuse a scope outside the key's scope_filter (403, never a hint of what exists there)."""
        if self.scope_filter and not within_filter(scope, self.scope_filter):
            raise ProtocolError(ErrorCode.FORBIDDEN, f"API key scope_filter does not allow scope {scope}")

    @property
    def is_superuser(self) -> bool:
        return "*" in self.permissions

    def require_admin(self, permission: str) -> None:
        """Operator keys carry granular admin permissions; the bootstrap key carries them all."""
        if self.is_superuser or has_permission(self.permissions, permission):
            return
        raise ProtocolError(ErrorCode.INSUFFICIENT_PERMISSIONS, f"Admin key lacks the {permission} permission")

    def require(self, permission: str) -> None:
        if self.revoked_by_close and permission not in self.permissions:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "API key is revoked (its tenant is closed)")
        if self.is_admin or has_permission(self.permissions, permission):
            return
        raise ProtocolError(ErrorCode.FORBIDDEN, f"API key lacks the {permission} permission")


def has_permission(granted: frozenset[str], needed: str) -> bool:
    if needed in granted:
        return True
    if needed.endswith(":write") and "admin:write" in granted:
        return True
    if needed.endswith(":read") and "admin:read" in granted:
        return True
    return False


class Authenticator:
    """Checks presented keys. Every slow (scrypt) verification runs in a small thread pool, never on the
    event loop, and at most once per presented secret and key (verified and refused fingerprints are
    remembered); failed checks are throttled per source address and per key prefix (429 + Retry-After).

    For the runtime routes (`runtime`), a tenant key's principal is cached together with the tenant's
    governance view (govcache.TenantView); the store refuses an operation sent at an older governance
    generation, so a revoked key, a suspended tenant or a changed policy takes effect at once, whichever
    process or server made the change."""

    def __init__(self, store: Store, admin_key: str | None, *, local: bool = False,
                 failures_per_source: int = 20, failures_per_prefix: int = 50, verify_threads: int = 2) -> None:
        self.store = store
        self._admin_key = admin_key
        # LOCAL mode (`cycles admin --store`): an in-process key for someone who already holds the
        # store itself; turning the bootstrap key off does not lock them out.
        self._local = local
        self._admin_hash: str | None = None
        self._verified: dict[bytes, str] = {}
        self._refused: dict[bytes, str] = {}
        self._in_flight: dict[bytes, asyncio.Future[bool]] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._verify_threads = verify_threads
        self._slots = asyncio.Semaphore(verify_threads)
        self.by_source = WindowCounter(failures_per_source)
        self.by_prefix = WindowCounter(failures_per_prefix)
        self.on_failure: Callable[[str], None] = lambda outcome: None  # /metrics: refused, throttled
        # runtime principals: fingerprint -> (principal, governance generation it was read at)
        self._principals: dict[bytes, tuple[Principal, int]] = {}
        self.governance = GovernanceCache(store)
        # last_used_at without a write per request: remembered here, written in batches by the sweeper
        self.last_used: dict[str, int] = {}

    async def load(self) -> None:
        if self._admin_key is None:
            self._admin_hash = await self.store.get_setting(ADMIN_HASH_SETTING)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # ---- verification ----

    def _throttle(self, source: str | None, prefix: str) -> None:
        if (source is not None and self.by_source.over(source)) or self.by_prefix.over(prefix):
            self.on_failure("throttled")
            retry = max(self.by_source.retry_after_s(), self.by_prefix.retry_after_s())
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, "Too many failed authentication attempts; retry later",
                                status=429, headers={"Retry-After": str(retry)},
                                details={"retry_after_ms": retry * 1000})

    def _failed(self, source: str | None, prefix: str) -> None:
        self.on_failure("refused")
        if source is not None:
            self.by_source.count(source)
        self.by_prefix.count(prefix)

    async def _verify(self, fingerprint: bytes, presented: str, stored: str, key_id: str, source: str | None,
                      prefix: str) -> bool:
        """Whether `presented` matches the hash `stored` of key `key_id`."""
        if self._verified.get(fingerprint) == key_id:
            return True
        self._throttle(source, prefix)
        if self._refused.get(fingerprint) == key_id:
            self._failed(source, prefix)
            return False
        pending = self._in_flight.get(fingerprint)
        if pending is None:  # concurrent checks of the same secret share one verification
            pending = asyncio.get_running_loop().create_future()
            self._in_flight[fingerprint] = pending
            try:
                ok = await self._off_loop(verify_secret, presented, stored)
                _remember(self._verified if ok else self._refused, fingerprint, key_id)
                pending.set_result(ok)
            except BaseException as exc:
                pending.set_exception(exc)
                pending.exception()  # retrieved: a lone waiter that went away leaves no warning
                raise
            finally:
                del self._in_flight[fingerprint]
        ok = await asyncio.shield(pending)
        if not ok:
            self._failed(source, prefix)
        return ok

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """scrypt work (tens of ms) on the key-check threads, never on the event loop."""
        async with self._slots:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self._verify_threads,
                                                                   thread_name_prefix="cycles-keycheck")
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def hash_new(self, secret: str) -> str:
        """hash_secret for a key being created, off the event loop (scrypt would stall every request)."""
        return await self._off_loop(hash_secret, secret)

    async def matches(self, secret: str, stored: str) -> bool:
        """verify_secret off the event loop (the admin plane's key validation)."""
        return await self._off_loop(verify_secret, secret, stored)

    def created(self, secret: str, key_id: str) -> None:
        """A tenant key this process just created and stored: it hashed the secret itself, so the key's first
        request needs no scrypt check here (its record is still read and checked like any other's)."""
        _remember(self._verified, hashlib.sha256(secret.encode()).digest(), key_id)

    def _refuse(self, message: str, source: str | None, prefix: str) -> ProtocolError:
        self._failed(source, prefix)
        return ProtocolError(ErrorCode.UNAUTHORIZED, message)

    # ---- admin keys ----

    async def admin(self, presented: str, source: str | None = None) -> Principal:
        """The bootstrap key (env, or the hash stored at first start) or a named operator key.

        CYCLES_ADMIN_API_KEY may list two keys separated by a comma while a rotation rolls out; once
        every operator has a named key, `bootstrap_disabled` turns the bootstrap key off."""
        if len(presented) > 512:
            raise self._refuse("Invalid admin API key", source, "admin")
        if presented.startswith(OPERATOR_KEY_PREFIX):
            return await self._operator(presented, source)
        if self._admin_key is not None:
            ok = any(hmac.compare_digest(presented.encode(), k.strip().encode())
                     for k in self._admin_key.split(",") if k.strip())
            if not ok:
                self._throttle(source, "admin")
                self._failed(source, "admin")
        else:
            if self._admin_hash is None:
                await self.load()
            fingerprint = hashlib.sha256(b"admin:" + presented.encode()).digest()
            ok = self._admin_hash is not None and await self._verify(fingerprint, presented, self._admin_hash, "admin",
                                                                     source, "admin")
        if ok and self._local:
            return Principal("admin", None, "local", frozenset({"*"}), name="local")
        if ok and await self.store.get_setting(BOOTSTRAP_DISABLED_SETTING) == "1":
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "The bootstrap admin key is disabled; use a named operator key")
        if not ok:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, _wrong_kind(presented, "admin") or "Invalid admin API key")
        return Principal("admin", None, "bootstrap", frozenset({"*"}), name="bootstrap")

    async def _operator(self, presented: str, source: str | None) -> Principal:
        prefix = presented[:OPERATOR_PREFIX_LEN]
        record = await self.store.get_doc(OPERATOR_KIND, prefix)
        if record is None:
            self._throttle(source, prefix)
            raise self._refuse("Invalid admin API key", source, prefix)
        fingerprint = hashlib.sha256(b"operator:" + presented.encode()).digest()
        if not await self._verify(fingerprint, presented, record["secret_hash"], record["key_id"], source, prefix):
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "Invalid admin API key")
        if record.get("status") != "ACTIVE":
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "Admin API key is revoked")
        expires = record.get("expires_at_ms")
        if expires is not None and time.time() * 1000 >= expires:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "Admin API key has expired")
        return Principal("admin", None, record["key_id"], frozenset(record.get("permissions") or ()),
                         name=record.get("name"))

    # ---- tenant keys ----

    async def _tenant_record(self, presented: str, source: str | None) -> tuple[dict[str, Any], bytes]:
        if len(presented) < KEY_PREFIX_LEN or len(presented) > 512:
            raise self._refuse(_wrong_kind(presented, "tenant") or "Invalid API key", source, "short")
        prefix = presented[:KEY_PREFIX_LEN]
        record = await self.store.find_api_key(prefix)
        if record is None:
            self._throttle(source, prefix)
            raise self._refuse(_wrong_kind(presented, "tenant") or "Invalid API key", source, prefix)
        fingerprint = hashlib.sha256(presented.encode()).digest()
        if not await self._verify(fingerprint, presented, record["secret_hash"], record["key_id"], source, prefix):
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "Invalid API key")
        return record, fingerprint

    async def tenant(self, presented: str, source: str | None = None) -> Principal:
        record, _ = await self._tenant_record(presented, source)
        principal = principal_of(record)
        self.last_used[record["key_id"]] = int(time.time() * 1000)
        return principal

    def cached_runtime(self, presented: str) -> tuple[Principal, TenantView] | None:
        """runtime() when the cache answers it (no await: the hot routes' usual case); None otherwise."""
        hit = self._principals.get(hashlib.sha256(presented.encode()).digest())
        if hit is not None:
            principal, gen = hit
            view = self.governance.cached(principal.tenant_id or "")
            now_ms = int(time.time() * 1000)
            if view is not None and view.gen == gen and not principal.expired(now_ms):
                self.last_used[principal.key_id or ""] = now_ms
                return principal, view
        return None

    async def runtime(self, presented: str, source: str | None = None) -> tuple[Principal, TenantView]:
        """A tenant key's principal and its tenant's governance view, from the cache when both are of the
        same generation; the store checks that generation again when it acts (StaleGovernance)."""
        hit = self.cached_runtime(presented)
        if hit is not None:
            return hit
        record, fingerprint = await self._tenant_record(presented, source)
        view = await self.governance.load(record["tenant_id"])
        # read again after the generation, so the cached record is at least as new as the generation it is kept at
        record = await self.store.find_api_key(presented[:KEY_PREFIX_LEN]) or record
        principal = principal_of(record)
        if len(self._principals) >= _CACHE_MAX:
            self._principals.clear()
        self._principals[fingerprint] = (principal, view.gen)
        self.last_used[record["key_id"]] = int(time.time() * 1000)
        return principal, view

    def forget(self, tenant: str) -> None:
        """Drop what is cached about `tenant` (its generation moved on)."""
        self.governance.forget(tenant)

    async def flush_last_used(self) -> None:
        if self.last_used:
            batch, self.last_used = self.last_used, {}
            await self.store.touch_api_keys(batch)

    async def authenticate(self, headers: Any, *, allow_admin: bool = False, allow_tenant: bool = True,
                           source: str | None = None) -> Principal:
        tenant_key = headers.get("x-cycles-api-key")
        admin_key = headers.get("x-admin-api-key")
        if tenant_key and allow_tenant:
            return await self.tenant(tenant_key, source)
        if admin_key and allow_admin:
            return await self.admin(admin_key, source)
        wanted = " or ".join(h for h, ok in (("X-Cycles-API-Key", allow_tenant), ("X-Admin-API-Key", allow_admin)) if ok)
        raise ProtocolError(ErrorCode.UNAUTHORIZED, f"Missing {wanted} header")


def _wrong_kind(presented: str, wanted: str) -> str | None:
    """A hint when the key presented is plainly of the other kind (by its public prefix); still a 401."""
    if wanted == "admin" and presented.startswith("cyc_live_"):
        return ("Invalid admin API key: this is a tenant API key (send it as X-Cycles-API-Key); the admin plane "
                "needs an operator key (X-Admin-API-Key)")
    if wanted == "tenant" and presented.startswith((OPERATOR_KEY_PREFIX, "cyc_admin_")):
        return ("Invalid API key: this is an operator key (send it as X-Admin-API-Key); this route needs a tenant "
                "API key (X-Cycles-API-Key)")
    return None


# Runtime mutations keep authenticating with a key the close cascade revoked, so they reach the
# closed-tenant guard (409 TENANT_CLOSED, DENY for evaluations) and same-key replays of work done
# before the close still return their stored responses, as the conformance rules require.
_CLOSED_TENANT_RUNTIME = frozenset({"reservations:create", "reservations:commit", "reservations:release",
                                    "reservations:extend"})
CASCADE_REVOKED_REASON = "tenant closed"


def principal_of(record: dict[str, Any]) -> Principal:
    if record.get("status") == "REVOKED" and record.get("revoked_reason") == CASCADE_REVOKED_REASON:
        granted = frozenset(record.get("permissions") or ()) & _CLOSED_TENANT_RUNTIME
        return Principal("tenant", record["tenant_id"], record["key_id"], granted, (), record.get("name"),
                         revoked_by_close=True)
    if record.get("status") != "ACTIVE":
        raise ProtocolError(ErrorCode.UNAUTHORIZED, f"API key is {str(record.get('status', 'invalid')).lower()}")
    expires = record.get("expires_at_ms")
    if expires is not None and time.time() * 1000 >= expires:
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "API key has expired")
    return Principal("tenant", record["tenant_id"], record["key_id"], frozenset(record.get("permissions") or ()),
                     tuple(record.get("scope_filter") or ()), record.get("name"), expires_at_ms=expires)
