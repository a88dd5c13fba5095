"""Webhook delivery (cycles.webhooks.dispatch / deliver / signing, cycles.server.webhook_delivery) against
real stores (SQLite files and Redis) and real HTTP receivers on loopback.

Covers: both signature schemes verified by the receiver (and a stale timestamp refused), at least once
across a `cycles worker` killed with SIGKILL mid-delivery, a receiver down then up (backoff), a slow
endpoint not delaying another, 4xx not retried vs 503 retried after Retry-After, auto-disable with its
webhook.disabled event (itself dispatched to an operator subscription), the SSRF check at send time,
the subscription invariants re-checked at dispatch and at send, PAUSED buffering, and the routes
(test, deliveries, replay, resend) on a `cycles serve` with its embedded worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import httpx
import pytest

from conftest import STORES
from support import WEBHOOK_KEY, Server, cycles_bin, free_port, new_tenant, start_server
from cycles.store.base import AuditScan, Store, new_event_id
from cycles.webhooks import dispatch as D
from cycles.webhooks import signing, urlpolicy
from cycles.webhooks import subscriptions as W
from cycles.webhooks import wire
from cycles.webhooks.crypto import SecretBox
from cycles.webhooks.deliver import Engine, EngineConfig, WorkerConfig, backoff_ms
from cycles.webhooks.send import parse_retry_after

BOX = SecretBox.from_env({"CYCLES_WEBHOOK_SECRET_KEY": WEBHOOK_KEY})
OPEN_CONFIG = {"blocked_cidr_ranges": ["10.0.0.0/8", "169.254.0.0/16"], "allowed_url_patterns": [], "allow_http": True}
FAST_RETRY = {"max_retries": 10, "initial_delay_ms": 100, "backoff_multiplier": 2.0, "max_delay_ms": 1000}
REDIS_DB = 11


# ---------------------------------------------------------------------------------------------
# a receiver: verifies both signature schemes, records what it got, behaves as told
# ---------------------------------------------------------------------------------------------

class Receiver:
    """HTTP receiver on 127.0.0.1. `behave(request, n)` -> (status, headers, hold_seconds), n = how many
    requests this path had before. Requests whose signatures do not verify get 401."""

    def __init__(self, secrets: list[str], behave: Callable[[dict[str, Any], int], tuple[int, dict[str, str], float]]
                 | None = None, port: int = 0) -> None:
        self.secrets = list(secrets)
        self.behave = behave or (lambda req, n: (200, {}, 0.0))
        self.requests: list[dict[str, Any]] = []
        self.delivered: dict[str, int] = {}  # event id -> 2xx answers (dedupe on the receiver side)
        self.release = threading.Event()
        self.got = threading.Event()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                req = {"path": self.path, "headers": headers, "body": body, "at": time.monotonic(),
                       "cycles_ok": signing.verify_cycles(body, headers.get("x-cycles-signature"), receiver.secrets),
                       "standard_ok": signing.verify_standard(body, headers, receiver.secrets)}
                with receiver.lock:
                    n = sum(1 for r in receiver.requests if r["path"] == self.path)
                    receiver.requests.append(req)
                receiver.got.set()
                if not (req["cycles_ok"] and req["standard_ok"]):
                    status, extra, hold = 401, {}, 0.0
                else:
                    status, extra, hold = receiver.behave(req, n)
                if hold:
                    receiver.release.wait(hold)
                try:
                    self.send_response(status)
                    for k, v in extra.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    return
                if 200 <= status < 300:
                    with receiver.lock:
                        eid = headers.get("x-cycles-event-id", "")
                        receiver.delivered[eid] = receiver.delivered.get(eid, 0) + 1

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def on(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(*args: Any, **kw: Any) -> Receiver:
        r = Receiver(*args, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


# ---------------------------------------------------------------------------------------------
# stores
# ---------------------------------------------------------------------------------------------

class Env:
    def __init__(self, kind: str, url: str) -> None:
        self.kind, self.url = kind, url

    def store(self) -> Store:
        if self.kind == "sqlite":
            from cycles.store.sqlite import SQLiteStore

            return SQLiteStore(self.url[len("sqlite:///"):])
        if self.kind == "redis-cluster":
            from cycles.store.redis_cluster import RedisClusterStore

            return RedisClusterStore(self.url)
        from cycles.store.redis import RedisStore

        return RedisStore(self.url)


def _redis_url(request: pytest.FixtureRequest) -> str:
    base = request.getfixturevalue("redis_url")
    return base.rsplit("/", 1)[0] + f"/{REDIS_DB}"


@pytest.fixture(params=STORES)
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Env:
    if request.param == "sqlite":
        return Env("sqlite", f"sqlite:///{tmp_path / 'hooks.db'}")
    if request.param == "redis-cluster":
        from redis_support import flush_cluster

        url = request.getfixturevalue("store_cluster_url")
        flush_cluster(url)
        return Env("redis-cluster", url)
    url = _redis_url(request)
    import redis as redis_py

    redis_py.Redis.from_url(url).flushdb()
    return Env("redis", url)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def until(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def wait_sync(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# helpers: subscriptions, events, the engine
# ---------------------------------------------------------------------------------------------

async def set_security(store: Store, **cfg: Any) -> None:
    current = await store.get_doc(W.CONFIG_KIND, W.SECURITY_DOC_ID)
    rec = {**OPEN_CONFIG, **cfg}
    await store.save_doc(W.CONFIG_KIND, "__system__", W.SECURITY_DOC_ID, rec,
                         None if current is None else current["version"], guard_tenant=False)


async def make_sub(store: Store, owner: str, url: str, *, secret: str | None = None, event_types: list[str] | None = None,
                   event_categories: list[str] | None = None, **fields: Any) -> tuple[dict[str, Any], str]:
    """A subscription record exactly as the CRUD routes build it (W.build_record), written directly."""
    now = await store.now_ms()
    req = wire.WebhookCreateRequest(url=url, event_types=event_types or ["budget.funded"],
                                 event_categories=event_categories, signing_secret=secret)
    rec, plain = W.build_record(req, owner, BOX, now - 1000)
    rec.update(retry_policy=dict(FAST_RETRY))
    rec.update(fields)
    stored = await store.save_doc(W.KIND, owner, rec["subscription_id"], rec, None, guard_tenant=False)
    return stored, plain


async def patch_sub(store: Store, sub_id: str, **changes: Any) -> dict[str, Any]:
    cur = await store.get_doc(W.KIND, sub_id)
    new = {**cur, **changes}
    new.pop("version")
    return await store.save_doc(W.KIND, cur["tenant_id"], sub_id, new, cur["version"], guard_tenant=False)


async def emit(store: Store, event_type: str, tenant: str, *, scope: str | None = None,
               data: dict[str, Any] | None = None) -> str:
    now = await store.now_ms()
    event_id = new_event_id(now)
    await store.append_journal([{
        "journal": "event", "event_id": event_id, "event_type": event_type, "tenant_id": tenant,
        "scope": scope if scope is not None else (f"tenant:{tenant}" if tenant != "__system__" else None),
        "data": data or {"note": "test"}, "trace_id": os.urandom(16).hex(), "request_id": "req_test",
        "actor": {"type": "admin"}, "source": "test",
    }])
    return event_id


async def deliveries(store: Store, **match: Any) -> list[dict[str, Any]]:
    return [d for d in await store.list_docs(D.DELIVERY_KIND, None) if all(d.get(k) == v for k, v in match.items())]


async def events_of(store: Store, event_type: str) -> list[dict[str, Any]]:
    rows = await store.scan_events(AuditScan(descending=False, limit=10_000))
    return [r for r in rows if r["event_type"] == event_type]


def engine_for(store: Store, **worker: Any) -> Engine:
    cfg = dict(concurrency=16, per_endpoint=4, lease_ms=10_000, timeout_ms=5_000, poll_ms=50)
    cfg.update(worker)
    return Engine(store, box=BOX, config=EngineConfig(worker=WorkerConfig(**cfg), dispatch_ms=50))


class Running:
    def __init__(self, store: Store, **worker: Any) -> None:
        self.engine = engine_for(store, **worker)

    async def __aenter__(self) -> Engine:
        self.engine.start()
        return self.engine

    async def __aexit__(self, *exc: Any) -> None:
        await self.engine.stop(grace_s=0.1)


def tenant_id() -> str:
    return "t-" + os.urandom(5).hex()


# ---------------------------------------------------------------------------------------------
# signing (pure)
# ---------------------------------------------------------------------------------------------

def test_signature_schemes_and_retry_after() -> None:
    body = b'{"event_id":"evt_1"}'
    new, old = "whsec_" + "A" * 43, "an-old-plain-secret-0123"
    h = signing.sign_headers(body, [new, old], "whdel_x", 1_700_000_000)
    assert h["X-Cycles-Signature"] == signing.cycles_signature(body, new)  # newest secret only
    assert len(h["webhook-signature"].split()) == 2  # one per valid secret
    for secret in (new, old):
        assert signing.verify_standard(body, h, [secret], now=1_700_000_100)
    assert signing.verify_cycles(body, h["X-Cycles-Signature"], [old, new])
    assert not signing.verify_cycles(body, h["X-Cycles-Signature"], [old])
    assert not signing.verify_standard(body, h, [new], now=1_700_000_000 + 301)  # stale: replay refused
    assert not signing.verify_standard(body + b" ", h, [new], now=1_700_000_000)
    assert not signing.verify_standard(body, h, ["whsec_other"], now=1_700_000_000)
    # whsec_ secrets sign with their base64-decoded bytes (Standard Webhooks); URL-safe alphabet accepted
    assert signing.standard_key("whsec_" + "QUJD") == b"ABC"
    assert signing.standard_key("whsec_-_8") == bytes([0xFB, 0xFF])
    assert signing.standard_key("plain") == b"plain"

    assert parse_retry_after("3") == 3000
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now_s=1445412480 - 10) == 10_000
    assert parse_retry_after("soon") is None
    import random

    rng = random.Random(7)
    policy = {"initial_delay_ms": 1000, "backoff_multiplier": 2.0, "max_delay_ms": 5000}
    for n, cap in ((1, 1000), (2, 2000), (3, 4000), (4, 5000), (9, 5000)):
        samples = [backoff_ms(policy, n, rng) for _ in range(200)]
        assert 0 <= min(samples) and max(samples) <= cap and max(samples) > cap * 0.8  # full jitter up to the cap


# ---------------------------------------------------------------------------------------------
# the engine against a store
# ---------------------------------------------------------------------------------------------

def test_signed_delivery_headers_and_body(env: Env, receivers: Callable[..., Receiver]) -> None:
    async def main() -> None:
        store = env.store()
        try:
            await set_security(store)
            t = tenant_id()
            old_secret = "whsec_" + "b2xkLXNlY3JldC1ieXRlcy0wMTIzNDU2Nzg5YWJjZA"
            rec, _ = await make_sub(store, t, "http://placeholder.invalid/", secret=old_secret)
            new_secret = "whsec_" + "bmV3LXNlY3JldC1ieXRlcy0wMTIzNDU2Nzg5YWJjZA"
            now = await store.now_ms()
            secrets = [{"sealed": BOX.seal(new_secret), "created_at_ms": now, "expires_at_ms": None},
                       {**rec["secrets"][0], "expires_at_ms": now + 3_600_000}]  # a rotation, in its grace period
            receiver = receivers([new_secret])
            old_only = [old_secret]
            sub = await patch_sub(store, rec["subscription_id"], url=receiver.url("/in?x=1"), secrets=secrets,
                                  headers={"Authorization": BOX.seal("Bearer tok_123")})
            async with Running(store):
                eid = await emit(store, "budget.funded", t, data={"amount": 5})
                await until(lambda: receiver.delivered, what="the delivery")
                await until(lambda: deliveries(store, status="SUCCEEDED"), what="SUCCEEDED")
            req = receiver.requests[0]
            h = req["headers"]
            assert req["cycles_ok"] and req["standard_ok"]
            assert signing.verify_standard(req["body"], h, old_only)  # receivers still on the old secret verify
            assert not signing.verify_cycles(req["body"], h["x-cycles-signature"], old_only)  # newest only there
            assert abs(int(h["webhook-timestamp"]) - time.time()) < 30
            [d] = await deliveries(store)
            assert h["webhook-id"] == h["x-cycles-delivery-id"] == d["delivery_id"] == D.delivery_id_for(eid, sub["subscription_id"])
            assert h["x-cycles-event-id"] == eid and h["x-cycles-event-type"] == "budget.funded"
            assert h["content-type"] == "application/json" and h["authorization"] == "Bearer tok_123"
            event = await store.get_event(eid)
            version, trace, span, flags = h["traceparent"].split("-")
            assert (version, trace, flags) == ("00", event["trace_id"], "01") and len(span) == 16
            body = json.loads(req["body"])
            assert body["event_id"] == eid and body["data"] == {"amount": 5} and body["tenant_id"] == t
            assert None not in body.values() and "timestamp" in body
            assert d["attempts"] == 1 and d["response_status"] == 200 and d["trace_id"] == event["trace_id"]
            stored = await store.get_doc(W.KIND, sub["subscription_id"])
            assert stored["consecutive_failures"] == 0 and stored["last_success_at_ms"]
        finally:
            await store.close()

    run(main())


def test_worker_killed_mid_delivery_is_delivered_by_another(env: Env, receivers: Callable[..., Receiver],
                                                             tmp_path: Path) -> None:
    """SIGKILL a `cycles worker` while the receiver holds its request open; another worker delivers it
    once the claim's lease runs out (at least once; the receiver dedupes on the event id)."""
    receiver = receivers([], behave=lambda req, n: (200, {}, 8.0 if n == 0 else 0.0))
    loop = asyncio.new_event_loop()  # one loop for the store's connections across the steps
    run = loop.run_until_complete
    store = env.store()
    t = tenant_id()

    async def setup() -> tuple[dict[str, Any], str]:
        await set_security(store)
        sub, secret = await make_sub(store, t, receiver.url("/hold"))
        return sub, secret

    sub, secret = run(setup())
    receiver.secrets.append(secret)
    worker_env = {**os.environ, "CYCLES_WEBHOOK_SECRET_KEY": WEBHOOK_KEY}
    args = [cycles_bin(), "worker", "--store", env.url, "--lease-ms", "2500", "--timeout-ms", "1500",
            "--poll-ms", "50", "--log-level", "warning"]
    log1 = open(tmp_path / "worker1.log", "wb")
    first = subprocess.Popen(args, env=worker_env, stdout=log1, stderr=subprocess.STDOUT)
    second = None
    try:
        eid = run(emit(store, "budget.funded", t))
        assert receiver.got.wait(20), (tmp_path / "worker1.log").read_text()
        os.kill(first.pid, signal.SIGKILL)
        first.wait(5)
        killed_at = time.monotonic()
        assert not receiver.delivered
        second = subprocess.Popen(args, env=worker_env, stdout=open(tmp_path / "worker2.log", "wb"),
                                  stderr=subprocess.STDOUT)
        wait_sync(lambda: receiver.delivered.get(eid), timeout=20, what="redelivery by the second worker")
        assert time.monotonic() - killed_at < 15

        async def check() -> None:
            [d] = await until(lambda: deliveries(store, status="SUCCEEDED"), what="SUCCEEDED")
            assert d["attempts"] == 1 and d["lost_claims"] == 1  # the lost attempt was made again, not counted twice

        run(check())
        hooks = receiver.on("/hold")
        assert len(hooks) == 2 and hooks[0]["headers"]["webhook-id"] == hooks[1]["headers"]["webhook-id"]
        assert list(receiver.delivered) == [eid]
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        run(store.close())
        loop.close()


