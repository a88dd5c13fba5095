"""`CyclesClient`: the blocking client. Runs the plans of core.py / recovery.py with httpx.Client."""

from __future__ import annotations

import atexit
import heapq
import itertools
import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx

from ..protocol import models as m
from . import core
from . import errors as e
from . import recovery
from .config import CyclesConfig
from .context import CyclesContext, HeartbeatEvent
from .heartbeat import LeaseSchedule
from .journal import Journal, now_ms

log = logging.getLogger("cycles.client")


@dataclass
class Timing:
    rtt_ms: float = 0.0
    received_at: float = 0.0


class CyclesClient:
    """Blocking Cycles client: every runtime endpoint, typed models in and out, typed errors.

    Endpoint methods accept the protocol's msgspec models (cycles.protocol.models) or plain dicts,
    return the typed response, and raise `CyclesProtocolError` subclasses. They retry transport errors,
    429 (at least Retry-After) and 5xx with the identical body (same idempotency key); never a 409.
    """

    def __init__(self, config: CyclesConfig | None = None, *, transport: httpx.BaseTransport | None = None,
                 http_client: httpx.Client | None = None, **settings: Any) -> None:
        self.config = cfg = core.make_config(config, settings)
        self._own_http = http_client is None
        self._http = http_client or httpx.Client(timeout=core.timeout_for(cfg), limits=core.limits_for(cfg),
                                                 transport=transport)
        self._base = cfg.base_url
        self._headers = core.headers_for(cfg)
        self.policy = core.RetryPolicy.from_config(cfg)
        self.journal = (Journal(cfg.resolved_journal_dir(), cfg.base_url, cfg.api_key, cfg.tenant,
                                fsync=cfg.journal_fsync) if cfg.journal_enabled else None)
        self.settler = SyncSettler(self)
        self._heartbeat: SyncHeartbeat | None = None
        self._hb_lock = threading.Lock()
        self._closed = False
        _live_sync.add(self)

    # ------------------------------------------------------------------ plumbing

    def _send(self, req: core.Prepared, timing: Timing | None = None) -> httpx.Response | BaseException:
        headers = dict(self._headers)
        if req.content is not None:
            headers["Content-Type"] = "application/json"
        if req.idempotency_key:
            headers["X-Idempotency-Key"] = req.idempotency_key
        request = self._http.build_request(req.method, self._base + req.path, content=req.content, params=req.params,
                                           headers=headers)
        t0 = time.monotonic()
        try:
            resp = self._http.send(request)
            resp.read()
        except httpx.HTTPError as exc:
            return exc
        if timing is not None:
            timing.received_at = time.monotonic()
            timing.rtt_ms = (timing.received_at - t0) * 1000
        return resp

    def _run(self, plan: core.Plan[Any], *, timing: Timing | None = None,
             sleep: Callable[[float], Any] = time.sleep) -> Any:
        action = next(plan)
        while True:
            if isinstance(action, core.Send):
                answer: Any = self._send(action.request, timing)
            else:
                sleep(action.seconds)
                answer = None
            try:
                action = plan.send(answer)
            except StopIteration as stop:
                return stop.value

    def _call(self, req: core.Prepared, policy: core.RetryPolicy | None = None) -> Any:
        return self._run(core.call(req, policy or self.policy))

    # ------------------------------------------------------------------ endpoints

    def create_reservation(self, req: m.ReservationCreateRequest | dict) -> m.ReservationCreateResponse:
        return self._call(core.create_reservation(req))

    def commit_reservation(self, reservation_id: str, req: m.CommitRequest | dict) -> m.CommitResponse:
        """Low-level commit: retries ambiguous outcomes in the call, but does NOT journal. Use the
        decorator/streaming helpers (or `settle`) for durable recovery."""
        return self._call(core.commit(reservation_id, req))

    def release_reservation(self, reservation_id: str, req: m.ReleaseRequest | dict) -> m.ReleaseResponse:
        return self._call(core.release(reservation_id, req))

    def extend_reservation(self, reservation_id: str, req: m.ReservationExtendRequest | dict
                           ) -> m.ReservationExtendResponse:
        return self._call(core.extend(reservation_id, req))

    def decide(self, req: m.DecisionRequest | dict) -> m.DecisionResponse:
        return self._call(core.decide(req))

    def create_event(self, req: m.EventCreateRequest | dict) -> m.EventCreateResponse:
        return self._call(core.create_event(req))

    def list_reservations(self, **query: Any) -> m.ReservationListResponse:
        return self._call(core.list_reservations(**query))

    def get_reservation(self, reservation_id: str) -> m.ReservationDetail:
        return self._call(core.get_reservation(reservation_id))

    def get_balances(self, **query: Any) -> m.BalanceResponse:
        return self._call(core.get_balances(**query))

    # ------------------------------------------------------------------ durable settlement

    def settle(self, reservation_id: str, commit: m.CommitRequest | dict, *, subject: m.Subject | dict,
               action: m.Action | dict, metadata: dict | None = None) -> recovery.Outcome:
        """Durable commit of a reservation you manage yourself: journaled, same-key retries in the
        background, event fallback on expiry. Returns the first attempt's outcome."""
        record = recovery.build_record(self.config.base_url, reservation_id, core.to_struct(commit, m.CommitRequest),
                                       core.to_struct(subject, m.Subject), core.to_struct(action, m.Action), metadata)
        return self.settler.settle(record)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait (bounded) for background settlement retries. False if some are still unresolved; their
        records stay in the journal."""
        return self.settler.flush(self.config.retry_flush_timeout if timeout is None else timeout)

    def recover_pending(self, timeout: float | None = None) -> recovery.RecoveryReport:
        """Replay this partition's journal now (same keys; not before any persisted 429 floor)."""
        return self.settler.recover(self.config.retry_flush_timeout if timeout is None else timeout)

    # ------------------------------------------------------------------ lifecycle helpers

    def stream_reservation(self, **kwargs: Any):
        from .streaming import StreamReservation

        return StreamReservation(self, **kwargs)

    def _hb(self) -> "SyncHeartbeat":
        if self._heartbeat is None:
            with self._hb_lock:
                if self._heartbeat is None:
                    self._heartbeat = SyncHeartbeat(self)
        return self._heartbeat

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.settler.flush(self.config.retry_flush_timeout)
        if self._heartbeat is not None:
            self._heartbeat.shutdown()
        if self.journal is not None:
            self.journal.close()
        if self._own_http:
            self._http.close()
        _live_sync.discard(self)

    def __enter__(self) -> "CyclesClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SyncSettler:
    """First settlement attempt in the caller's thread; same-key retries on daemon threads (failure
    path only); bounded flush; journal replay."""

    def __init__(self, client: CyclesClient) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._inflight: set[str] = set()
        self._mine: set[str] = set()  # settled by this process: the startup replay leaves them alone
        self._replayed = False

    def settle(self, record: recovery.PendingRecord) -> recovery.Outcome:
        journal = self.client.journal
        with self._lock:
            self._inflight.add(record.reservation_id)
            self._mine.add(record.reservation_id)
        try:
            outcome = self.client._run(recovery.first_settlement(record, journal))
        finally:
            with self._lock:
                self._inflight.discard(record.reservation_id)
        if outcome.kind in (recovery.SUCCESS, recovery.TERMINAL):
            with self._lock:
                self._mine.discard(record.reservation_id)
        if outcome.kind == recovery.RETRY and self.client.config.retry_enabled:
            self._spawn(record)
        self._maybe_replay()
        return outcome

    def _maybe_replay(self) -> None:
        if self._replayed or self.client.journal is None or not self.client.config.journal_replay:
            return
        self._replayed = True
        t = threading.Thread(target=self._background_replay, name="cycles-journal-replay", daemon=True)
        with self._lock:
            self._threads.add(t)
        t.start()

    def _background_replay(self) -> None:
        try:
            self.recover(None, attempts=self.client.policy.max_attempts, skip_mine=True)
        except Exception:  # noqa: BLE001
            log.warning("journal replay failed", exc_info=True)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _spawn(self, record: recovery.PendingRecord) -> None:
        def run() -> None:
            try:
                self.client._run(recovery.retry(record, self.client.journal, self.client.policy,
                                                attempts=self.client.policy.max_attempts - 1),
                                 sleep=self._sleep)
            except Exception:  # noqa: BLE001
                log.warning("background settlement of %s failed", record.reservation_id, exc_info=True)
            finally:
                with self._lock:
                    self._inflight.discard(record.reservation_id)
                    self._threads.discard(threading.current_thread())

        t = threading.Thread(target=run, name=f"cycles-settle-{record.reservation_id[:12]}", daemon=True)
        with self._lock:
            self._inflight.add(record.reservation_id)
            self._threads.add(t)
        t.start()

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def pending(self) -> int:
        with self._lock:
            return len(self._threads)

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            with self._lock:
                threads = [t for t in self._threads if t is not threading.current_thread()]
            if not threads:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("flush timed out with %d settlement(s) unresolved; their records stay in the journal",
                            len(threads))
                return False
            threads[0].join(remaining)

    def recover(self, timeout: float | None, attempts: int | None = None,
                skip_mine: bool = False) -> recovery.RecoveryReport:
        journal = self.client.journal
        report = recovery.RecoveryReport([], [], [], [])
        if journal is None:
            return report
        scan = journal.scan()
        report.quarantined = scan.quarantined
        deadline = None if timeout is None else time.monotonic() + timeout
        for rec in scan.records:
            with self._lock:
                if rec.reservation_id in self._inflight or (skip_mine and rec.reservation_id in self._mine):
                    continue
                self._inflight.add(rec.reservation_id)
            try:
                out = self.client._run(recovery.retry(rec, journal, self.client.policy, deadline=deadline,
                                                      attempts=attempts or self.client.policy.max_attempts))
            finally:
                with self._lock:
                    self._inflight.discard(rec.reservation_id)
            {recovery.SUCCESS: report.settled, recovery.TERMINAL: report.rejected}.get(
                out.kind, report.unresolved).append(out)
        return report


