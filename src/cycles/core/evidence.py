"""CyclesEvidence (cycles-evidence-v0.2.yaml): the signed, content-addressed envelope, pure functions.

An envelope attests one lifecycle event (decide / reserve / commit / release, or the `error` a denial
answered). `evidence_id` = lowercase hex sha256 of the JCS bytes of the envelope with `evidence_id` and
`signature` both "" (present, empty); `signature` = Ed25519 over the JCS bytes with `evidence_id` set and
`signature` still "". `signer_did` is `did:cycles:<hex sha256(server_id)>#<kid>`, resolved against the
server's JWK Set (`{server_id}/.well-known/cycles-jwks.json`) by the key whose validity window covers
`issued_at_ms`: never "the current key", so rotated keys keep verifying what they signed.

Payloads are projections onto the spec's mirror schemas (additionalProperties: false): a wire field the
mirror does not list (transport metadata such as `cycles_evidence` and `remaining_ttl_ms`, or fields of
later protocol extensions) is not attested.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import jcs

SCHEMA_VERSION = "cycles-evidence/v0.1"
ARTIFACT_TYPES = ("decide", "reserve", "commit", "release", "error")
ENDPOINTS = {"decide": "POST /v1/decide", "reserve": "POST /v1/reservations",
             "commit": "POST /v1/reservations/{reservation_id}/commit",
             "release": "POST /v1/reservations/{reservation_id}/release"}
ENVELOPE_FIELDS = frozenset({"schema_version", "artifact_type", "server_id", "signer_did", "issued_at_ms",
                             "trace_id", "payload", "evidence_id", "signature"})
# ErrorResponseMirror.error: the codes an `error` envelope may carry
ERROR_CODES = frozenset({
    "INVALID_REQUEST", "UNAUTHORIZED", "FORBIDDEN", "NOT_FOUND", "BUDGET_EXCEEDED", "BUDGET_FROZEN", "BUDGET_CLOSED",
    "RESERVATION_EXPIRED", "RESERVATION_FINALIZED", "IDEMPOTENCY_MISMATCH", "UNIT_MISMATCH",
    "OVERDRAFT_LIMIT_EXCEEDED", "DEBT_OUTSTANDING", "MAX_EXTENSIONS_EXCEEDED", "LIMIT_EXCEEDED", "TENANT_CLOSED",
    "INTERNAL_ERROR"})
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX128 = re.compile(r"^[0-9a-f]{128}$")
_DID = re.compile(r"^did:cycles:([0-9a-f]{64})#(.+)$")

# The mirror schemas' field lists (cycles-evidence-v0.2.yaml `*Mirror`), for projection.
_ACTION = ("kind", "name", "tags")
_REQUESTS = {
    "decide": ("idempotency_key", "subject", "action", "estimate", "metadata"),
    "reserve": ("idempotency_key", "subject", "action", "estimate", "ttl_ms", "grace_period_ms", "overage_policy",
                "dry_run", "metadata"),
    "commit": ("idempotency_key", "actual", "metrics", "metadata"),
    "release": ("idempotency_key", "reason"),
}
_RESPONSES = {
    "decide": ("decision", "caps", "reason_code", "retry_after_ms", "affected_scopes"),
    "reserve": ("decision", "affected_scopes", "reservation_id", "reserved", "caps", "reason_code", "retry_after_ms",
                "expires_at_ms", "scope_path", "balances"),
    "commit": ("status", "charged", "released", "balances"),
    "release": ("status", "released", "balances"),
    "error": ("error", "message", "request_id", "trace_id", "details"),
}
# Nested objects whose wire model has members its mirror lacks (protocol extensions add to Action). The
# others (Subject, Amount, Balance, Caps, StandardMetrics) are decoded or rendered with exactly the mirror's
# members (cycles.protocol.models forbids unknown fields), so they are copied as they are.
_NESTED = {"action": _ACTION}


def _pick(obj: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in fields:
        value = obj.get(name)
        if value is None:
            continue  # absent, never null (mirrors forbid null)
        sub = _NESTED.get(name)
        out[name] = value if sub is None or not isinstance(value, dict) else \
            {k: value[k] for k in sub if value.get(k) is not None}
    return out


def request_mirror(artifact: str, body: dict[str, Any]) -> dict[str, Any]:
    """The request body as submitted, projected onto the artifact's request mirror."""
    return _pick(body, _REQUESTS[artifact])