def test_receiver_down_then_up(env: Env, receivers: Callable[..., Receiver]) -> None:
    async def main() -> None:
        store = env.store()
        try:
            await set_security(store)
            port = free_port()
            t = tenant_id()
            sub, secret = await make_sub(store, t, f"http://127.0.0.1:{port}/hook")
            async with Running(store):
                eid = await emit(store, "budget.funded", t)

                async def failed_twice() -> bool:
                    return any(d["attempts"] >= 2 and d["status"] == "PENDING" for d in await deliveries(store))

                await until(failed_twice, what="two refused attempts")
                [d] = await deliveries(store)
                assert "connect" in (d["error"] or "").lower() and d["next_attempt_at_ms"]
                receiver = receivers([secret], port=port)
                await until(lambda: receiver.delivered.get(eid), timeout=10, what="delivery after the receiver came up")
                [d] = await until(lambda: deliveries(store, status="SUCCEEDED"), what="SUCCEEDED")
                assert d["attempts"] >= 3
        finally:
            await store.close()

    run(main())


def test_slow_endpoint_does_not_delay_others(env: Env, receivers: Callable[..., Receiver]) -> None:
    async def main() -> None:
        store = env.store()
        try:
            await set_security(store)
            t = tenant_id()
            slow = receivers([], behave=lambda req, n: (200, {}, 5.0))
            fast = receivers([])
            s_sub, s_secret = await make_sub(store, t, slow.url("/slow"))
            f_sub, f_secret = await make_sub(store, t, fast.url("/fast"))
            slow.secrets.append(s_secret)
            fast.secrets.append(f_secret)
            async with Running(store, concurrency=8, per_endpoint=2):
                started = time.monotonic()
                ids = [await emit(store, "budget.funded", t, data={"i": i}) for i in range(6)]
                await until(lambda: len(fast.delivered) == 6, timeout=4, what="all 6 fast deliveries")
                took = time.monotonic() - started
                assert took < 4.0, took  # the slow endpoint sleeps 5 s per request
                assert set(fast.delivered) == set(ids)
                assert len(slow.requests) <= 2 and not slow.delivered  # its own limit, still holding
                in_flight = await deliveries(store, subscription_id=s_sub["subscription_id"], status="IN_FLIGHT")
                assert len(in_flight) == 2
                slow.release.set()
                await until(lambda: len(slow.delivered) == 6, timeout=10, what="the slow deliveries")
        finally:
            await store.close()

    run(main())


