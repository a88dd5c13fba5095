"""Named operator keys (our extension of the admin plane): every operator gets their own admin key,
audited under its own id, with granular admin:* permissions. The bootstrap key exists for the first
start; with named keys in place it can be turned off (POST /v1/admin/operator-keys/bootstrap/disable),
so rotating operator access never needs a restart."""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response

from ..protocol.admin import Name, Permission, Timestamp
from ..protocol.errors import ErrorCode, ProtocolError
from ..protocol.models import Wire
from . import access, audit
from .auth import (BOOTSTRAP_DISABLED_SETTING, OPERATOR_KIND, OPERATOR_PREFIX_LEN, Principal, has_permission,
                   new_operator_key)
from .http import Ctx, decode, json_response, read_body
from .params import bad, iso, parse_iso
from .state import state_of

OWNER = "__admin__"
AdminPermission = Permission | Literal["*"]


class OperatorKeyCreateRequest(Wire):
    name: Name
    permissions: Annotated[list[AdminPermission], Meta(min_length=1, max_length=64)] = msgspec.field(
        default_factory=lambda: ["*"])
    expires_at: Timestamp | None = None


class OperatorKey(Wire):
    key_id: str
    name: str
    key_prefix: str
    permissions: list[str]
    status: Literal["ACTIVE", "REVOKED"]
    created_at: str
    created_by: str | None = None
    expires_at: str | None = None
    revoked_at: str | None = None


class OperatorKeyCreateResponse(Wire):
    key: OperatorKey
    key_secret: str


class OperatorKeyListResponse(Wire):
    keys: list[OperatorKey]
    bootstrap_disabled: bool


def _wire(rec: dict[str, Any]) -> OperatorKey:
    return msgspec.convert({k: v for k, v in rec.items() if k in OperatorKey.__struct_fields__}, OperatorKey)


async def _operator(request: Request, ctx: Ctx) -> Principal:
    return await access.authenticate(request, ctx, allow_admin=True, allow_tenant=False)


def _grantable(creator: Principal, wanted: list[str]) -> None:
    """An operator can hand out only what they hold: no escalation through key creation."""
    if creator.is_superuser:
        return
    for perm in wanted:
        if perm == "*" or not has_permission(creator.permissions, perm):
            raise ProtocolError(ErrorCode.INSUFFICIENT_PERMISSIONS, f"cannot grant {perm}: the caller does not hold it")


async def create_operator_key(request: Request, ctx: Ctx) -> Response:
    principal = await _operator(request, ctx)
    req = decode(await read_body(request), OperatorKeyCreateRequest)
    perms = list(dict.fromkeys(req.permissions))
    _grantable(principal, perms)
    st = state_of(request)
    now = await st.store.now_ms()
    expires_ms = parse_iso(req.expires_at, "expires_at") if req.expires_at else None
    if expires_ms is not None and expires_ms <= now:
        raise bad("expires_at must be in the future")
    secret = new_operator_key()
    rec = {"key_id": "op_" + secrets.token_hex(8), "name": req.name, "key_prefix": secret[:OPERATOR_PREFIX_LEN],
           "permissions": perms, "status": "ACTIVE", "created_at": iso(now), "created_by": principal.key_id,
           "expires_at": iso(expires_ms) if expires_ms else None, "expires_at_ms": expires_ms,
           "secret_hash": await st.auth.hash_new(secret)}
    audit.resource(ctx, rec["key_id"])
    await st.store.save_doc(OPERATOR_KIND, OWNER, rec["key_prefix"], rec, None, guard_tenant=False)
    return json_response(ctx, OperatorKeyCreateResponse(key=_wire(rec), key_secret=secret), status=201)


async def list_operator_keys(request: Request, ctx: Ctx) -> Response:
    await _operator(request, ctx)
    st = state_of(request)
    rows = sorted(await st.store.list_docs(OPERATOR_KIND, OWNER), key=lambda r: (r["created_at"], r["key_id"]))
    disabled = await st.store.get_setting(BOOTSTRAP_DISABLED_SETTING) == "1"
    return json_response(ctx, OperatorKeyListResponse(keys=[_wire(r) for r in rows], bootstrap_disabled=disabled))


async def revoke_operator_key(request: Request, ctx: Ctx) -> Response:
    principal = await _operator(request, ctx)
    key_id = request.path_params["key_id"]
    st = state_of(request)
    rec = next((r for r in await st.store.list_docs(OPERATOR_KIND, OWNER) if r["key_id"] == key_id), None)
    if rec is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"Operator key {key_id[:64]} not found")
    if rec["status"] == "REVOKED":
        raise ProtocolError(ErrorCode.KEY_REVOKED, f"Operator key {key_id} is already revoked")
    _grantable(principal, rec["permissions"])
    rec = {**rec, "status": "REVOKED", "revoked_at": iso(await st.store.now_ms())}
    stored = await st.store.save_doc(OPERATOR_KIND, OWNER, rec["key_prefix"], rec, rec["version"], guard_tenant=False)
    return json_response(ctx, _wire(stored or rec))


async def disable_bootstrap(request: Request, ctx: Ctx) -> Response:
    principal = await _operator(request, ctx)
    if not principal.is_superuser:
        raise ProtocolError(ErrorCode.INSUFFICIENT_PERMISSIONS, "disabling the bootstrap key needs a '*' operator key")
    if principal.key_id == "bootstrap":
        raise bad("use a named operator key to disable the bootstrap key (so you cannot lock yourself out)")
    await state_of(request).store.put_setting(BOOTSTRAP_DISABLED_SETTING, "1", only_if_absent=False)
    return json_response(ctx, {"bootstrap_disabled": True})
