"""Wire shapes of the CyclesEvidence routes (cycles-protocol-v0 getEvidence, getEvidenceJwks), for the
OpenAPI document. The normative envelope is cycles-evidence-v0.2.yaml; the server serves stored
envelopes byte for byte and builds them in cycles.core.evidence."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct


class CyclesEvidenceEnvelope(Struct, omit_defaults=True):
    schema_version: Literal["cycles-evidence/v0.1"]
    artifact_type: Literal["decide", "reserve", "commit", "release", "error"]
    server_id: str
    signer_did: str
    issued_at_ms: Annotated[int, Meta(ge=0)]
    payload: dict[str, Any]
    evidence_id: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
    signature: Annotated[str, Meta(pattern="^[0-9a-f]{128}$")]
    trace_id: Annotated[str, Meta(pattern="^[0-9a-f]{32}$")] | None = None


class CyclesEvidenceJwk(Struct, omit_defaults=True):
    kty: Literal["OKP"]
    crv: Literal["Ed25519"]
    x: str
    kid: str
    cycles_nbf_ms: int
    alg: Literal["EdDSA"] | None = None
    use: str | None = None
    cycles_exp_ms: int | None = None
    status: Literal["active", "retired"] | None = None


class CyclesEvidenceJwks(Struct):
    keys: list[CyclesEvidenceJwk]