def test_4xx_not_retried_503_retried_after_retry_after(env: Env, receivers: Callable[..., Receiver]) -> None:
    def behave(req: dict[str, Any], n: int) -> tuple[int, dict[str, str], float]:
        if req["path"] == "/bad":
            return 400, {}, 0.0
        if n == 0:
            return 503, {"Retry-After": "1"}, 0.0
        return 200, {}, 0.0

    async def main() -> None:
        store = env.store()
        try:
            await set_security(store)
            t = tenant_id()
            receiver = receivers([], behave=behave)
            bad, s1 = await make_sub(store, t, receiver.url("/bad"))
            busy, s2 = await make_sub(store, t, receiver.url("/busy"))
            receiver.secrets += [s1, s2]
            async with Running(store):
                eid = await emit(store, "budget.funded", t)
                await until(lambda: receiver.delivered.get(eid), what="the 503 retried")
                await until(lambda: deliveries(store, subscription_id=bad["subscription_id"], status="FAILED"),
                            what="the 400 failed")
                await asyncio.sleep(0.5)  # nothing else comes to /bad
            assert len(receiver.on("/bad")) == 1
            first, second = receiver.on("/busy")
            assert second["at"] - first["at"] >= 0.95  # Retry-After: 1 beats a ~100 ms backoff
            [d_bad] = await deliveries(store, subscription_id=bad["subscription_id"])
            assert (d_bad["status"], d_bad["attempts"], d_bad["response_status"]) == ("FAILED", 1, 400)
            [d_busy] = await deliveries(store, subscription_id=busy["subscription_id"])
            assert (d_busy["status"], d_busy["attempts"]) == ("SUCCEEDED", 2)
            [alert] = await events_of(store, "system.webhook_delivery_failed")
            assert alert["tenant_id"] == "__system__" and alert["actor"] == {"type": "system"}
            assert alert["data"]["details"]["delivery_id"] == d_bad["delivery_id"]
            assert alert["data"]["details"]["response_status"] == 400
            assert (await store.get_doc(W.KIND, bad["subscription_id"]))["consecutive_failures"] == 1
        finally:
            await store.close()

    run(main())


