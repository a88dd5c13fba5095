"""CyclesEvidence on the server: envelopes for decide / reserve / commit / release and their denials,
the public envelope and key-set routes (cycles-protocol-v0 getEvidence, getEvidenceJwks).

Off unless the operator turns it on (`cycles serve --evidence`, CYCLES_EVIDENCE=1): signing costs CPU
on every runtime request, and the `cycles_evidence` reference it adds to responses breaks strict clients
(the runcycles 0.5.3 SDK refuses unknown members on error bodies; MCP server 0.6.1 passes it into tool
output its own schema forbids). With it off, the runtime routes pay one attribute check.

When on, an operation's envelope is built from the request as submitted and the response as answered
(core.evidence), signed, and stored before the response leaves, so the `evidence_id` a caller receives
always resolves. An idempotent replay answers the original envelope's reference (found by a link from
the operation's idempotency key); a denial (409/410/429 after evaluation) gets an `error` envelope of
its own. Errors raised before anything was decided (validation, authentication) get none.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ..core import evidence as E
from ..protocol import models as m
from ..protocol.errors import ErrorCode, ProtocolError
from ..store.base import Outcome, Store
from .evidence_keys import KeyRing
from .http import Ctx, error_body, json_response, raw_json_response
from .state import state_of
from .throttle import PublicLimit

log = logging.getLogger("cycles.server")

# Denials an `error` envelope attests: reached after evaluation, codes of the spec's error mirror.
DENIALS = frozenset({
    ErrorCode.BUDGET_EXCEEDED, ErrorCode.BUDGET_FROZEN, ErrorCode.BUDGET_CLOSED, ErrorCode.RESERVATION_EXPIRED,
    ErrorCode.RESERVATION_FINALIZED, ErrorCode.OVERDRAFT_LIMIT_EXCEEDED, ErrorCode.DEBT_OUTSTANDING,
    ErrorCode.UNIT_MISMATCH, ErrorCode.LIMIT_EXCEEDED, ErrorCode.TENANT_CLOSED})
_EVIDENCE_ID = re.compile(r"^[0-9a-f]{64}$")
IMMUTABLE = {"Cache-Control": "public, immutable, max-age=31536000"}
JWKS_CACHE = {"Cache-Control": "public, max-age=300"}


class Evidence:
    """The server's evidence settings: whether it emits, its identity (server_id), its keys, and the
    throttle of the public routes (per source address and minute: shared by every server of a Redis store,
    per process on the embedded store; throttle.PublicLimit)."""

    def __init__(self, ring: KeyRing | None, server_id: str, *, emit: bool, public_per_minute: int = 600) -> None:
        if emit and ring is None:
            raise ValueError("emitting evidence needs signing keys")
        self.ring = ring
        self.server_id = server_id
        self.emit = emit
        self.throttle = PublicLimit("evidence", public_per_minute)
        self._dids: dict[str, str] = {}
        self._warned = 0.0

    def ref(self, evidence_id: str) -> m.CyclesEvidenceRef:
        return m.CyclesEvidenceRef(evidence_id=evidence_id,
                                   cycles_evidence_url=E.evidence_url(self.server_id, evidence_id))

    async def record(self, store: Store, artifact: str, payload: dict[str, Any], *, trace_id: str,
                     issued_at_ms: int, links: list[str]) -> str | None:
        """Sign and store one envelope; the id that links[0] points at (this one, or one emitted first
        by a concurrent same-key request). None when no key may sign now (logged)."""
        assert self.ring is not None
        key = self.ring.signer(issued_at_ms)
        if key is None:
            if time.monotonic() - self._warned > 60:
                self._warned = time.monotonic()
                log.error("no evidence signing key is valid now (%d); responses carry no cycles_evidence until the "
                          "key ring has one", issued_at_ms)
            return None
        did = self._dids.get(key.kid)
        if did is None:
            did = self._dids[key.kid] = E.signer_did(self.server_id, key.kid)
        assert key.private is not None
        sealed = E.seal(artifact, payload, server_id=self.server_id, did=did, issued_at_ms=issued_at_ms,
                        trace_id=trace_id, key=key.private)
        return await store.put_evidence(sealed.evidence_id, sealed.body, links)


def _link(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def reservation_links(rid: str) -> list[str]:
    return [_link("rsv", rid, artifact) for artifact in ("reserve", "commit", "release")]


def _now_ms(out: Outcome | None) -> int:
    return out.now_ms if out is not None and out.now_ms > 0 else time.time_ns() // 1_000_000


async def stamp(request: Request, ctx: Ctx, artifact: str, raw: bytes, body: Any, out: Outcome, *,
                tenant: str | None, rid: str | None = None) -> None:
    """Emit (or, on a replay, find) the envelope of a successful operation and set `body.cycles_evidence`."""
    st = state_of(request)
    ev: Evidence = st.evidence
    submitted = msgspec.json.decode(raw)
    key = _link("op", tenant or "", artifact, rid or "", submitted.get("idempotency_key") or "")
    if out.replay:
        found = (await st.store.evidence_links([key]))[0]
        if found is not None:
            body.cycles_evidence = ev.ref(found)
            return
    response = msgspec.to_builtins(body)
    if artifact == "reserve" and rid is None:
        rid = response.get("reservation_id")
    payload = E.payload(artifact, submitted, response, reservation_id=rid)
    links = [key] + ([_link("rsv", rid, artifact)] if rid else [])
    evidence_id = await ev.record(st.store, artifact, payload, trace_id=ctx.trace_id, issued_at_ms=_now_ms(out),
                                  links=links)
    if evidence_id is not None:
        body.cycles_evidence = ev.ref(evidence_id)


async def stamp_denial(request: Request, ctx: Ctx, endpoint: str, raw: bytes, err: ProtocolError, *,
                       rid: str | None = None) -> None:
    """An `error` envelope for a denial; its reference rides on the error (http.error_body)."""
    if err.code not in DENIALS:
        return
    st = state_of(request)
    ev: Evidence = st.evidence
    response = msgspec.to_builtins(error_body(ctx, err))
    payload = E.payload("error", msgspec.json.decode(raw), response, reservation_id=rid, endpoint=endpoint,
                        http_status=err.status)
    try:
        evidence_id = await ev.record(st.store, "error", payload, trace_id=ctx.trace_id,
                                      issued_at_ms=_now_ms(None), links=[])
    except Exception:  # noqa: BLE001 - the caller needs its denial more than its receipt of it
        log.warning("could not store the evidence of a %s denial (request_id=%s)", err.code.value, ctx.request_id,
                    exc_info=True)
        return
    if evidence_id is not None:
        err.evidence = ev.ref(evidence_id)  # type: ignore[attr-defined]


async def reservation_evidence(ev: Evidence, store: Store, rids: list[str]) -> list[m.ReservationEvidence | None]:
    """ReservationEvidence of each reservation (None where it has none): the spec's `evidence` member."""
    links = [link for rid in rids for link in reservation_links(rid)]
    ids = await store.evidence_links(links)
    out: list[m.ReservationEvidence | None] = []
    for i in range(len(rids)):
        found = {artifact: ev.ref(evidence_id)
                 for artifact, evidence_id in zip(("reserve", "commit", "release"), ids[3 * i:3 * i + 3]) if evidence_id}
        out.append(m.ReservationEvidence(**found) if found else None)
    return out