def response_mirror(artifact: str, body: dict[str, Any]) -> dict[str, Any]:
    """The wire response projected onto its mirror: transport metadata (cycles_evidence,
    remaining_ttl_ms) and anything else the mirror does not list is left out."""
    return _pick(body, _RESPONSES[artifact])


def payload(artifact: str, request: dict[str, Any], response: dict[str, Any], *,
            reservation_id: str | None = None, endpoint: str | None = None, http_status: int | None = None,
            ) -> dict[str, Any]:
    """The envelope's `payload`: {artifact: {...}}; for `error`, `endpoint` is the lifecycle artifact
    whose request failed ("decide", "reserve", "commit" or "release")."""
    if artifact == "error":
        assert endpoint is not None and http_status is not None
        body: dict[str, Any] = {"endpoint": ENDPOINTS[endpoint], "http_status": http_status,
                                "request": request_mirror(endpoint, request),
                                "response": response_mirror("error", response)}
        if endpoint in ("commit", "release"):
            body["reservation_id"] = reservation_id
        return {"error": body}
    body = {"request": request_mirror(artifact, request), "response": response_mirror(artifact, response)}
    if artifact in ("commit", "release"):
        body = {"reservation_id": reservation_id, **body}
    return {artifact: body}


# ---- identity and keys ----


def server_id_hash(server_id: str) -> str:
    """lowerhex(sha256(server_id)): the exact UTF-8 bytes, no URL normalization (spec: NORMATIVE)."""
    return hashlib.sha256(server_id.encode("utf-8")).hexdigest()


def signer_did(server_id: str, kid: str) -> str:
    return f"did:cycles:{server_id_hash(server_id)}#{kid}"


def jwks_url(server_id: str) -> str:
    """{server_id}/.well-known/cycles-jwks.json, collapsing only a doubled '/' at the join."""
    return server_id.rstrip("/") + "/.well-known/cycles-jwks.json" if server_id.endswith("/") else \
        server_id + "/.well-known/cycles-jwks.json"


def evidence_url(server_id: str, evidence_id: str) -> str:
    return f"{server_id.rstrip('/')}/evidence/{evidence_id}"


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    if not isinstance(text, str) or "=" in text:
        raise ValueError("not unpadded base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def jwk(public: bytes, kid: str, nbf_ms: int, exp_ms: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": kid,
                           "x": b64url(public), "cycles_nbf_ms": nbf_ms,
                           "status": "active" if exp_ms is None else "retired"}
    if exp_ms is not None:
        out["cycles_exp_ms"] = exp_ms
    return out


# ---- sealing ----


def _top(fields: dict[str, Any], payload_bytes: str, evidence_id: str, signature: str) -> bytes:
    """The canonical envelope from its canonical payload: the top-level members are fixed, so they are
    written in their (sorted) order around the payload, which is canonicalized once for both passes."""
    parts = ['{"artifact_type":', jcs._quote(fields["artifact_type"]),
             ',"evidence_id":', jcs._quote(evidence_id),
             ',"issued_at_ms":', str(fields["issued_at_ms"]),
             ',"payload":', payload_bytes,
             ',"schema_version":', jcs._quote(fields["schema_version"]),
             ',"server_id":', jcs._quote(fields["server_id"]),
             ',"signature":', jcs._quote(signature),
             ',"signer_did":', jcs._quote(fields["signer_did"])]
    if fields.get("trace_id") is not None:
        parts += [',"trace_id":', jcs._quote(fields["trace_id"])]
    parts.append("}")
    return "".join(parts).encode("utf-8")