def test_auto_disable_emits_webhook_disabled_which_is_dispatched(env: Env, receivers: Callable[..., Receiver]) -> None:
    async def main() -> None:
        store = env.store()
        try:
            await set_security(store)
            t = tenant_id()
            failing = receivers([], behave=lambda req, n: (500, {}, 0.0))
            ops = receivers([])
            sub, secret = await make_sub(store, t, failing.url("/down"), disable_after_failures=2,
                                         retry_policy={**FAST_RETRY, "max_retries": 0})
            failing.secrets.append(secret)
            watcher, w_secret = await make_sub(store, "__system__", ops.url("/ops"),
                                               event_types=["webhook.disabled", "system.webhook_delivery_failed"])
            ops.secrets.append(w_secret)
            async with Running(store):
                await emit(store, "budget.funded", t)
                await until(lambda: deliveries(store, subscription_id=sub["subscription_id"], status="FAILED"))
                await emit(store, "budget.funded", t)

                async def disabled() -> bool:
                    return (await store.get_doc(W.KIND, sub["subscription_id"]))["status"] == "DISABLED"

                await until(disabled, what="auto-disable")
                await until(lambda: any(json.loads(r["body"])["event_type"] == "webhook.disabled"
                                        for r in ops.requests), what="webhook.disabled delivered to the operator")
                await emit(store, "budget.funded", t)  # DISABLED: not queued
                await asyncio.sleep(0.5)
            stored = await store.get_doc(W.KIND, sub["subscription_id"])
            assert stored["consecutive_failures"] == 2 and stored["disabled_reason"] == "consecutive_failures_exceeded_threshold"
            assert len(failing.requests) == 2
            mine = await deliveries(store, subscription_id=sub["subscription_id"])
            assert len(mine) == 2 and {d["status"] for d in mine} == {"FAILED"}
            last = max(mine, key=lambda d: d["completed_at_ms"])
            [ev] = await events_of(store, "webhook.disabled")
            assert ev["correlation_id"] == f"webhook_auto_disable:{sub['subscription_id']}:{last['delivery_id']}"
            assert ev["tenant_id"] == t and ev["source"] == "webhook-dispatcher"
            assert ev["data"] == {"subscription_id": sub["subscription_id"], "tenant_id": t, "previous_status": "ACTIVE",
                                  "new_status": "DISABLED", "changed_fields": [],
                                  "disable_reason": "consecutive_failures_exceeded_threshold"}
            assert len(await events_of(store, "system.webhook_delivery_failed")) == 2
            assert all(r["standard_ok"] for r in ops.requests)
        finally:
            await store.close()

    run(main())


