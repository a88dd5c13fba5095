"""Sealing webhook secrets and custom header values at rest (AES-256-GCM).

The key comes from CYCLES_WEBHOOK_SECRET_KEY (32 bytes, base64 or hex). Without it the server
refuses to start unless CYCLES_WEBHOOK_ALLOW_PLAINTEXT=1 says plaintext storage is acceptable
(development); sealed values then carry a `plain:` prefix so turning encryption on later still
reads them, and they are re-sealed on the next write.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_ENV = "CYCLES_WEBHOOK_SECRET_KEY"
PLAINTEXT_ENV = "CYCLES_WEBHOOK_ALLOW_PLAINTEXT"
_SEALED = "enc:v1:"
_PLAIN = "plain:"


class SecretKeyMissing(RuntimeError):
    pass


def _decode_key(raw: str) -> bytes:
    raw = raw.strip()
    for decode in (bytes.fromhex, lambda s: base64.b64decode(s, validate=True),
                   lambda s: base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))):
        try:
            key = decode(raw)
        except (ValueError, binascii.Error):
            continue
        if len(key) == 32:
            return key
    raise SecretKeyMissing(f"{KEY_ENV} must be 32 bytes, hex or base64 encoded")


class SecretBox:
    def __init__(self, key: bytes | None) -> None:
        self._aead = AESGCM(key) if key is not None else None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "SecretBox":
        env = dict(os.environ) if env is None else env
        raw = env.get(KEY_ENV)
        if raw:
            return cls(_decode_key(raw))
        if env.get(PLAINTEXT_ENV, "").lower() in ("1", "true", "yes"):
            return cls(None)
        raise SecretKeyMissing(
            f"webhook secrets need an encryption key: set {KEY_ENV} (32 random bytes, base64), "
            f"or {PLAINTEXT_ENV}=1 to store them in plaintext (development only)")

    @property
    def encrypts(self) -> bool:
        return self._aead is not None

    def seal(self, plaintext: str) -> str:
        if self._aead is None:
            return _PLAIN + plaintext
        nonce = os.urandom(12)
        return _SEALED + base64.b64encode(nonce + self._aead.encrypt(nonce, plaintext.encode(), None)).decode()

    def open(self, sealed: str) -> str:
        if sealed.startswith(_PLAIN):
            return sealed[len(_PLAIN):]
        if not sealed.startswith(_SEALED) or self._aead is None:
            raise ValueError("sealed value cannot be opened with this server's key configuration")
        blob = base64.b64decode(sealed[len(_SEALED):])
        return self._aead.decrypt(blob[:12], blob[12:], None).decode()
