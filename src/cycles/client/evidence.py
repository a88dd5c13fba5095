"""Verify CyclesEvidence envelopes offline: `from cycles.client.evidence import verify_envelope`.

    verdict = verify_envelope(envelope, jwks)          # parsed JSON, JSON text or bytes
    verdict.ok, verdict.disposition, verdict.reason    # 'authentic' / 'binding_only' / 'signature_invalid' / ...

Checks, per cycles-evidence-v0.2: the envelope's shape, its content id (sha256 of the JCS bytes with
`evidence_id` and `signature` empty), the Ed25519 signature over the JCS bytes with `evidence_id` set,
and, given the issuing server's JWK Set, signer authority: the one key whose validity window covers
`issued_at_ms` (did:cycles: the key named by its kid, bound to the envelope's server_id). Nothing is
fetched unless you ask for it with `load` / `resolve_jwks`.
"""

from __future__ import annotations

import json
from typing import Any

from ..core.evidence import (AUTHENTIC, AUTHORITY_FAILED, BINDING_ONLY, MALFORMED, RESOLUTION_FAILED,
                             SIGNATURE_INVALID, Verdict, jwks_url, verify)

__all__ = ["verify_envelope", "load", "resolve_jwks", "Verdict", "AUTHENTIC", "BINDING_ONLY", "SIGNATURE_INVALID",
           "AUTHORITY_FAILED", "RESOLUTION_FAILED", "MALFORMED", "SourceError"]


class SourceError(Exception):
    """A file or URL could not be read, or is not JSON."""


def _parse(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8")
    if isinstance(value, str):
        return json.loads(value, parse_constant=_no_constant)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def verify_envelope(envelope: Any, jwks: Any = None, *, expected_signer: str | None = None) -> Verdict:
    """The verification disposition of one envelope. `jwks`: the issuer's JWK Set (parsed JSON, text or
    bytes); without it only a raw-hex signer_did can be checked (binding_only)."""
    try:
        parsed = _parse(envelope)
    except (ValueError, UnicodeDecodeError) as exc:
        return Verdict(MALFORMED, f"not JSON: {exc}")
    try:
        keys = _parse(jwks) if jwks is not None else None
    except (ValueError, UnicodeDecodeError) as exc:
        return Verdict(RESOLUTION_FAILED, f"the JWK Set is not JSON: {exc}")
    return verify(parsed, keys, expected_signer=expected_signer)


def load(source: str, *, timeout: float = 10.0) -> Any:
    """Parsed JSON from a file path or an http(s) URL."""
    if source.startswith(("http://", "https://")):
        import httpx

        try:
            response = httpx.get(source, timeout=timeout, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise SourceError(f"cannot fetch {source}: {exc}") from None
        if response.status_code != 200:
            raise SourceError(f"{source} answered HTTP {response.status_code}")
        text = response.content
    else:
        try:
            with open(source, "rb") as f:
                text = f.read()
        except OSError as exc:
            raise SourceError(f"cannot read {source}: {exc.strerror}") from None
    try:
        return _parse(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceError(f"{source} is not JSON: {exc}") from None


def resolve_jwks(envelope: Any, *, timeout: float = 10.0) -> Any:
    """The JWK Set the envelope's server_id publishes ({server_id}/.well-known/cycles-jwks.json)."""
    server_id = _parse(envelope).get("server_id") if isinstance(_parse(envelope), dict) else None
    if not isinstance(server_id, str) or not server_id.startswith(("http://", "https://")):
        raise SourceError("the envelope's server_id is not an http(s) URL to resolve its JWK Set from")
    return load(jwks_url(server_id), timeout=timeout)