def test_ssrf_recheck_at_send_time(env: Env, receivers: Callable[..., Receiver]) -> None:
    async def main() -> None:
        store = env.store()
        try:
            await set_security(store)
            t = tenant_id()
            receiver = receivers([])
            url = receiver.url("/hook", host="localhost")
            # accepted when written: the permissive config lets localhost through
            assert urlpolicy.resolve(url, await W.load_url_policy(store)).addresses
            sub, secret = await make_sub(store, t, url)
            receiver.secrets.append(secret)
            await set_security(store, blocked_cidr_ranges=["127.0.0.0/8", "::1/128"])
            async with Running(store):
                await emit(store, "budget.funded", t)
                [d] = await until(lambda: deliveries(store, status="FAILED"), what="refused delivery")
            assert "blocked range" in d["error"] and d["response_status"] is None
            assert receiver.requests == []
        finally:
            await store.close()

    run(main())


def test_unsendable_stored_header_fails_with_an_honest_message(env: Env, receivers: Callable[..., Receiver]) -> None:
    """A header value stored before values were validated (non-ASCII) fails the delivery with a message that
    names the header, not CYCLES_WEBHOOK_SECRET_KEY; nothing is sent."""
    async def main() -> None:
        store = env.store()
        try:
            await set_security(store)
            t = tenant_id()
            receiver = receivers([])
            sub, secret = await make_sub(store, t, receiver.url("/hook"), headers={"X-Team": BOX.seal("équipe")})
            async with Running(store):
                await emit(store, "budget.funded", t)
                [d] = await until(lambda: deliveries(store, status="FAILED"), what="refused delivery")
            assert "custom headers cannot be sent" in d["error"] and "X-Team" in d["error"], d["error"]
            assert "U+00E9" in d["error"] and "CYCLES_WEBHOOK_SECRET_KEY" not in d["error"]
            assert receiver.requests == []
        finally:
            await store.close()

    run(main())


