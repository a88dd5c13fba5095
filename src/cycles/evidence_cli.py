"""`cycles evidence ...`: verify envelopes offline, rotate the signing key; and the key set-up of `cycles serve`."""

from __future__ import annotations

import os
import time
from typing import Optional

import typer

from . import startup

app = typer.Typer(help="CyclesEvidence: verify signed envelopes, rotate the signing key (docs/evidence.md).",
                  no_args_is_help=True)

EXIT_INVALID = 1  # the envelope does not verify (tampered, wrong key, not authorized)


@app.command()
def verify(
    source: str = typer.Argument(..., help="The envelope: a file, or a URL such as {server_id}/evidence/{id}."),
    jwks: Optional[str] = typer.Option(None, "--jwks", help="The issuer's JWK Set (file or URL). Default: the key set "
                                       "published under the envelope's server_id."),
    no_resolve: bool = typer.Option(False, "--no-resolve", help="Do not fetch the JWK Set: check the content id and "
                                    "a raw hex signer only (binding_only)."),
    expected_signer: Optional[str] = typer.Option(None, help="Pin the signer_did the envelope must carry."),
) -> None:
    """Check an envelope's canonical form, content id and Ed25519 signature (and, with the issuer's JWK Set,
    that the key was the server's for the envelope's time). One line; exit 0 when it verifies, 1 when it
    does not, 5 when the envelope or key set cannot be fetched."""
    from .client.evidence import RESOLUTION_FAILED, SourceError, load, resolve_jwks, verify_envelope

    try:
        envelope = load(source)
        keys = None
        if jwks is not None:
            keys = load(jwks)
        elif not no_resolve:
            keys = resolve_jwks(envelope)
    except SourceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(startup.EXIT_UNREACHABLE) from None
    verdict = verify_envelope(envelope, keys, expected_signer=expected_signer)
    if verdict.ok:
        artifact = envelope.get("artifact_type") if isinstance(envelope, dict) else "?"
        key = f", key {verdict.kid}" if verdict.kid else ""
        typer.echo(f"ok: {verdict.disposition}: {artifact} evidence {verdict.evidence_id}{key}")
        return
    typer.echo(f"error: {verdict.disposition}: {verdict.reason}", err=True)
    raise typer.Exit(startup.EXIT_UNREACHABLE if verdict.disposition == RESOLUTION_FAILED else EXIT_INVALID)


@app.command("rotate-key")
def rotate_key(
    keys: str = typer.Option(..., "--keys", help="The key ring file: CYCLES_EVIDENCE_KEYS_FILE, or for the "
                             "embedded store the key file in its data directory."),
    in_seconds: int = typer.Option(60, "--in", min=0, help="Seconds from now at which the new key takes over: "
                                   "time for every server sharing the file to get the new copy (a server reads a "
                                   "changed file within a second)."),
) -> None:
    """End the current signing key's window and start a new key's. The old key stays in the JWK Set, so
    envelopes it signed keep verifying."""
    from .server.evidence_keys import KeyRingError, rotate

    at = int(time.time() * 1000) + in_seconds * 1000
    try:
        fresh = rotate(keys, at)
    except (KeyRingError, OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(startup.EXIT_CONFIG) from None
    typer.echo(f"new signing key {fresh['kid']} from {at} (epoch ms); the previous one signs until then")


def ensure_keys(store_url: str, emit: bool) -> None:
    """Before `cycles serve` starts: the signing keys must load. The embedded store makes its key ring beside
    the database on first start; servers sharing a Redis store must be given the same keys."""
    from .server.evidence_keys import DEFAULT_FILE, FILE_ENV, KEY_ENV, KeyRing, KeyRingError, create_file

    if not (os.environ.get(KEY_ENV) or os.environ.get(FILE_ENV)):
        path = startup.sqlite_path(store_url)
        if path is None:
            if emit:
                raise startup.StartupError(
                    f"--evidence on a Redis store needs the signing key every server shares: {KEY_ENV} (a 32-byte "
                    f"Ed25519 seed, base64) or {FILE_ENV} (a key ring file, see docs/evidence.md)",
                    startup.EXIT_CONFIG)
            return
        key_file = os.path.join(os.path.dirname(os.path.abspath(path)), DEFAULT_FILE)
        try:
            if emit:
                create_file(key_file)
            elif not os.path.exists(key_file):
                return  # never turned on here: no key set to publish
        except OSError as exc:
            raise startup.StartupError(f"cannot create {key_file}: {exc.strerror}", startup.EXIT_DATA_DIR) from None
        os.environ[FILE_ENV] = key_file
    try:
        ring = KeyRing.from_env()
    except KeyRingError as exc:
        raise startup.StartupError(str(exc), startup.EXIT_CONFIG) from None
    if emit and ring is not None and ring.signer(int(time.time() * 1000)) is None:
        raise startup.StartupError("no key of the evidence key ring may sign now (every window is closed or "
                                   "not yet open, or the open key has no private part 'd')", startup.EXIT_CONFIG)