@dataclass(slots=True)
class Sealed:
    evidence_id: str
    body: bytes  # the complete envelope, JCS-canonical (what getEvidence serves, byte for byte)


def seal(artifact: str, payload_obj: dict[str, Any], *, server_id: str, did: str, issued_at_ms: int,
         trace_id: str | None, key: Ed25519PrivateKey) -> Sealed:
    fields = {"schema_version": SCHEMA_VERSION, "artifact_type": artifact, "server_id": server_id,
              "signer_did": did, "issued_at_ms": int(issued_at_ms), "trace_id": trace_id}
    if not 0 <= fields["issued_at_ms"] < jcs.SAFE_INTEGER:
        raise ValueError("issued_at_ms out of range")
    canon_payload = jcs.dumps(payload_obj).decode("utf-8")
    evidence_id = hashlib.sha256(_top(fields, canon_payload, "", "")).hexdigest()
    signature = key.sign(_top(fields, canon_payload, evidence_id, "")).hex()
    return Sealed(evidence_id, _top(fields, canon_payload, evidence_id, signature))


# ---- verification ----

AUTHENTIC, BINDING_ONLY = "authentic", "binding_only"
SIGNATURE_INVALID = "signature_invalid"
AUTHORITY_FAILED, RESOLUTION_FAILED = "signer_authority_failed", "signer_resolution_failed"
MALFORMED = "malformed"  # not an envelope (shape, canonical form or content id): tampered or broken


@dataclass(slots=True)
class Verdict:
    disposition: str
    reason: str
    evidence_id: str | None = None
    kid: str | None = None

    @property
    def ok(self) -> bool:
        return self.disposition in (AUTHENTIC, BINDING_ONLY)


def content_id(envelope: dict[str, Any]) -> str:
    return hashlib.sha256(jcs.dumps({**envelope, "evidence_id": "", "signature": ""})).hexdigest()


def check_shape(envelope: Any) -> str | None:
    """Why `envelope` is not a CyclesEvidence envelope, or None."""
    if not isinstance(envelope, dict):
        return "not a JSON object"
    missing = sorted({"schema_version", "artifact_type", "server_id", "signer_did", "issued_at_ms", "payload",
                      "evidence_id", "signature"} - envelope.keys())
    if missing:
        return f"missing {', '.join(missing)}"
    extra = sorted(envelope.keys() - ENVELOPE_FIELDS)
    if extra:
        return f"unknown member {extra[0]}"
    if envelope["schema_version"] != SCHEMA_VERSION:
        return f"schema_version {envelope['schema_version']!r} is not {SCHEMA_VERSION}"
    artifact = envelope["artifact_type"]
    if artifact not in ARTIFACT_TYPES:
        return f"artifact_type {artifact!r} is not one of {', '.join(ARTIFACT_TYPES)}"
    payload_obj = envelope["payload"]
    if not isinstance(payload_obj, dict) or list(payload_obj) != [artifact]:
        return f"payload must hold exactly the key {artifact!r}"
    if not isinstance(envelope["issued_at_ms"], int) or isinstance(envelope["issued_at_ms"], bool) \
            or envelope["issued_at_ms"] < 0:
        return "issued_at_ms is not a non-negative integer"
    for name in ("server_id", "signer_did"):
        if not isinstance(envelope[name], str) or not envelope[name]:
            return f"{name} is not a string"
    if not isinstance(envelope["evidence_id"], str) or not _HEX64.match(envelope["evidence_id"]):
        return "evidence_id is not 64 lowercase hex digits"
    if not isinstance(envelope["signature"], str) or not _HEX128.match(envelope["signature"]):
        return "signature is not 128 lowercase hex digits"
    if artifact == "error":
        err = payload_obj["error"]
        if not isinstance(err, dict) or not isinstance(err.get("response"), dict) \
                or err["response"].get("error") not in ERROR_CODES:
            return "payload.error.response.error is not an error code of the mirror"
    return None