def test_invariants_rechecked_at_dispatch_and_send(env: Env, receivers: Callable[..., Receiver]) -> None:
    async def main() -> None:
        store = env.store()
        try:
            await set_security(store)
            t1, t2 = tenant_id(), tenant_id()
            receiver = receivers([])
            good, s1 = await make_sub(store, t1, receiver.url("/good"), event_types=["budget.funded"])
            tampered_types, s2 = await make_sub(store, t1, receiver.url("/types"))
            tampered_cats, s3 = await make_sub(store, t1, receiver.url("/cats"))
            operator, s4 = await make_sub(store, "__system__", receiver.url("/ops"), event_types=["api_key.created"])
            receiver.secrets += [s1, s2, s3, s4]
            # stored selectors tampered with directly (no route would persist these)
            await patch_sub(store, tampered_types["subscription_id"], event_types=["budget.funded", "api_key.created"])
            await patch_sub(store, tampered_cats["subscription_id"], event_types=[], event_categories=["budget", "api_key"])
            mine = await emit(store, "budget.funded", t1)
            await emit(store, "budget.funded", t2)  # another tenant's
            key_event = await emit(store, "api_key.created", t1, scope="")
            dispatcher = D.Dispatcher(store, owner="test")
            await dispatcher.run_once()
            made = {(d["subscription_id"], d["event_id"]) for d in await deliveries(store)}
            assert made == {(good["subscription_id"], mine), (operator["subscription_id"], key_event)}
            # tampered after dispatch: refused at send time, nothing sent
            await patch_sub(store, good["subscription_id"], event_types=["budget.funded", "policy.created"])
            async with Running(store):
                await until(lambda: receiver.on("/ops"), what="the operator delivery")
                [d] = await until(lambda: deliveries(store, subscription_id=good["subscription_id"], status="FAILED"))
            assert "may not receive" in d["error"] and d["attempts"] == 0
            assert receiver.on("/good") == [] and receiver.on("/types") == [] and receiver.on("/cats") == []
            # counted as no failure of the endpoint
            assert (await store.get_doc(W.KIND, good["subscription_id"]))["consecutive_failures"] == 0
        finally:
            await store.close()

    run(main())


def test_derived_events_follow_the_subscription_thresholds(env: Env) -> None:
    async def main() -> None:
        store = env.store()
        try:
            t = tenant_id()
            sub, _ = await make_sub(store, t, "http://127.0.0.1:9/never", event_types=["budget.threshold_crossed"],
                                    thresholds={"budget_utilization": [0.5]})
            wanted = await emit(store, "budget.threshold_crossed", t, data={"threshold": 0.5, "direction": "rising"})
            await emit(store, "budget.threshold_crossed", t, data={"threshold": 0.8, "direction": "rising"})
            await D.Dispatcher(store, owner="test").run_once()
            assert [d["event_id"] for d in await deliveries(store)] == [wanted]
        finally:
            await store.close()

    run(main())


def test_paused_buffers_and_disabled_fails(env: Env, receivers: Callable[..., Receiver]) -> None:
    async def main() -> None:
        store = env.store()
        try:
            await set_security(store)
            t = tenant_id()
            receiver = receivers([])
            paused, s1 = await make_sub(store, t, receiver.url("/paused"), status="PAUSED")
            doomed, s2 = await make_sub(store, t, receiver.url("/doomed"))
            receiver.secrets += [s1, s2]
            eid = await emit(store, "budget.funded", t)
            await D.Dispatcher(store, owner="test").run_once()  # deliveries created, none sent yet
            await patch_sub(store, doomed["subscription_id"], status="DISABLED", disabled_reason="by test")
            async with Running(store):
                [parked] = await until(lambda: deliveries(store, subscription_id=paused["subscription_id"], parked=True))
                assert parked["status"] == "PENDING" and parked["due_ms"] is None
                [failed] = await until(lambda: deliveries(store, subscription_id=doomed["subscription_id"],
                                                          status="FAILED"))
                assert "DISABLED" in failed["error"]
                await asyncio.sleep(0.5)
                assert receiver.requests == []  # buffered, not sent, not dropped
                await patch_sub(store, paused["subscription_id"], status="ACTIVE")
                await until(lambda: receiver.delivered.get(eid), timeout=8, what="delivery after resume")
            assert receiver.on("/doomed") == []
        finally:
            await store.close()

    run(main())


def test_graceful_stop_hands_claims_and_the_lead_back(env: Env, receivers: Callable[..., Receiver]) -> None:
    async def main() -> None:
        store = env.store()
        try:
            await set_security(store)
            t = tenant_id()
            receiver = receivers([], behave=lambda req, n: (200, {}, 5.0))
            sub, secret = await make_sub(store, t, receiver.url("/hold"))
            receiver.secrets.append(secret)
            engine = engine_for(store)
            engine.start()
            await emit(store, "budget.funded", t)
            await until(lambda: receiver.requests, what="the held request")
            await engine.stop(grace_s=0.1)
            [d] = await deliveries(store)
            assert (d["status"], d["attempts"], d["lease_owner"]) == ("PENDING", 0, None) and d["due_ms"]
            assert (await store.get_doc(D.DISPATCH_KIND, D.CURSOR_ID))["lease_until_ms"] == 0
        finally:
            await store.close()

    run(main())


