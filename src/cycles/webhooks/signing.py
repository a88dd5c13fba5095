"""Signing webhook deliveries, and verifying them (for receivers and tests).

Every POST carries two signature schemes over the exact body bytes:

* `X-Cycles-Signature: sha256=<lowercase hex HMAC-SHA256(secret, body)>` — the governance spec's header
  (cycles-governance-admin v0.1.25, WebhookSubscription SECURITY). The spec defines a single
  `sha256=<hex>` value, so it is signed with the NEWEST secret that is still valid.
* Standard Webhooks (https://www.standardwebhooks.com): `webhook-id` (the delivery id, stable across
  retries), `webhook-timestamp` (unix seconds of this attempt) and
  `webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, one space-separated
  entry per valid secret, so a receiver keeps verifying through a secret rotation. The timestamp is
  signed: receivers can refuse old messages (replays).

Keys: the Cycles header uses the secret's UTF-8 bytes (as the reference server). For Standard Webhooks
a secret of the form `whsec_<base64>` is used as the base64-decoded bytes after the prefix (the Standard
Webhooks convention; standard or URL-safe alphabet, padding optional); any other secret as its UTF-8 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from typing import Iterable, Mapping

CYCLES_HEADER = "X-Cycles-Signature"
DEFAULT_TOLERANCE_S = 300


def cycles_signature(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def standard_key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        raw = secret[len("whsec_"):]
        padded = raw + "=" * (-len(raw) % 4)
        try:
            if "-" in raw or "_" in raw:
                return base64.urlsafe_b64decode(padded)
            return base64.b64decode(padded, validate=True)
        except (binascii.Error, ValueError):
            pass
    return secret.encode()


def standard_signature(msg_id: str, timestamp: int, body: bytes, secret: str) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(standard_key(secret), signed, hashlib.sha256).digest()).decode()


def sign_headers(body: bytes, secrets: list[str], msg_id: str, timestamp: int | None = None) -> dict[str, str]:
    """The signature headers of one attempt. `secrets`: the valid plaintext secrets, newest first.
    Without any secret the message goes unsigned (only `webhook-id` / `webhook-timestamp`)."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(ts)}
    if secrets:
        headers[CYCLES_HEADER] = cycles_signature(body, secrets[0])
        headers["webhook-signature"] = " ".join(standard_signature(msg_id, ts, body, s) for s in secrets)
    return headers


# ---- verification (receivers) ----

def verify_cycles(body: bytes, header: str | None, secrets: Iterable[str]) -> bool:
    if not header:
        return False
    given = header.strip()
    return any(hmac.compare_digest(given, cycles_signature(body, s)) for s in secrets)


def verify_standard(body: bytes, headers: Mapping[str, str], secrets: Iterable[str], *,
                    tolerance_s: int = DEFAULT_TOLERANCE_S, now: float | None = None) -> bool:
    """`headers` with lowercase names (or any case-insensitive mapping). Refuses a timestamp more than
    `tolerance_s` away from now, in either direction."""
    msg_id, ts, sig = headers.get("webhook-id"), headers.get("webhook-timestamp"), headers.get("webhook-signature")
    if not msg_id or not ts or not sig:
        return False
    try:
        stamp = int(ts)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - stamp) > tolerance_s:
        return False
    given = [part.split(",", 1)[1] for part in sig.split() if part.startswith("v1,")]
    for secret in secrets:
        expected = standard_signature(msg_id, stamp, body, secret).split(",", 1)[1]
        if any(hmac.compare_digest(expected, g) for g in given):
            return True
    return False
