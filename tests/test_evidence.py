"""CyclesEvidence (cycles-evidence-v0.2): envelopes emitted by a real `cycles serve --evidence` on each store,
checked by an implementation of the spec's checks written here (JCS, sha256, Ed25519 with `cryptography`),
by the SDK verifier and by `cycles evidence verify`; tampering, key rotation, the public routes."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import stat
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import store_url
from support import USD, Server, Tenant, cycles_bin, new_tenant, reserve_body, start_server

from cycles.client.evidence import verify_envelope
from cycles.core import jcs

# ---- the checks, written independently of cycles.core ----


def canon(value: Any) -> str:
    """RFC 8785 for the values these envelopes hold (no floats): sorted by UTF-16 code units."""
    if isinstance(value, dict):
        names = sorted(value, key=lambda n: n.encode("utf-16-be"))
        return "{" + ",".join(json.dumps(n, ensure_ascii=False) + ":" + canon(value[n]) for n in names) + "}"
    if isinstance(value, list):
        return "[" + ",".join(canon(v) for v in value) + "]"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        assert abs(value) < 2**53
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    raise AssertionError(f"unexpected {value!r}")


def b64url_decode(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def independent_check(raw: bytes, jwks: dict[str, Any]) -> dict[str, Any]:
    """Raise AssertionError unless `raw` is a canonical envelope whose id and signature verify against the
    one JWK whose window covers issued_at_ms and whose kid the did:cycles signer names."""
    env = json.loads(raw)
    assert raw == canon(env).encode("utf-8"), "served bytes are not JCS-canonical"
    assert raw == rfc8785.dumps(env), "the rfc8785 package disagrees on the canonical bytes"
    blank = {**env, "evidence_id": "", "signature": ""}
    assert hashlib.sha256(canon(blank).encode()).hexdigest() == env["evidence_id"], "content id mismatch"
    prefix, _, kid = env["signer_did"].partition("#")
    assert prefix == "did:cycles:" + hashlib.sha256(env["server_id"].encode()).hexdigest()
    [key] = [k for k in jwks["keys"] if k["kid"] == kid]
    assert key["cycles_nbf_ms"] <= env["issued_at_ms"] and (key.get("cycles_exp_ms") is None
                                                            or env["issued_at_ms"] < key["cycles_exp_ms"])
    public = Ed25519PublicKey.from_public_bytes(b64url_decode(key["x"]))
    try:
        public.verify(bytes.fromhex(env["signature"]), canon({**env, "signature": ""}).encode())
    except InvalidSignature:
        raise AssertionError("signature does not verify") from None
    assert list(env["payload"]) == [env["artifact_type"]]
    return env


# ---- servers ----

PUBLIC_PER_MINUTE = 80  # per source address: the tests fetch from 127.0.0.1, the throttle test from 127.0.0.2


@pytest.fixture(scope="session")
def ev_server(store_kind: str, tmp_path_factory: pytest.TempPathFactory,
              request: pytest.FixtureRequest) -> Iterator[tuple[Server, Path]]:
    """A `cycles serve --evidence` per store: the embedded store makes its key ring beside the database;
    the Redis one is given a ring file, as a fleet would be."""
    from cycles.server.evidence_keys import create_file

    tmp = tmp_path_factory.mktemp(f"evidence-{store_kind}")
    # error bodies by client (the default): the published SDK's get none of the members it refuses
    env = {"CYCLES_EVIDENCE": "1", "CYCLES_EVIDENCE_PUBLIC_PER_MINUTE": str(PUBLIC_PER_MINUTE),
           "CYCLES_ERROR_TRACE_ID": "auto"}
    ring = tmp / "evidence-keys.json"
    if store_kind in ("redis", "redis-cluster"):
        create_file(str(ring))
        env["CYCLES_EVIDENCE_KEYS_FILE"] = str(ring)
    srv = start_server(store_url(store_kind, tmp, request), tmp, extra_env=env)
    yield srv, ring
    srv.stop()


@pytest.fixture
def ev_tenant(ev_server: tuple[Server, Path]) -> Tenant:
    t = new_tenant(ev_server[0])
    t.budget(amount=10_000)
    return t


def jwks_of(server: Server) -> dict[str, Any]:
    r = httpx.get(server.base_url + "/v1/.well-known/cycles-jwks.json")
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"].startswith("public") and "immutable" not in r.headers["cache-control"]
    return r.json()


def fetch(ref: dict[str, str]) -> httpx.Response:
    r = httpx.get(ref["cycles_evidence_url"])
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"].startswith("public, immutable")
    return r


def attested(response: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in response.items() if k not in ("cycles_evidence", "remaining_ttl_ms")}


# ---- tests ----


def test_lifecycle_envelopes_verify_independently(ev_server: tuple[Server, Path], ev_tenant: Tenant) -> None:
    server, _ = ev_server
    jwks = jwks_of(server)
    assert all("d" not in k for k in jwks["keys"])
    with ev_tenant.client() as c:
        c.headers["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        body = reserve_body(ev_tenant, 1000, ttl_ms=30_000, metadata={"run": "r1", "n": 3})
        reserved = c.post("/v1/reservations", json=body).json()
        rid = reserved["reservation_id"]
        committed = c.post(f"/v1/reservations/{rid}/commit",
                           json={"idempotency_key": uuid.uuid4().hex, "actual": {"unit": USD, "amount": 700}}).json()
        other = c.post("/v1/reservations", json=reserve_body(ev_tenant, 500)).json()
        released = c.post(f"/v1/reservations/{other['reservation_id']}/release",
                          json={"idempotency_key": uuid.uuid4().hex, "reason": "not needed"}).json()
        decide_body = {k: v for k, v in reserve_body(ev_tenant, 100).items()}
        decided = c.post("/v1/decide", json=decide_body).json()
        dry = c.post("/v1/reservations", json=reserve_body(ev_tenant, 10**9, dry_run=True)).json()
        denied = c.post("/v1/reservations", json=reserve_body(ev_tenant, 10**9))
        late = c.post(f"/v1/reservations/{rid}/release", json={"idempotency_key": uuid.uuid4().hex})
        detail = c.get(f"/v1/reservations/{rid}").json()
    assert dry["decision"] == "DENY"
    assert denied.status_code == 409 and late.status_code == 409
    cases = [("reserve", body, reserved), ("commit", None, committed), ("release", None, released),
             ("decide", decide_body, decided), ("reserve", None, dry),
             ("error", None, denied.json()), ("error", None, late.json())]
    for artifact, request, response in cases:
        env = independent_check(fetch(response["cycles_evidence"]).content, jwks)
        assert env["artifact_type"] == artifact and env["server_id"] == server.base_url + "/v1"
        assert env["evidence_id"] == response["cycles_evidence"]["evidence_id"]
        inner = env["payload"][artifact]
        # the attested response is the wire response less the transport-only members
        assert inner["response"] == attested(response)
        if request is not None:
            assert inner["request"] == request
        assert verify_envelope(env, jwks).disposition == "authentic"
    assert env["payload"]["error"]["reservation_id"] == rid  # the denied release names its reservation
    assert env["payload"]["error"]["endpoint"] == "POST /v1/reservations/{reservation_id}/release"
    reserve_env = json.loads(fetch(reserved["cycles_evidence"]).content)
    assert reserve_env["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    commit_env = json.loads(fetch(committed["cycles_evidence"]).content)
    assert commit_env["payload"]["commit"]["reservation_id"] == rid
    assert detail["evidence"] == {"reserve": reserved["cycles_evidence"], "commit": committed["cycles_evidence"]}
    if server.store_url.startswith("sqlite"):  # the command line, once: from the URL, the key set resolved online
        good = subprocess.run([cycles_bin(), "evidence", "verify", committed["cycles_evidence"]["cycles_evidence_url"]],
                              capture_output=True, text=True, timeout=30)
        assert good.returncode == 0 and good.stdout.startswith("ok: authentic: commit evidence"), good.stderr


def test_replays_answer_the_original_envelope(ev_server: tuple[Server, Path], ev_tenant: Tenant) -> None:
    with ev_tenant.client() as c:
        body = reserve_body(ev_tenant, 100)
        first, again = (c.post("/v1/reservations", json=body).json() for _ in range(2))
        assert first["cycles_evidence"] == again["cycles_evidence"]
        commit = {"idempotency_key": uuid.uuid4().hex, "actual": {"unit": USD, "amount": 100}}
        a, b = (c.post(f"/v1/reservations/{first['reservation_id']}/commit", json=commit).json() for _ in range(2))
        assert a["cycles_evidence"] == b["cycles_evidence"] != first["cycles_evidence"]


def test_concurrent_retries_agree_on_one_envelope(ev_server: tuple[Server, Path], ev_tenant: Tenant) -> None:
    from concurrent.futures import ThreadPoolExecutor

    body = reserve_body(ev_tenant, 100)

    def send(_: int) -> dict[str, Any]:
        with ev_tenant.client() as c:
            r = c.post("/v1/reservations", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(8)))
    assert len({a["reservation_id"] for a in answers}) == 1
    assert len({a["cycles_evidence"]["evidence_id"] for a in answers}) == 1
    fetch(answers[0]["cycles_evidence"])


def test_tampered_envelopes_fail(ev_server: tuple[Server, Path], ev_tenant: Tenant, tmp_path: Path) -> None:
    server, _ = ev_server
    jwks = jwks_of(server)
    with ev_tenant.client() as c:
        ref = c.post("/v1/reservations", json=reserve_body(ev_tenant, 100)).json()["cycles_evidence"]
    env = json.loads(fetch(ref).content)
    forged = copy.deepcopy(env)
    forged["payload"]["reserve"]["request"]["estimate"]["amount"] = 1
    assert verify_envelope(forged, jwks).disposition == "malformed"
    with pytest.raises(AssertionError, match="content id"):
        independent_check(canon(forged).encode(), jwks)
    # a forger who recomputes the content id still cannot sign
    forged["evidence_id"] = hashlib.sha256(canon({**forged, "evidence_id": "", "signature": ""}).encode()).hexdigest()
    assert verify_envelope(forged, jwks).disposition == "signature_invalid"
    with pytest.raises(AssertionError, match="signature"):
        independent_check(canon(forged).encode(), jwks)
    # ... and a key of its own is not in the server's key set
    other_server = {**env, "server_id": "https://elsewhere.example/v1"}
    assert verify_envelope(other_server, jwks).disposition in ("malformed", "signer_authority_failed")
    if not server.store_url.startswith("sqlite"):
        return  # the command line is the same whatever the store: run it once
    path = tmp_path / "forged.json"
    path.write_text(json.dumps(forged))
    out = subprocess.run([cycles_bin(), "evidence", "verify", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("error: signature_invalid") and len(out.stderr.strip().splitlines()) == 1


def test_rotation_keeps_old_envelopes_verifiable(ev_server: tuple[Server, Path], ev_tenant: Tenant) -> None:
    from cycles.server.evidence_keys import rotate

    server, ring = ev_server
    with ev_tenant.client() as c:
        old_ref = c.post("/v1/reservations", json=reserve_body(ev_tenant, 100)).json()["cycles_evidence"]
        old_kid = json.loads(fetch(old_ref).content)["signer_did"].split("#")[1]
        rotate(str(ring), int(time.time() * 1000))  # what `cycles evidence rotate-key --in 0` does
        assert stat.S_IMODE(os.stat(ring).st_mode) == 0o600
        time.sleep(1.3)  # servers read a changed ring within a second
        new_ref = c.post("/v1/reservations", json=reserve_body(ev_tenant, 100)).json()["cycles_evidence"]
    jwks = jwks_of(server)
    kids = {k["kid"]: k for k in jwks["keys"]}
    assert kids[old_kid]["status"] == "retired" and kids[old_kid]["cycles_exp_ms"] is not None
    new_env = independent_check(fetch(new_ref).content, jwks)
    assert new_env["signer_did"].split("#")[1] != old_kid
    old_env = independent_check(fetch(old_ref).content, jwks)
    assert verify_envelope(old_env, jwks).ok and verify_envelope(new_env, jwks).ok
    # the key ring keeps only the public half of a key whose window has closed
    [old_entry] = [k for k in json.loads(ring.read_text())["keys"] if k["kid"] == old_kid]
    assert "x" in old_entry and "d" not in old_entry


def test_public_route_reveals_only_the_envelope(ev_server: tuple[Server, Path], ev_tenant: Tenant) -> None:
    server, _ = ev_server
    snoop = new_tenant(server)
    with ev_tenant.client() as c:
        ref = c.post("/v1/reservations", json=reserve_body(ev_tenant, 100)).json()["cycles_evidence"]
    anon = httpx.get(ref["cycles_evidence_url"])
    with snoop.client() as c:
        as_other = c.get(ref["cycles_evidence_url"])
    assert anon.content == as_other.content  # a key changes nothing: the id is the capability
    assert "x-cycles-tenant" not in anon.headers
    env = json.loads(anon.content)
    assert set(env) <= {"schema_version", "artifact_type", "server_id", "signer_did", "issued_at_ms", "trace_id",
                        "payload", "evidence_id", "signature"}
    text = anon.text
    assert ev_tenant.tenant_id in text and snoop.tenant_id not in text and ev_tenant.key not in text
    missing = [httpx.get(f"{server.base_url}/v1/evidence/{hashlib.sha256(s).hexdigest()}") for s in (b"a", b"b")]
    assert [r.status_code for r in missing] == [404, 404]
    assert {r.json()["message"] for r in missing} == {"No evidence with this id"}
    assert httpx.get(f"{server.base_url}/v1/evidence/NOT-AN-ID").status_code == 400
    ring = Path(server.store_url.replace("sqlite:///", "")).parent / "evidence-keys.json" \
        if server.store_url.startswith("sqlite") else ev_server[1]
    secrets_ = [k["d"] for k in json.loads(ring.read_text())["keys"] if "d" in k]
    assert secrets_ and not any(s in server.log() for s in secrets_)
    assert not any(s in httpx.get(server.base_url + "/v1/.well-known/cycles-jwks.json").text for s in secrets_)


def test_embedded_store_makes_a_private_key_ring(ev_server: tuple[Server, Path]) -> None:
    server, _ = ev_server
    if not server.store_url.startswith("sqlite"):
        pytest.skip("the embedded store's own key ring")
    ring = Path(server.store_url.replace("sqlite:///", "")).parent / "evidence-keys.json"
    assert stat.S_IMODE(os.stat(ring).st_mode) == 0o600


def test_public_routes_are_rate_limited(ev_server: tuple[Server, Path]) -> None:
    server, _ = ev_server
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as c:
        codes = [c.get(f"{server.base_url}/v1/evidence/{'0' * 64}").status_code for _ in range(PUBLIC_PER_MINUTE)]
        limited = c.get(server.base_url + "/v1/.well-known/cycles-jwks.json")
    # (a minute boundary during the loop starts a new window: then fewer than all were counted in this one)
    assert set(codes) <= {404, 429} and codes[0] == 404
    assert limited.status_code == 429 and limited.json()["error"] == "LIMIT_EXCEEDED"
    assert int(limited.headers["retry-after"]) >= 1 and "x-ratelimit-reset" in limited.headers
    assert httpx.get(server.base_url + "/v1/.well-known/cycles-jwks.json").status_code == 200  # others unaffected


def test_public_limit_is_one_per_redis_store_and_per_process_on_sqlite(ev_server: tuple[Server, Path],
                                                                      store_kind: str, tmp_path: Path) -> None:
    server, ring = ev_server
    env = {"CYCLES_EVIDENCE": "1", "CYCLES_EVIDENCE_PUBLIC_PER_MINUTE": str(PUBLIC_PER_MINUTE)}
    shared = store_kind.startswith("redis")  # one primary or a cluster: one store, one allowance
    if shared:
        env["CYCLES_EVIDENCE_KEYS_FILE"] = str(ring)
    second = start_server(server.store_url, tmp_path, extra_env=env)
    try:
        if time.time() % 60 > 55:  # the shared window is the wall-clock minute: do not straddle two
            time.sleep(60 - time.time() % 60 + 0.1)
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3")) as c:
            codes = [c.get(f"{srv.base_url}/v1/evidence/{'0' * 64}").status_code
                     for _ in range(PUBLIC_PER_MINUTE // 2) for srv in (server, second)]
            assert set(codes) == {404}
            over = [c.get(f"{srv.base_url}/v1/evidence/{'0' * 64}").status_code for srv in (server, second)]
    finally:
        second.stop()
    # Redis: both servers count against one allowance; the embedded store: each process has its own
    assert over == ([429, 429] if shared else [404, 404])


def test_off_by_default(server: Server, tenant: Tenant) -> None:
    tenant.budget(amount=1000)
    with tenant.client() as c:
        r = c.post("/v1/reservations", json=reserve_body(tenant, 100))
        denied = c.post("/v1/reservations", json=reserve_body(tenant, 10**9))
    assert r.status_code == 200 and "cycles_evidence" not in r.json()
    assert denied.status_code == 409 and "cycles_evidence" not in denied.json()


def test_openapi_describes_the_routes(ev_server: tuple[Server, Path]) -> None:
    doc = httpx.get(ev_server[0].base_url + "/openapi.json").json()
    for path, op_id in (("/v1/evidence/{evidence_id}", "getEvidence"),
                        ("/v1/.well-known/cycles-jwks.json", "getEvidenceJwks")):
        assert doc["paths"][path]["get"]["operationId"] == op_id
        assert doc["paths"][path]["get"]["security"] == []


# ---- the canonicalizer against an independent implementation ----

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(_json)
def test_jcs_matches_rfc8785(value: Any) -> None:
    try:
        expected = rfc8785.dumps(value)
    except rfc8785.CanonicalizationError:
        with pytest.raises(jcs.CanonicalizationError):
            jcs.dumps(value)
        return
    assert jcs.dumps(value) == expected


def test_jcs_numbers() -> None:
    cases = {1e21: "1e+21", 1e20: "100000000000000000000", 1e-7: "1e-7", 1e-6: "0.000001", -0.0: "0",
             5e-324: "5e-324", 1.7976931348623157e308: "1.7976931348623157e+308", 0.1: "0.1",
             123.456: "123.456", 2**60: "1152921504606847000"}
    for value, text in cases.items():
        assert jcs.dumps(value).decode() == text


def test_wire_models_match_the_evidence_mirrors() -> None:
    """The projection (core.evidence) copies these nested objects as they are: their wire models must keep
    exactly the members of cycles-evidence-v0.2's mirrors, or the projection has to learn them."""
    from cycles.protocol import models as m

    mirrors = {
        m.Subject: {"tenant", "workspace", "app", "workflow", "agent", "toolset", "dimensions"},
        m.Amount: {"unit", "amount"}, m.SignedAmount: {"unit", "amount"},
        m.Balance: {"scope", "scope_path", "remaining", "reserved", "spent", "allocated", "debt", "overdraft_limit",
                    "is_over_limit"},
        m.Caps: {"max_tokens", "max_steps_remaining", "tool_allowlist", "tool_denylist", "cooldown_ms"},
        m.StandardMetrics: {"tokens_input", "tokens_output", "latency_ms", "model_version", "custom"},
    }
    for model, fields in mirrors.items():
        assert set(model.__struct_fields__) == fields, model.__name__
    assert {"kind", "name", "tags"} <= set(m.Action.__struct_fields__)


