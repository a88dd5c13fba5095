"""The CyclesEvidence signing keys: a key ring file, or one key in the environment.

Key ring file (JSON, mode 0600, never served or logged):

    {"keys": [{"kid": "20261202-a1b2c3", "d": "<base64url Ed25519 seed>", "nbf_ms": 1764633600000,
               "exp_ms": null}, ...]}

Each key is valid for [nbf_ms, exp_ms) (exp_ms null: open-ended). The server signs with the key whose
window covers the time of signing and publishes every key of the ring, retired ones included, as its JWK
Set, so envelopes signed before a rotation keep verifying. A retired key may keep only its public part
(`x` instead of `d`). `rotate` ends the open key's window at a given time and opens a new key's window
there; running servers read the file again within a second of it changing.

Sources, first found: CYCLES_EVIDENCE_SIGNING_KEY (one 32-byte seed, hex or base64; for a fleet that
shares it), CYCLES_EVIDENCE_KEYS_FILE (a ring, the same file on every server of a fleet), else, on the
embedded store, `evidence-keys.json` beside the database, made on first start.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..core import evidence as E

KEY_ENV = "CYCLES_EVIDENCE_SIGNING_KEY"
FILE_ENV = "CYCLES_EVIDENCE_KEYS_FILE"
DEFAULT_FILE = "evidence-keys.json"


class KeyRingError(ValueError):
    pass


@dataclass(slots=True)
class Key:
    kid: str
    public: bytes
    nbf_ms: int
    exp_ms: int | None
    private: Ed25519PrivateKey | None = None

    def covers(self, t_ms: int) -> bool:
        return self.nbf_ms <= t_ms and (self.exp_ms is None or t_ms < self.exp_ms)

    def __repr__(self) -> str:  # never the private part, whatever logs a Key
        return f"Key(kid={self.kid!r}, nbf_ms={self.nbf_ms}, exp_ms={self.exp_ms})"


def _seed(raw: str) -> bytes:
    raw = raw.strip()
    for decode in (bytes.fromhex, lambda s: base64.b64decode(s, validate=True), E.b64url_decode):
        try:
            seed = decode(raw)
        except (ValueError, binascii.Error):
            continue
        if len(seed) == 32:
            return seed
    raise KeyRingError(f"{KEY_ENV} must be a 32-byte Ed25519 seed, hex or base64 encoded")


def _parse(doc: Any, where: str) -> list[Key]:
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list) or not doc["keys"]:
        raise KeyRingError(f"{where}: expected {{\"keys\": [...]}} with at least one key")
    keys: list[Key] = []
    for i, item in enumerate(doc["keys"]):
        if not isinstance(item, dict):
            raise KeyRingError(f"{where}: key {i} is not an object")
        kid, nbf, exp = item.get("kid"), item.get("nbf_ms"), item.get("exp_ms")
        if not isinstance(kid, str) or not kid or "#" in kid:
            raise KeyRingError(f"{where}: key {i} needs a kid (a string without '#')")
        if not isinstance(nbf, int) or (exp is not None and (not isinstance(exp, int) or exp <= nbf)):
            raise KeyRingError(f"{where}: key {kid} needs integer nbf_ms and an exp_ms after it (or null)")
        try:
            private = Ed25519PrivateKey.from_private_bytes(E.b64url_decode(item["d"])) if item.get("d") else None
            public = E.public_bytes(private) if private else E.b64url_decode(item.get("x", ""))
            Ed25519PublicKey.from_public_bytes(public)
        except (ValueError, binascii.Error, TypeError):
            raise KeyRingError(f"{where}: key {kid} has no valid 'd' (private seed) or 'x' (public key)") from None
        keys.append(Key(kid, public, nbf, exp, private))
    if len({k.kid for k in keys}) != len(keys):
        raise KeyRingError(f"{where}: a kid appears twice")
    ordered = sorted(keys, key=lambda k: k.nbf_ms)
    for a, b in zip(ordered, ordered[1:]):
        if a.exp_ms is None or a.exp_ms > b.nbf_ms:
            raise KeyRingError(f"{where}: the windows of keys {a.kid} and {b.kid} overlap (a verifier must find "
                               "exactly one key for any time)")
    return ordered


def new_key(nbf_ms: int) -> dict[str, Any]:
    kid = time.strftime("%Y%m%d", time.gmtime(nbf_ms / 1000)) + "-" + secrets.token_hex(3)
    seed = Ed25519PrivateKey.generate().private_bytes_raw()
    return {"kid": kid, "d": E.b64url(seed), "nbf_ms": nbf_ms, "exp_ms": None}


def write_file(path: str, doc: dict[str, Any]) -> None:
    """Replace the ring file atomically, 0600 whatever the umask."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def create_file(path: str, now_ms: int | None = None) -> bool:
    """Make a ring with one new key unless the file exists; True when made."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    now = int(time.time() * 1000) if now_ms is None else now_ms
    with os.fdopen(fd, "w") as f:
        json.dump({"keys": [new_key(now)]}, f, indent=2)
        f.write("\n")
    return True


def rotate(path: str, at_ms: int, now_ms: int | None = None) -> dict[str, Any]:
    """End the open key's window at `at_ms`, open a new key's there; drop the private part of keys whose
    window ended before now (they sign nothing more; their public part stays published)."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    with open(path) as f:
        doc = json.load(f)
    keys = _parse(doc, path)
    if keys[-1].exp_ms is not None and keys[-1].exp_ms > at_ms:
        raise KeyRingError(f"{path}: a rotation at {at_ms} would overlap key {keys[-1].kid}")
    if keys[-1].nbf_ms >= at_ms:
        raise KeyRingError(f"{path}: the newest key {keys[-1].kid} starts at or after {at_ms}")
    out = []
    for item in doc["keys"]:
        item = dict(item)
        if item.get("exp_ms") is None:
            item["exp_ms"] = at_ms
        if item["exp_ms"] <= now and item.get("d"):
            item["x"] = E.b64url(E.public_bytes(Ed25519PrivateKey.from_private_bytes(E.b64url_decode(item["d"]))))
            del item["d"]
        out.append(item)
    fresh = new_key(at_ms)
    out.append(fresh)
    doc = {"keys": out}
    _parse(doc, path)
    write_file(path, doc)
    return fresh