@dataclass(eq=False)
class Lease:
    ctx: CyclesContext
    ttl_ms: int
    schedule: LeaseSchedule
    on_event: Callable[[HeartbeatEvent], Any] | None = None
    stopped: bool = False
    retry_key: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def record_event(lease: Lease, err: BaseException | str, disposition: str) -> None:
    ev = HeartbeatEvent(lease.ctx.reservation_id or "", str(err), disposition, now_ms())
    lease.ctx.heartbeat_events.append(ev)
    log.warning("heartbeat extend of reservation %s failed (%s); disposition=%s", ev.reservation_id, ev.error,
                disposition)
    if lease.on_event is not None:
        try:
            lease.on_event(ev)
        except Exception:  # noqa: BLE001
            log.warning("heartbeat event callback failed", exc_info=True)


def after_extend(lease: Lease, resp: m.ReservationExtendResponse, timing: Timing) -> float | None:
    """Record a successful extend on the lease's context; the delay until the next beat, or None to stop."""
    ctx = lease.ctx
    lease.retry_key = None
    ctx.expires_at_ms = resp.expires_at_ms
    ctx.remaining_ttl_ms = resp.remaining_ttl_ms
    ctx.extensions += 1
    if lease.stopped:
        return None
    d = lease.schedule.on_success(resp.remaining_ttl_ms, resp.expires_at_ms, timing.rtt_ms, timing.received_at)
    if d.delay_s is None:
        record_event(lease, d.reason, "stop")
        lease.stopped = True
    return d.delay_s