_SDK_PROGRAM = r"""
import json, sys, uuid
import runcycles

base_url, api_key, tenant, journal = sys.argv[1:5]
config = runcycles.CyclesConfig(base_url=base_url, api_key=api_key, tenant=tenant, journal_dir=journal,
                                retry_enabled=False)
client = runcycles.CyclesClient(config)
runcycles.set_default_client(client)

@runcycles.cycles(estimate=100, actual=60, action_kind="llm.completion", action_name="m")
def guarded():
    return "ran"

out = {"guarded": guarded()}
big = client.create_reservation({"idempotency_key": str(uuid.uuid4()), "subject": {"tenant": tenant},
                                 "action": {"kind": "llm.completion", "name": "m"},
                                 "estimate": {"unit": "USD_MICROCENTS", "amount": 10**12}})
err = big.get_error_response()
out["denied"] = [big.status, err.error if err is not None else None]
print(json.dumps(out))
"""


def test_published_sdk_works_with_evidence_on(ev_server: tuple[Server, Path], ev_tenant: Tenant,
                                              tmp_path: Path) -> None:
    """runcycles 0.5.3 checks reserve and commit answers strictly (extra="forbid"): it accepts their
    cycles_evidence; its error model refuses the member, which its requests therefore do not get."""
    from published_sdk import ensure_runcycles

    server, _ = ev_server
    if not server.store_url.startswith("sqlite"):
        pytest.skip("the wire is the same on every store")
    python = ensure_runcycles()
    run = subprocess.run([python, "-c", _SDK_PROGRAM, server.base_url, ev_tenant.key, ev_tenant.tenant_id,
                          str(tmp_path / "journal")], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"guarded": "ran", "denied": [409, "BUDGET_EXCEEDED"]}
    assert not list((tmp_path / "journal").glob("*.json"))  # the commit was accepted: nothing left to retry
    with ev_tenant.client() as c:
        [row] = c.get("/v1/reservations", params={"include": "evidence", "status": "COMMITTED"}).json()["reservations"]
    assert set(row["evidence"]) == {"reserve", "commit"}


def test_redis_store_needs_shared_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers sharing a Redis store must share their signing keys: `cycles serve --evidence` refuses to start
    without them (a StartupError is one line and its exit code, 3, like every startup failure)."""
    from cycles import startup
    from cycles.evidence_cli import ensure_keys

    for name in ("CYCLES_EVIDENCE_SIGNING_KEY", "CYCLES_EVIDENCE_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(startup.StartupError) as info:
        ensure_keys("redis://127.0.0.1:1/0", True)
    assert info.value.code == startup.EXIT_CONFIG and "--evidence on a Redis store needs" in info.value.message
    ensure_keys("redis://127.0.0.1:1/0", False)  # evidence off: nothing needed