class KeyRing:
    """The keys a server signs with and publishes; a file-backed ring is read again when it changes
    (checked at most once a second, on the signing path)."""

    def __init__(self, keys: list[Key], path: str | None = None) -> None:
        self._keys = keys
        self.path = path
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "KeyRing | None":
        env = dict(os.environ) if env is None else env
        raw = env.get(KEY_ENV)
        if raw:
            private = Ed25519PrivateKey.from_private_bytes(_seed(raw))
            public = E.public_bytes(private)
            return cls([Key("k-" + hashlib.sha256(public).hexdigest()[:16], public, 0, None, private)])
        path = env.get(FILE_ENV)
        if path:
            return cls.from_file(path)
        return None

    @classmethod
    def from_file(cls, path: str) -> "KeyRing":
        try:
            with open(path) as f:
                doc = json.load(f)
        except OSError as exc:
            raise KeyRingError(f"cannot read the evidence key ring {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise KeyRingError(f"{path} is not JSON: {exc.msg} at line {exc.lineno}") from None
        return cls(_parse(doc, path), path)

    def _file_stamp(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _refresh(self) -> None:
        if self.path is None or time.monotonic() - self._checked < 1.0:
            return
        self._checked = time.monotonic()
        stamp = self._file_stamp()
        if stamp == self._stamp or stamp is None:
            return
        try:
            fresh = KeyRing.from_file(self.path)
        except KeyRingError:
            return  # a half-edited or broken file: keep signing with what was loaded (cycles serve checks it)
        with self._lock:
            self._keys, self._stamp = fresh._keys, stamp

    def signer(self, t_ms: int) -> Key | None:
        """The key that signs at t_ms: the one whose window covers it, if its private part is here."""
        self._refresh()
        for key in self._keys:
            if key.covers(t_ms):
                return key if key.private is not None else None
        return None

    def jwks(self) -> dict[str, Any]:
        self._refresh()
        return {"keys": [E.jwk(k.public, k.kid, k.nbf_ms, k.exp_ms) for k in self._keys]}