class SyncHeartbeat:
    """One scheduler thread per client (started at the first lease that needs an extend) and a small
    pool for the extends themselves; no thread is created per guarded call."""

    def __init__(self, client: CyclesClient) -> None:
        self.client = client
        self._heap: list[tuple[float, int, Lease]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._stop = False

    def start(self, ctx: CyclesContext, resp: m.ReservationCreateResponse, ttl_ms: int, timing: Timing,
              on_event: Callable[[HeartbeatEvent], Any] | None = None) -> Lease:
        lease = Lease(ctx, ttl_ms, LeaseSchedule(self.client.config.attempt_budget_s), on_event)
        d = lease.schedule.on_success(resp.remaining_ttl_ms, resp.expires_at_ms, timing.rtt_ms,
                                      timing.received_at or None)
        if d.delay_s is None:
            lease.stopped = True
            log.info("heartbeat for %s not scheduled: %s", ctx.reservation_id, d.reason)
        else:
            self._push(lease, d.delay_s)
        return lease

    def stop(self, lease: Lease) -> None:
        lease.stopped = True

    def _push(self, lease: Lease, delay: float) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), lease))
            if self._thread is None:
                self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cycles-heartbeat")
                self._thread = threading.Thread(target=self._loop, name="cycles-heartbeat-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _loop(self) -> None:
        with self._cond:
            while not self._stop:
                while self._heap and self._heap[0][2].stopped:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                due = self._heap[0][0] - time.monotonic()
                if due > 0:
                    self._cond.wait(due)
                    continue
                _, _, lease = heapq.heappop(self._heap)
                assert self._pool is not None
                self._pool.submit(self._beat, lease)

    def _beat(self, lease: Lease) -> None:
        if lease.stopped:
            return
        ctx = lease.ctx
        key = lease.retry_key or core.new_key()
        req = core.extend(ctx.reservation_id or "", m.ReservationExtendRequest(idempotency_key=key,
                                                                               extend_by_ms=lease.ttl_ms))
        timing = Timing()
        try:
            resp = self.client._run(core.call(req, core.NO_RETRY), timing=timing)
        except e.CyclesError as err:
            if lease.stopped:
                return
            d = lease.schedule.on_failure(err)
            record_event(lease, err, "stop" if d.delay_s is None else f"retry same key in {d.delay_s:.3f}s")
            if d.delay_s is None:
                lease.stopped = True
            else:
                lease.retry_key = key
                self._push(lease, d.delay_s)
            return
        except Exception as err:  # noqa: BLE001 - never let the heartbeat die silently
            record_event(lease, err, "stop")
            lease.stopped = True
            return
        delay = after_extend(lease, resp, timing)
        if delay is not None:
            self._push(lease, delay)

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._pool is not None:
            self._pool.shutdown(wait=False)


_live_sync: "weakref.WeakSet[CyclesClient]" = weakref.WeakSet()


def _flush_at_exit() -> None:
    """Bounded flush of every live client's background settlements; unresolved records stay journaled."""
    clients = list(_live_sync)
    if not clients:
        return
    deadline = time.monotonic() + max(c.config.retry_flush_timeout for c in clients)
    for c in clients:
        c.settler.flush(max(0.0, deadline - time.monotonic()))


atexit.register(_flush_at_exit)
