"""Authentication: tenant API keys (X-Cycles-API-Key) and operator keys (X-Admin-API-Key).

Secrets are stored as scrypt hashes. Verifying scrypt per request would cost milliseconds, so a
process-local cache remembers which presented secrets already verified against which key id; the
key record (status, expiry, permissions) is still read on every request, so revocation is immediate.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

from ..protocol.errors import ErrorCode, ProtocolError
from ..store.base import Store

KEY_PREFIX_LEN = 14  # "cyc_live_" + 5 characters, as in the reference
ADMIN_HASH_SETTING = "admin_key_hash"
BOOTSTRAP_DISABLED_SETTING = "bootstrap_admin_disabled"
OPERATOR_KIND = "operator_key"
OPERATOR_KEY_PREFIX = "cyc_op_"
OPERATOR_PREFIX_LEN = 16  # "cyc_op_" + 9 characters
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
_CACHE_MAX = 10_000


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

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    def require_scope(self, scope: str) -> None:
        """Refuse a scope outside the key's scope_filter (403, never a hint of what exists there)."""
        from ..core.scopes import within_filter

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
    def __init__(self, store: Store, admin_key: str | None, *, local: bool = False) -> None:
        self.store = store
        self._admin_key = admin_key
        # LOCAL mode (`cycles admin --store`): an in-process key for someone who already holds the
        # store itself; turning the bootstrap key off does not lock them out.
        self._local = local
        self._admin_hash: str | None = None
        self._verified: dict[bytes, str] = {}
        # last_used_at without a write per request: remembered here, written in batches by the sweeper
        self.last_used: dict[str, int] = {}

    async def load(self) -> None:
        if self._admin_key is None:
            self._admin_hash = await self.store.get_setting(ADMIN_HASH_SETTING)

    def _cached(self, fingerprint: bytes, key_id: str) -> bool:
        return self._verified.get(fingerprint) == key_id

    def _remember(self, fingerprint: bytes, key_id: str) -> None:
        if len(self._verified) >= _CACHE_MAX:
            self._verified.clear()
        self._verified[fingerprint] = key_id

    async def admin(self, presented: str) -> Principal:
        """The bootstrap key (env, or the hash stored at first start) or a named operator key.

        CYCLES_ADMIN_API_KEY may list two keys separated by a comma while a rotation rolls out; once
        every operator has a named key, `bootstrap_disabled` turns the bootstrap key off."""
        if len(presented) > 512:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "Invalid admin API key")
        if presented.startswith(OPERATOR_KEY_PREFIX):
            return await self._operator(presented)
        fingerprint = hashlib.sha256(b"admin:" + presented.encode()).digest()
        if self._admin_key is not None:
            ok = any(hmac.compare_digest(presented.encode(), k.strip().encode())
                     for k in self._admin_key.split(",") if k.strip())
        elif self._cached(fingerprint, "admin"):
            ok = True
        else:
            if self._admin_hash is None:
                await self.load()
            ok = self._admin_hash is not None and verify_secret(presented, self._admin_hash)
            if ok:
                self._remember(fingerprint, "admin")
        if ok and self._local:
            return Principal("admin", None, "local", frozenset({"*"}), name="local")
        if ok and await self.store.get_setting(BOOTSTRAP_DISABLED_SETTING) == "1":
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "The bootstrap admin key is disabled; use a named operator key")
        if not ok:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "Invalid admin API key")
        return Principal("admin", None, "bootstrap", frozenset({"*"}), name="bootstrap")

    async def _operator(self, presented: str) -> Principal:
        record = await self.store.get_doc(OPERATOR_KIND, presented[:OPERATOR_PREFIX_LEN])
        if record is None:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "Invalid admin API key")
        fingerprint = hashlib.sha256(b"operator:" + presented.encode()).digest()
        if not self._cached(fingerprint, record["key_id"]):
            if not verify_secret(presented, record["secret_hash"]):
                raise ProtocolError(ErrorCode.UNAUTHORIZED, "Invalid admin API key")
            self._remember(fingerprint, record["key_id"])
        if record.get("status") != "ACTIVE":
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "Admin API key is revoked")
        expires = record.get("expires_at_ms")
        if expires is not None and time.time() * 1000 >= expires:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "Admin API key has expired")
        return Principal("admin", None, record["key_id"], frozenset(record.get("permissions") or ()),
                         name=record.get("name"))

    async def tenant(self, presented: str) -> Principal:
        if len(presented) < KEY_PREFIX_LEN or len(presented) > 512:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "Invalid API key")
        record = await self.store.find_api_key(presented[:KEY_PREFIX_LEN])
        if record is None:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "Invalid API key")
        fingerprint = hashlib.sha256(presented.encode()).digest()
        if not self._cached(fingerprint, record["key_id"]):
            if not verify_secret(presented, record["secret_hash"]):
                raise ProtocolError(ErrorCode.UNAUTHORIZED, "Invalid API key")
            self._remember(fingerprint, record["key_id"])
        principal = principal_of(record)
        self.last_used[record["key_id"]] = int(time.time() * 1000)
        return principal

    async def flush_last_used(self) -> None:
        if self.last_used:
            batch, self.last_used = self.last_used, {}
            await self.store.touch_api_keys(batch)

    async def authenticate(self, headers: Any, *, allow_admin: bool = False, allow_tenant: bool = True) -> Principal:
        tenant_key = headers.get("x-cycles-api-key")
        admin_key = headers.get("x-admin-api-key")
        if tenant_key and allow_tenant:
            return await self.tenant(tenant_key)
        if admin_key and allow_admin:
            return await self.admin(admin_key)
        wanted = " or ".join(h for h, ok in (("X-Cycles-API-Key", allow_tenant), ("X-Admin-API-Key", allow_admin)) if ok)
        raise ProtocolError(ErrorCode.UNAUTHORIZED, f"Missing {wanted} header")


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
                     tuple(record.get("scope_filter") or ()), record.get("name"))