def _select(jwks: Any, envelope: dict[str, Any]) -> tuple[bytes | None, str | None, str]:
    """Key selection of CyclesEvidenceJwks: (public key, kid, reason); key None = authority failed."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        return None, None, "the JWK Set has no keys array"
    issued = envelope["issued_at_ms"]
    did = envelope["signer_did"]
    match = _DID.match(did)
    raw_hex = bytes.fromhex(did) if _HEX64.match(did) else None
    if match is None and raw_hex is None:
        return None, None, f"signer_did {did!r} is neither did:cycles nor a raw hex key"
    if match is not None and match.group(1) != server_id_hash(envelope["server_id"]):
        return None, None, "signer_did does not bind to this envelope's server_id"
    kids = [k.get("kid") for k in jwks["keys"] if isinstance(k, dict)]
    if len(kids) != len(set(kids)):
        return None, None, "the JWK Set repeats a kid"
    candidates: list[tuple[bytes, str]] = []
    for key in jwks["keys"]:
        if not isinstance(key, dict) or key.get("kty") != "OKP" or key.get("crv") != "Ed25519":
            continue
        if "alg" in key and key["alg"] != "EdDSA":
            continue
        nbf, exp = key.get("cycles_nbf_ms"), key.get("cycles_exp_ms")
        if not isinstance(nbf, int) or isinstance(nbf, bool) or (exp is not None and not isinstance(exp, int)):
            continue
        try:
            public = b64url_decode(key.get("x"))
        except (ValueError, binascii.Error, TypeError):
            continue
        if len(public) != 32:
            continue
        if not (nbf <= issued and (exp is None or issued < exp)):
            continue
        if match is not None and key.get("kid") != match.group(2):
            continue
        if raw_hex is not None and public != raw_hex:
            continue
        candidates.append((public, str(key.get("kid"))))
    if len(candidates) != 1:
        what = "no" if not candidates else "more than one"
        return None, None, f"{what} key of the JWK Set is valid for this signer at issued_at_ms {issued}"
    return candidates[0][0], candidates[0][1], ""


def verify(envelope: Any, jwks: Any = None, *, expected_signer: str | None = None) -> Verdict:
    """Verify an envelope (parsed JSON). With `jwks` (a parsed JWK Set): signer authority too, the
    `authentic` disposition; without it only a raw-hex `signer_did` can be checked (`binding_only`)."""
    problem = check_shape(envelope)
    if problem:
        return Verdict(MALFORMED, problem)
    try:
        derived = content_id(envelope)
    except jcs.CanonicalizationError as exc:
        return Verdict(MALFORMED, f"no canonical form: {exc}")
    if derived != envelope["evidence_id"]:
        return Verdict(MALFORMED, f"content id mismatch: the envelope says {envelope['evidence_id']}, its content "
                                  f"hashes to {derived} (tampered)")
    did = envelope["signer_did"]
    kid = None
    if jwks is not None:
        public, kid, why = _select(jwks, envelope)
        if public is None:
            return Verdict(AUTHORITY_FAILED, why, derived)
    elif _HEX64.match(did):
        public = bytes.fromhex(did)
    else:
        return Verdict(RESOLUTION_FAILED, f"signer_did {did} needs the server's JWK Set to resolve", derived)
    signing_input = jcs.dumps({**envelope, "signature": ""})
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(bytes.fromhex(envelope["signature"]), signing_input)
    except InvalidSignature:
        return Verdict(SIGNATURE_INVALID, "the Ed25519 signature does not verify (tampered or another key)", derived,
                       kid)
    if jwks is not None:
        return Verdict(AUTHENTIC, "content id, signature and signer authority verified", derived, kid)
    pinned = expected_signer is not None and expected_signer == did
    if expected_signer is not None and not pinned:
        return Verdict(AUTHORITY_FAILED, f"signer_did is not the expected signer {expected_signer}", derived)
    return Verdict(BINDING_ONLY, "content id and signature verified; signer authority not resolved"
                   + (" (pinned signer matched)" if pinned else ""), derived)