def test_two_dispatchers_never_duplicate(env: Env) -> None:
    async def main() -> None:
        store, other = env.store(), env.store()
        try:
            await set_security(store)
            t = tenant_id()
            sub, _ = await make_sub(store, t, "http://127.0.0.1:9/never")
            ids = [await emit(store, "budget.funded", t, data={"i": i}) for i in range(30)]
            a, b = D.Dispatcher(store, owner="a"), D.Dispatcher(other, owner="b")
            await asyncio.gather(a.run_once(), b.run_once(), a.run_once(), b.run_once())
            # the standby takes over once the leader's lease is gone, and re-reads the window: still no duplicate
            cur = await store.get_doc(D.DISPATCH_KIND, D.CURSOR_ID)
            await store.save_doc(D.DISPATCH_KIND, "__system__", D.CURSOR_ID, {**{k: v for k, v in cur.items() if k != "version"},
                                 "lease_until_ms": 0}, cur["version"], guard_tenant=False)
            loser = b if cur["owner"] == "a" else a
            await loser.run_once()
            made = await deliveries(store)
            assert sorted(d["event_id"] for d in made) == sorted(ids)
            assert all(d["delivery_id"] == D.delivery_id_for(d["event_id"], sub["subscription_id"]) for d in made)
            assert (await store.get_doc(D.DISPATCH_KIND, D.CURSOR_ID))["owner"] == loser.owner
        finally:
            await store.close()
            await other.close()

    run(main())


# ---------------------------------------------------------------------------------------------
# the routes, on `cycles serve` with its embedded worker
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=STORES)
def hook_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp(f"hooks-{request.param}")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'cycles.db'}"
    else:
        url = _redis_url(request)
        import redis as redis_py

        redis_py.Redis.from_url(url).flushdb()
    srv = start_server(url, tmp, extra_env={"CYCLES_WEBHOOK_POLL_MS": "50", "CYCLES_WEBHOOK_LEASE_MS": "10000",
                                            "CYCLES_WEBHOOK_TIMEOUT_MS": "5000"})
    with srv.admin() as c:
        r = c.put("/v1/admin/config/webhook-security", json=OPEN_CONFIG)
        assert r.status_code == 200, r.text
    yield srv
    srv.stop()


def _tenant_sub(srv: Server, receiver: Receiver, path: str, **body: Any) -> tuple[Any, str, dict[str, Any]]:
    tenant = new_tenant(srv, permissions=["budgets:read", "budgets:write", "webhooks:read", "webhooks:write"])
    with tenant.client() as c:
        r = c.post("/v1/webhooks", json={"url": receiver.url(path), "event_types": ["budget.funded"],
                                         "retry_policy": {"max_retries": 3, "initial_delay_ms": 100,
                                                          "max_delay_ms": 1000}, **body})
    assert r.status_code == 201, r.text
    out = r.json()
    receiver.secrets.append(out["signing_secret"])
    return tenant, out["subscription"]["subscription_id"], out


def test_routes_test_probe(hook_server: Server, receivers: Callable[..., Receiver]) -> None:
    receiver = receivers([], behave=lambda req, n: (500 if req["path"] == "/fails" else 200, {}, 0.0))
    tenant, sid, _ = _tenant_sub(hook_server, receiver, "/probe")
    other, other_sid, _ = _tenant_sub(hook_server, receiver, "/fails")
    with hook_server.admin() as admin, tenant.client() as c:
        r = admin.post(f"/v1/admin/webhooks/{sid}/test")
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["success"] is True and out["response_status"] == 200 and out["event_id"].startswith("evt_")
        [req] = receiver.on("/probe")
        body = json.loads(req["body"])
        assert req["cycles_ok"] and req["standard_ok"]
        assert body["event_type"] == "system.webhook_test" and body["event_id"] == out["event_id"]
        assert body["tenant_id"] == tenant.tenant_id  # a tenant's subscription gets its own probe
        r = c.post(f"/v1/webhooks/{sid}/test")
        assert r.status_code == 200 and r.json()["success"] is True
        assert c.post(f"/v1/webhooks/{other_sid}/test").json()["error"] == "WEBHOOK_NOT_FOUND"
        r = admin.post(f"/v1/admin/webhooks/{other_sid}/test")
        assert r.status_code == 200 and r.json()["success"] is False and r.json()["response_status"] == 500
        assert admin.get(f"/v1/admin/webhooks/{other_sid}").json()["consecutive_failures"] == 0  # probes do not count
        listed = admin.get(f"/v1/admin/webhooks/{sid}/deliveries").json()["deliveries"]
        assert len(listed) == 2 and {d["event_type"] for d in listed} == {"system.webhook_test"}
        reader = new_tenant(hook_server, permissions=["budgets:read"], tenant_id=None)
        with reader.client() as rc:
            assert rc.post(f"/v1/webhooks/{sid}/test").status_code in (403, 404)
        assert admin.post("/v1/admin/webhooks/whsub_missing/test").json()["error"] == "WEBHOOK_NOT_FOUND"
        # the probe is never dispatched through the queue: exactly the two direct requests reached /probe
        time.sleep(0.5)
        assert len(receiver.on("/probe")) == 2


def _fund(srv: Server, tenant: Any, amount: int) -> None:
    scope = f"tenant:{tenant.tenant_id}"
    with srv.admin() as c:
        r = c.post("/v1/admin/budgets/fund", params={"tenant_id": tenant.tenant_id, "scope": scope,
                                                     "unit": "USD_MICROCENTS"},
                   json={"operation": "CREDIT", "amount": {"unit": "USD_MICROCENTS", "amount": amount},
                         "idempotency_key": os.urandom(8).hex()})
    assert r.status_code == 200, r.text


