"""The delivery worker: claims due deliveries, POSTs them, records the outcome, retries.

AT LEAST ONCE. A delivery document is a work item (cycles.webhooks.dispatch). A worker CLAIMS a due one
with a compare-and-set that sets status IN_FLIGHT, its lease owner and `due_ms` = the lease end, so a
worker that dies mid-delivery leaves a claim that becomes due again when the lease ends and another
worker (or the same one restarted) delivers it. The outcome is written with the claimed version: a
worker that lost its lease cannot overwrite the newer claim. A request never outlives its lease (its
timeout is shorter), so two workers never run the same attempt at once. Receivers dedupe on
`webhook-id` / `X-Cycles-Delivery-Id` (one delivery) or `X-Cycles-Event-Id` (one event).

CONCURRENCY. Attempts run as asyncio tasks on one shared event loop, at most `concurrency` at once and
at most `per_endpoint` per endpoint (scheme, host, port of the subscription URL), so a slow endpoint
holds only its own slots. Deliveries of a saturated endpoint stay in the queue for later (or for
another worker); when they fill a whole poll batch they are moved back by a second so other
endpoints' deliveries behind them are reached.

SEND (cycles.webhooks.send). At send time the subscription is re-read: DISABLED or deleted subscriptions fail the delivery,
PAUSED ones park it; the invariants are re-checked (rules.wants, fail closed); the URL is checked again
against the current webhook security config and its host resolved; the connection goes to one of
those checked addresses (pinned: the request URL carries the address, `Host` and TLS SNI carry the
name, so certificates are verified for the name). Redirects are not followed; no proxy from the
environment is used; HTTP/1.1.

RETRIES. 2xx is success. 4xx other than 408/409/425/429 fail at once; everything else (other statuses,
timeouts, connection errors) is retried after exponential backoff with full jitter
(uniform(0, min(max_delay_ms, initial_delay_ms * multiplier^(n-1)))) from the subscription's
retry_policy, and never earlier than a `Retry-After` (seconds or HTTP date) sent with 429 / 503. After
max_retries retries the delivery is FAILED and a `system.webhook_delivery_failed` event is written in
the same transaction; the subscription's consecutive_failures is incremented and, once it reaches
disable_after_failures, the subscription is DISABLED with a `webhook.disabled` event written in the
same transaction as that change. A success resets consecutive_failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from ..core.events import SYSTEM_TENANT
from ..protocol import models as m
from ..protocol.errors import ProtocolError, VersionConflict
from ..store.base import Store, reset_journal, start_journal
from . import dispatch as D
from .subscriptions import iso, load_url_policy

log = logging.getLogger("cycles.webhooks")

DEFAULT_RETRY = {"max_retries": 5, "initial_delay_ms": 1000, "backoff_multiplier": 2.0, "max_delay_ms": 60_000}
DEFAULT_DISABLE_AFTER = 10
DISABLE_REASON = "consecutive_failures_exceeded_threshold"
LEASE_MARGIN_MS = 2_000
MAX_LOST_CLAIMS = 3  # claims whose worker died mid-attempt, before the delivery is given up
STAMP_EVERY_MS = 1_000  # last_success / last_triggered are written at most this often per subscription


from .send import MAX_RETRY_AFTER_MS, HeaderUnusable, Result, SealedUnreadable, Sender, build_headers, endpoint_key, open_box


def retry_policy(sub: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULT_RETRY, **{k: v for k, v in (sub.get("retry_policy") or {}).items() if v is not None}}


def backoff_ms(policy: dict[str, Any], failed_attempts: int, rng: random.Random | None = None) -> int:
    """Full jitter: uniform(0, min(max_delay, initial * multiplier^(failed_attempts-1)))."""
    cap = min(float(policy["max_delay_ms"]),
              float(policy["initial_delay_ms"]) * float(policy["backoff_multiplier"]) ** max(0, failed_attempts - 1))
    return int((rng or random).uniform(0, cap))


# ---- the worker ----

@dataclass
class WorkerConfig:
    concurrency: int = 64
    per_endpoint: int = 4
    lease_ms: int = 60_000
    timeout_ms: int = 30_000
    poll_ms: int = 200
    batch: int = 200

    def check(self) -> None:
        if self.concurrency < 1 or self.per_endpoint < 1:
            raise ValueError("concurrency and per_endpoint must be at least 1")
        if self.timeout_ms + LEASE_MARGIN_MS // 2 > self.lease_ms:
            raise ValueError(f"the request timeout ({self.timeout_ms} ms) must be shorter than the lease "
                             f"({self.lease_ms} ms) by at least {LEASE_MARGIN_MS // 2} ms")


def new_worker_id() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{os.urandom(3).hex()}"


class Worker:
    def __init__(self, store: Store, *, box: Any = None, metrics: Any = None, worker_id: str | None = None,
                 config: WorkerConfig | None = None) -> None:
        self.store = store
        self.box = open_box(box)
        self.metrics = metrics
        self.worker_id = worker_id or new_worker_id()
        self.config = config or WorkerConfig()
        self.config.check()
        self.sender = Sender(per_endpoint=self.config.per_endpoint)
        self.wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._claims: dict[str, dict[str, Any]] = {}  # claimed and not yet acknowledged
        self._fresh: set[str] = set()  # claims that counted a new attempt (not a lost one made again)
        self._per_endpoint: dict[tuple[str, str, int], int] = {}
        self._subs: dict[str, dict[str, Any]] = {}
        self._subs_at = 0.0
        self._markers_at = 0.0
        self._depth_at = 0.0

    # -- the loop --

    async def _subscriptions(self) -> dict[str, dict[str, Any]]:
        if time.monotonic() - self._subs_at > 1.0:
            self._subs = {s["subscription_id"]: s for s in await self.store.list_docs(D.SUB_KIND, None)}
            self._subs_at = time.monotonic()
        return self._subs

    async def run_once(self) -> int:
        """Claim what is due (within the limits) and start delivering it. Returns how many were claimed."""
        store, cfg = self.store, self.config
        now = await store.now_ms()
        if time.monotonic() - self._markers_at > 0.5:
            self._markers_at = time.monotonic()
            if await D.process_park_markers(store, now):
                now = await store.now_ms()
        if len(self._tasks) >= cfg.concurrency:
            return 0
        due = await store.due_docs(D.DELIVERY_KIND, now, cfg.batch)
        subs = await self._subscriptions() if due else {}
        claimed = 0
        saturated: list[dict[str, Any]] = []
        for d in due:
            if len(self._tasks) >= cfg.concurrency:
                break
            did = d["delivery_id"]
            if did in self._tasks:
                continue
            sub = subs.get(d.get("subscription_id"))
            if sub is None:
                sub = await store.get_doc(D.SUB_KIND, d.get("subscription_id") or "")
                if sub is not None:
                    subs[sub["subscription_id"]] = sub
            if sub is not None and sub.get("status") == "PAUSED" and d.get("status") == "PENDING":
                await self._park(d, now)
                continue
            key = endpoint_key(sub["url"]) if sub is not None else ("", "", 0)
            if self._per_endpoint.get(key, 0) >= cfg.per_endpoint:
                saturated.append(d)
                continue
            rec = await self._claim(d, now)
            if rec is None:
                continue
            claimed += 1
            self._per_endpoint[key] = self._per_endpoint.get(key, 0) + 1
            self._claims[did] = rec
            self._tasks[did] = asyncio.get_running_loop().create_task(self._run(rec, key))
            if self.metrics is not None:
                self.metrics.webhook_in_flight.inc()
        if saturated and len(due) >= cfg.batch:
            for d in saturated:  # head-of-line: let the deliveries behind them be seen
                with contextlib.suppress(ProtocolError):
                    await store.save_doc(D.DELIVERY_KIND, d["tenant_id"], d["delivery_id"],
                                         {**_plain(d), "due_ms": now + 1000}, d["version"], guard_tenant=False)
        if self.metrics is not None:
            self.metrics.webhook_queue.set(max(0, len(due) - claimed))
        return claimed

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                claimed = await self.run_once()
            except Exception:  # noqa: BLE001 - the store may be briefly unavailable; try again
                log.warning("webhook worker pass failed", exc_info=True)
                claimed = 0
                await asyncio.sleep(1.0)
            if claimed and len(self._tasks) < self.config.concurrency:
                await asyncio.sleep(0)  # let the new attempts start (a store call may not yield)
                continue  # there may be more due right now
            self.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.config.poll_ms / 1000)

    async def drain(self, timeout_s: float | None = None) -> None:
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    async def close(self, grace_s: float = 5.0) -> None:
        """Let running attempts finish (up to grace_s), cancel the rest and hand their claims back."""
        await self.drain(grace_s)
        for task in list(self._tasks.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            with contextlib.suppress(BaseException):
                await task
        now = None
        for did, rec in list(self._claims.items()):
            try:
                now = now or await self.store.now_ms()
                await self.store.save_doc(D.DELIVERY_KIND, rec["tenant_id"], did,
                                          {**_plain(rec), "status": "PENDING", "lease_owner": None,
                                           "lease_until_ms": None, "due_ms": now, "next_attempt_at_ms": now,
                                           "attempts": self._uncounted(rec)},
                                          rec["version"], guard_tenant=False)
            except Exception:  # noqa: BLE001 - the lease runs out instead
                pass
        self._claims.clear()
        self._fresh.clear()
        await self.sender.aclose()

    # -- claims --

    async def _claim(self, d: dict[str, Any], now: int) -> dict[str, Any] | None:
        lease_end = now + self.config.lease_ms
        attempts, lost = int(d.get("attempts") or 0), int(d.get("lost_claims") or 0)
        fresh = d.get("status") != "IN_FLIGHT"
        if fresh:
            attempts += 1
        else:
            lost += 1  # its worker died (or hung) mid-attempt: that attempt is made again, not counted twice
        rec = {**_plain(d), "status": "IN_FLIGHT", "lease_owner": self.worker_id, "lease_until_ms": lease_end,
               "due_ms": lease_end, "attempts": max(1, attempts), "lost_claims": lost, "last_attempt_at_ms": now,
               "first_attempt_at_ms": d.get("first_attempt_at_ms") or now, "parked": False}
        try:
            claimed = await self.store.save_doc(D.DELIVERY_KIND, d["tenant_id"], d["delivery_id"], rec, d["version"],
                                                guard_tenant=False)
        except ProtocolError:
            return None  # another worker claimed it (or it is gone)
        if fresh and attempts > 0:
            self._fresh.add(d["delivery_id"])
        return claimed

    def _uncounted(self, rec: dict[str, Any]) -> int:
        """`attempts` of a claim that ends without an attempt having been made."""
        attempts = int(rec.get("attempts") or 0)
        return max(0, attempts - 1) if rec["delivery_id"] in self._fresh else attempts

    async def _save(self, rec: dict[str, Any], changes: dict[str, Any], entries: list[dict[str, Any]] | None = None) -> bool:
        """Write the outcome of a claim with the claimed version (journal entries in the same transaction)."""
        new = {**_plain(rec), **changes}
        token = start_journal(list(entries or []))
        try:
            await self.store.save_doc(D.DELIVERY_KIND, rec["tenant_id"], rec["delivery_id"], new, rec["version"],
                                      guard_tenant=False)
        except VersionConflict:
            log.warning("delivery %s: lease lost before its outcome was recorded (it will be delivered again)",
                        rec["delivery_id"])
            return False
        except ProtocolError as exc:
            log.warning("delivery %s: outcome not recorded: %s", rec["delivery_id"], exc.message)
            return False
        finally:
            reset_journal(token)
        self._claims.pop(rec["delivery_id"], None)
        self._fresh.discard(rec["delivery_id"])
        return True

    async def _park(self, d: dict[str, Any], now: int) -> None:
        changes = {"status": "PENDING", "parked": True, "due_ms": None, "lease_owner": None, "lease_until_ms": None}
        if d.get("status") == "IN_FLIGHT" and d.get("lease_owner") == self.worker_id:
            changes["attempts"] = self._uncounted(d)
        try:
            await self.store.save_doc(D.DELIVERY_KIND, d["tenant_id"], d["delivery_id"], {**_plain(d), **changes},
                                      d["version"], guard_tenant=False)
        except ProtocolError:
            return
        self._claims.pop(d["delivery_id"], None)
        self._fresh.discard(d["delivery_id"])
        await D.ensure_park_marker(self.store, d["subscription_id"], d["tenant_id"], now)

    # -- one delivery --

    async def _run(self, rec: dict[str, Any], key: tuple[str, str, int]) -> None:
        did = rec["delivery_id"]
        try:
            await self.deliver(rec)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the claim stays; its lease expiry hands it to a worker again
            log.exception("delivery %s failed unexpectedly; it is retried when its lease ends", did)
        finally:
            self._tasks.pop(did, None)
            left = self._per_endpoint.get(key, 1) - 1
            if left > 0:
                self._per_endpoint[key] = left
            else:
                self._per_endpoint.pop(key, None)
            if self.metrics is not None:
                self.metrics.webhook_in_flight.dec()
            self.wake.set()

    async def deliver(self, rec: dict[str, Any]) -> None:
        """Deliver one claimed delivery and record the outcome."""
        store = self.store
        sub = await store.get_doc(D.SUB_KIND, rec["subscription_id"])
        if sub is None:
            return await self._give_up(rec, "subscription_deleted", "the subscription was deleted")
        status = sub.get("status")
        if status == "DISABLED":
            reason = sub.get("disabled_reason")
            return await self._give_up(rec, "subscription_disabled",
                                       "the subscription is DISABLED" + (f" ({reason})" if reason else ""))
        if status == "PAUSED":
            return await self._park(rec, await store.now_ms())
        policy = retry_policy(sub)
        if int(rec.get("lost_claims") or 0) > MAX_LOST_CLAIMS:
            # Workers keep dying on this one (a poison message?): stop, so it cannot take every worker down.
            return await self._failed(rec, sub, Result("transport_error", error=f"{MAX_LOST_CLAIMS + 1} workers were "
                                                       "lost while delivering it"), count=False)
        event = await store.get_event(rec["event_id"])
        if event is None:
            return await self._give_up(rec, "event_not_found", "the event is no longer stored")
        if not D.deliverable(sub, event):
            return await self._give_up(rec, "not_deliverable", "the subscription may not receive this event "
                                       "(its selectors or the tenant boundary refuse it)")
        from ..server.events import event_wire

        body = m.encode(event_wire(event))
        now = await store.now_ms()
        try:
            headers = build_headers(sub, self.box, body, delivery_id=rec["delivery_id"], event_id=event["event_id"],
                                    event_type=event["event_type"], trace_id=rec.get("trace_id") or event.get("trace_id")
                                    or os.urandom(16).hex(), trace_flags=rec.get("trace_flags") or "01",
                                    request_id=event.get("request_id"), now_ms=now)
        except HeaderUnusable as exc:
            return await self._give_up(rec, "header_invalid", str(exc))
        except Exception as exc:  # noqa: BLE001 - SealedUnreadable: a value sealed under another key
            return await self._give_up(rec, "secret_unreadable", str(exc) if isinstance(exc, SealedUnreadable) else
                                       f"the delivery headers could not be built: {exc}")
        url_policy = await load_url_policy(store)
        budget_ms = min(self.config.timeout_ms, int(rec["lease_until_ms"]) - now - LEASE_MARGIN_MS // 2)
        if budget_ms <= 0:
            return  # the lease is nearly over: leave it to whoever claims it next
        result = await self.sender.post(sub["url"], url_policy, body, headers, budget_ms / 1000)
        if self.metrics is not None:
            self.metrics.webhook_attempts.labels(result.outcome).inc()
            self.metrics.webhook_latency.labels(result.outcome).observe(result.duration_ms / 1000)
        await self._record(rec, sub, result, policy)

    async def _record(self, rec: dict[str, Any], sub: dict[str, Any], result: Result, policy: dict[str, Any]) -> None:
        now = await self.store.now_ms()
        common = {"response_status": result.status, "duration_ms": result.duration_ms, "error": result.error,
                  "lease_owner": None, "lease_until_ms": None}
        if result.ok:
            if await self._save(rec, {**common, "status": "SUCCEEDED", "completed_at_ms": now, "due_ms": None,
                                      "next_attempt_at_ms": None}):
                self._result("succeeded", "2xx")
                await self._subscription_success(sub["subscription_id"], now)
            return
        attempts = int(rec["attempts"])
        if result.retryable and attempts < int(policy["max_retries"]) + 1:
            delay = backoff_ms(policy, attempts)
            if result.retry_after_ms is not None:
                delay = max(delay, min(result.retry_after_ms, MAX_RETRY_AFTER_MS))
            await self._save(rec, {**common, "status": "PENDING", "due_ms": now + delay,
                                   "next_attempt_at_ms": now + delay})
            return
        await self._failed(rec, sub, result, count=True, common=common)

    def _result(self, result: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.webhook_results.labels(result, reason).inc()

    async def _give_up(self, rec: dict[str, Any], reason: str, message: str) -> None:
        """FAILED without an attempt (nothing was sent): not counted against the endpoint."""
        changes = {"status": "FAILED", "error": message, "completed_at_ms": await self.store.now_ms(),
                   "due_ms": None, "next_attempt_at_ms": None, "lease_owner": None, "lease_until_ms": None,
                   "attempts": self._uncounted(rec)}
        if await self._save(rec, changes):
            self._result("failed", reason)

    async def _failed(self, rec: dict[str, Any], sub: dict[str, Any], result: Result, *, count: bool,
                      common: dict[str, Any] | None = None) -> None:
        now = await self.store.now_ms()
        changes = {**(common or {"error": result.error, "lease_owner": None, "lease_until_ms": None}),
                   "status": "FAILED", "completed_at_ms": now, "due_ms": None, "next_attempt_at_ms": None}
        entries = []
        # No meta-alert about a meta-alert: a failing receiver of system.webhook_delivery_failed would
        # otherwise be sent one more event for each failure, forever.
        if rec.get("event_type") != "system.webhook_delivery_failed":
            entries.append({
                "journal": "event", "event_type": "system.webhook_delivery_failed", "tenant_id": SYSTEM_TENANT,
                "scope": None, "correlation_id": f"webhook_delivery_failed:{rec['delivery_id']}",
                "actor": {"type": "system"}, "source": "webhook-dispatcher", "trace_id": rec.get("trace_id"),
                "data": {"component": "webhook_dispatcher", "severity": "warning",
                         "message": f"Webhook delivery {rec['delivery_id']} to subscription {rec['subscription_id']} "
                                    f"failed after {rec.get('attempts')} attempt(s): {result.error}",
                         "details": {"delivery_id": rec["delivery_id"], "subscription_id": rec["subscription_id"],
                                     "tenant_id": rec["tenant_id"], "event_id": rec["event_id"],
                                     "event_type": rec.get("event_type"), "attempts": rec.get("attempts"),
                                     "response_status": result.status, "error": result.error,
                                     "outcome": result.outcome}},
            })
        if await self._save(rec, changes, entries):
            self._result("failed", result.outcome)
            if count:
                await self._subscription_failure(sub["subscription_id"], rec["delivery_id"], now)

    # -- the subscription's counters --

    async def _update_subscription(self, subscription_id: str, mutate: Any) -> None:
        for _ in range(8):
            sub = await self.store.get_doc(D.SUB_KIND, subscription_id)
            if sub is None:
                return
            out = mutate(dict(sub))
            if out is None:
                return
            new, entries = out
            token = start_journal(entries)
            try:
                await self.store.save_doc(D.SUB_KIND, sub["tenant_id"], subscription_id, _plain(new), sub["version"],
                                          guard_tenant=False)
                return
            except VersionConflict:
                continue  # an admin edit raced us: apply the change to the new version
            except ProtocolError as exc:
                log.warning("subscription %s: counters not updated: %s", subscription_id, exc.message)
                return
            finally:
                reset_journal(token)

    async def _subscription_success(self, subscription_id: str, now: int) -> None:
        def mutate(sub: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
            if int(sub.get("consecutive_failures") or 0) == 0 and now - int(sub.get("last_success_at_ms") or 0) < STAMP_EVERY_MS:
                return None
            return {**sub, "consecutive_failures": 0, "last_success_at_ms": now, "last_triggered_at_ms": now}, []

        await self._update_subscription(subscription_id, mutate)

    async def _subscription_failure(self, subscription_id: str, delivery_id: str, now: int) -> None:
        disabled = False

        def mutate(sub: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
            nonlocal disabled
            count = int(sub.get("consecutive_failures") or 0) + 1
            new = {**sub, "consecutive_failures": count, "last_failure_at_ms": now, "last_triggered_at_ms": now}
            entries: list[dict[str, Any]] = []
            limit = int(sub.get("disable_after_failures") or DEFAULT_DISABLE_AFTER)
            disabled = count >= limit and sub.get("status") in ("ACTIVE", "PAUSED")
            if disabled:
                new.update(status="DISABLED", disabled_reason=DISABLE_REASON, updated_at=iso(now))
                entries.append({
                    "journal": "event", "event_type": "webhook.disabled", "tenant_id": sub["tenant_id"],
                    "scope": None, "correlation_id": f"webhook_auto_disable:{subscription_id}:{delivery_id}",
                    "actor": {"type": "system"}, "source": "webhook-dispatcher",
                    "data": {"subscription_id": subscription_id, "tenant_id": sub["tenant_id"],
                             "previous_status": sub.get("status"), "new_status": "DISABLED", "changed_fields": [],
                             "disable_reason": DISABLE_REASON},
                })
            return new, entries

        await self._update_subscription(subscription_id, mutate)
        if disabled:
            log.warning("webhook subscription %s disabled after consecutive delivery failures", subscription_id)
            if self.metrics is not None:
                self.metrics.webhook_auto_disabled.inc()


def _plain(rec: dict[str, Any]) -> dict[str, Any]:
    out = dict(rec)
    out.pop("version", None)
    return out


# ---- the engine: dispatcher + worker, embedded in `cycles serve` or run by `cycles worker` ----

@dataclass
class EngineConfig:
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    dispatch_ms: int = 200
    dispatch: bool = True


class Engine:
    def __init__(self, store: Store, *, box: Any = None, metrics: Any = None, config: EngineConfig | None = None,
                 worker_id: str | None = None) -> None:
        self.store = store
        self.config = config or EngineConfig()
        self.worker_id = worker_id or new_worker_id()
        self.worker = Worker(store, box=box, metrics=metrics, worker_id=self.worker_id, config=self.config.worker)
        self.dispatcher = D.Dispatcher(store, owner=self.worker_id, metrics=metrics, on_created=self.worker.wake.set)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                created = await self.dispatcher.run_once()
            except Exception:  # noqa: BLE001 - retried on the next pass
                log.warning("webhook dispatch pass failed", exc_info=True)
                created = 0
                await asyncio.sleep(1.0)
            if not created:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.config.dispatch_ms / 1000)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.config.dispatch:
            self._tasks.append(loop.create_task(self._dispatch_loop()))
        self._tasks.append(loop.create_task(self.worker.run(self._stop)))

    async def stop(self, grace_s: float = 5.0) -> None:
        self._stop.set()
        self.worker.wake.set()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 5.0)
        await self.worker.close(grace_s)
        if self.config.dispatch:
            await self.dispatcher.release()


def engine_config_from_env(env: dict[str, str] | None = None) -> EngineConfig:
    """Settings of the embedded worker: CYCLES_WEBHOOK_CONCURRENCY, _PER_ENDPOINT, _LEASE_MS, _TIMEOUT_MS,
    _POLL_MS (the same knobs as `cycles worker`'s options)."""
    env = dict(os.environ) if env is None else env

    def num(name: str, default: int) -> int:
        raw = env.get(name)
        return int(raw) if raw else default

    worker = WorkerConfig(concurrency=num("CYCLES_WEBHOOK_CONCURRENCY", 64),
                          per_endpoint=num("CYCLES_WEBHOOK_PER_ENDPOINT", 4),
                          lease_ms=num("CYCLES_WEBHOOK_LEASE_MS", 60_000),
                          timeout_ms=num("CYCLES_WEBHOOK_TIMEOUT_MS", 30_000),
                          poll_ms=num("CYCLES_WEBHOOK_POLL_MS", 200))
    return EngineConfig(worker=worker, dispatch_ms=worker.poll_ms)