# ---- the public routes ----


async def _throttle(request: Request, ev: Evidence) -> None:
    source = request.client.host if request.client else "?"
    wait = await ev.throttle.retry_after(state_of(request).store, source)
    if wait is not None:
        raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, "Too many evidence requests from this address; retry later",
                            headers={"Retry-After": str(wait), "X-RateLimit-Reset": str(int(time.time()) + wait)})


async def get_evidence(request: Request, ctx: Ctx) -> Response:
    """Public: the envelope exactly as emitted. The id is a sha256 capability; nothing but the envelope
    (which the caller's receipt already binds to) is revealed, and an unknown id answers one fixed 404."""
    st = state_of(request)
    await _throttle(request, st.evidence)
    evidence_id = request.path_params["evidence_id"]
    if not _EVIDENCE_ID.match(evidence_id):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "evidence_id must be 64 lowercase hex characters")
    body = await st.store.get_evidence(evidence_id)
    if body is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, "No evidence with this id")
    return raw_json_response(ctx, body, IMMUTABLE)


async def get_jwks(request: Request, ctx: Ctx) -> Response:
    st = state_of(request)
    ev: Evidence = st.evidence
    await _throttle(request, ev)
    if ev.ring is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, "This server does not publish a CyclesEvidence JWK Set")
    ctx.extra_headers.update(JWKS_CACHE)
    return json_response(ctx, ev.ring.jwks())