def test_routes_deliveries_replay_resend(hook_server: Server, receivers: Callable[..., Receiver]) -> None:
    receiver = receivers([])
    tenant, sid, _ = _tenant_sub(hook_server, receiver, "/live")
    tenant.budget()
    since = time.time() - 1
    for amount in (10, 20, 30):
        _fund(hook_server, tenant, amount)
    wait_sync(lambda: len(receiver.delivered) == 3, timeout=10, what="three live deliveries")
    with hook_server.admin() as admin, tenant.client() as c:
        # the delivery log, on both planes
        r = admin.get(f"/v1/admin/webhooks/{sid}/deliveries", params={"status": "SUCCESS"})
        assert r.status_code == 200, r.text
        listed = r.json()["deliveries"]
        assert len(listed) == 3 and all(d["status"] == "SUCCESS" and d["attempts"] == 1 for d in listed)
        assert all(d["response_status"] == 200 and len(d["trace_id"]) == 32 for d in listed)
        assert admin.get(f"/v1/admin/webhooks/{sid}/deliveries", params={"status": "FAILED"}).json()["deliveries"] == []
        page1 = c.get(f"/v1/webhooks/{sid}/deliveries", params={"limit": 2}).json()
        assert len(page1["deliveries"]) == 2 and page1["has_more"]
        page2 = c.get(f"/v1/webhooks/{sid}/deliveries", params={"limit": 2, "cursor": page1["next_cursor"]}).json()
        assert len(page2["deliveries"]) == 1 and not page2["has_more"]
        assert {d["delivery_id"] for d in page1["deliveries"] + page2["deliveries"]} == {d["delivery_id"] for d in listed}
        stranger = new_tenant(hook_server, permissions=["webhooks:read"])
        with stranger.client() as sc:
            assert sc.get(f"/v1/webhooks/{sid}/deliveries").json()["error"] == "WEBHOOK_NOT_FOUND"

        # replay while PAUSED: buffered, so the replay is still running -> a second one is refused
        assert c.patch(f"/v1/webhooks/{sid}", json={"status": "PAUSED"}).status_code == 200
        window = {"from": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since - 5)),
                  "to": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 5))}
        assert admin.post(f"/v1/admin/webhooks/{sid}/replay", json={**window, "max_events": 2}).status_code == 400
        r = admin.post(f"/v1/admin/webhooks/{sid}/replay", json=window)
        assert r.status_code == 202, r.text
        replay = r.json()
        assert replay["events_queued"] == 3 and replay["replay_id"] and replay["estimated_completion_seconds"] >= 1
        r = admin.post(f"/v1/admin/webhooks/{sid}/replay", json=window)
        assert r.status_code == 409 and r.json()["error"] == "REPLAY_IN_PROGRESS"
        time.sleep(0.5)
        assert len(receiver.requests) == 3
        assert c.patch(f"/v1/webhooks/{sid}", json={"status": "ACTIVE"}).status_code == 200
        wait_sync(lambda: len(receiver.requests) == 6, timeout=10, what="the replayed deliveries")
        assert all(n == 2 for n in receiver.delivered.values())  # each event twice: dedupe on X-Cycles-Event-Id
        mine = admin.get(f"/v1/admin/webhooks/{sid}/deliveries", params={"replay_id": replay["replay_id"]}).json()
        assert len(mine["deliveries"]) == 3

        def replay_done() -> bool:
            got = admin.get(f"/v1/admin/webhooks/{sid}/deliveries", params={"replay_id": replay["replay_id"],
                                                                          "status": "SUCCESS"}).json()
            return len(got["deliveries"]) == 3

        wait_sync(replay_done, what="the replay's deliveries to succeed")
        r = admin.post(f"/v1/admin/webhooks/{sid}/replay", json={**window, "event_types": ["budget.funded"]})
        assert r.status_code == 202 and r.json()["events_queued"] == 3  # finished: a new replay is accepted
        wait_sync(lambda: len(receiver.requests) == 9, timeout=10, what="the second replay")

        # resend one delivery: a new delivery of the same event, with provenance
        original = listed[0]
        r = admin.post(f"/v1/admin/webhooks/{sid}/deliveries/{original['delivery_id']}/resend")
        assert r.status_code == 202, r.text
        out = r.json()
        assert out["resent_from"] == original["delivery_id"] and out["delivery"]["event_id"] == original["event_id"]
        assert out["delivery"]["delivery_id"] != original["delivery_id"]
        wait_sync(lambda: len(receiver.requests) == 10, timeout=10, what="the resent delivery")
        last = receiver.requests[-1]["headers"]
        assert last["x-cycles-event-id"] == original["event_id"] and last["webhook-id"] == out["delivery"]["delivery_id"]
        assert admin.post(f"/v1/admin/webhooks/{sid}/deliveries/whdel_nope/resend").status_code == 404
        # tenant keys have no replay route
        assert c.post(f"/v1/admin/webhooks/{sid}/replay", json=window).status_code in (401, 403)
    metrics = httpx.get(hook_server.base_url + "/metrics").text
    assert 'cycles_webhook_delivery_attempts_total{outcome="success"}' in metrics
    assert "cycles_webhook_delivery_latency_seconds_bucket" in metrics
    assert 'cycles_webhook_deliveries_enqueued_total{source="replay"}' in metrics
    assert "cycles_webhook_delivery_queue_depth" in metrics
