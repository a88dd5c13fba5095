"""`AsyncCyclesClient`: the asyncio client. Runs the same plans as the sync client with httpx.AsyncClient."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import httpx

from ..protocol import models as m
from . import core
from . import errors as e
from . import recovery
from .config import CyclesConfig
from .context import CyclesContext, HeartbeatEvent
from .heartbeat import LeaseSchedule
from .journal import Journal
from .sync import Lease, Timing, after_extend, record_event

log = logging.getLogger("cycles.client")


class AsyncCyclesClient:
    """Asyncio Cycles client; same methods as `CyclesClient`, awaitable. See that class for semantics."""

    def __init__(self, config: CyclesConfig | None = None, *, transport: httpx.AsyncBaseTransport | None = None,
                 http_client: httpx.AsyncClient | None = None, **settings: Any) -> None:
        self.config = cfg = core.make_config(config, settings)
        self._own_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=core.timeout_for(cfg), limits=core.limits_for(cfg),
                                                      transport=transport)
        self._base = cfg.base_url
        self._headers = core.headers_for(cfg)
        self.policy = core.RetryPolicy.from_config(cfg)
        self.journal = (Journal(cfg.resolved_journal_dir(), cfg.base_url, cfg.api_key, cfg.tenant,
                                fsync=cfg.journal_fsync) if cfg.journal_enabled else None)
        self.settler = AsyncSettler(self)
        self.heartbeat = AsyncHeartbeat(self)
        self._closed = False

    async def _send(self, req: core.Prepared, timing: Timing | None = None) -> httpx.Response | BaseException:
        headers = dict(self._headers)
        if req.content is not None:
            headers["Content-Type"] = "application/json"
        if req.idempotency_key:
            headers["X-Idempotency-Key"] = req.idempotency_key
        request = self._http.build_request(req.method, self._base + req.path, content=req.content, params=req.params,
                                           headers=headers)
        t0 = time.monotonic()
        try:
            resp = await self._http.send(request)
            await resp.aread()
        except httpx.HTTPError as exc:
            return exc
        if timing is not None:
            timing.received_at = time.monotonic()
            timing.rtt_ms = (timing.received_at - t0) * 1000
        return resp

    async def _run(self, plan: core.Plan[Any], *, timing: Timing | None = None) -> Any:
        action = next(plan)
        while True:
            if isinstance(action, core.Send):
                answer: Any = await self._send(action.request, timing)
            else:
                await asyncio.sleep(action.seconds)
                answer = None
            try:
                action = plan.send(answer)
            except StopIteration as stop:
                return stop.value

    async def _call(self, req: core.Prepared, policy: core.RetryPolicy | None = None) -> Any:
        return await self._run(core.call(req, policy or self.policy))

    async def create_reservation(self, req: m.ReservationCreateRequest | dict) -> m.ReservationCreateResponse:
        return await self._call(core.create_reservation(req))

    async def commit_reservation(self, reservation_id: str, req: m.CommitRequest | dict) -> m.CommitResponse:
        return await self._call(core.commit(reservation_id, req))

    async def release_reservation(self, reservation_id: str, req: m.ReleaseRequest | dict) -> m.ReleaseResponse:
        return await self._call(core.release(reservation_id, req))

    async def extend_reservation(self, reservation_id: str, req: m.ReservationExtendRequest | dict
                                 ) -> m.ReservationExtendResponse:
        return await self._call(core.extend(reservation_id, req))

    async def decide(self, req: m.DecisionRequest | dict) -> m.DecisionResponse:
        return await self._call(core.decide(req))

    async def create_event(self, req: m.EventCreateRequest | dict) -> m.EventCreateResponse:
        return await self._call(core.create_event(req))

    async def list_reservations(self, **query: Any) -> m.ReservationListResponse:
        return await self._call(core.list_reservations(**query))

    async def get_reservation(self, reservation_id: str) -> m.ReservationDetail:
        return await self._call(core.get_reservation(reservation_id))

    async def get_balances(self, **query: Any) -> m.BalanceResponse:
        return await self._call(core.get_balances(**query))

    async def settle(self, reservation_id: str, commit: m.CommitRequest | dict, *, subject: m.Subject | dict,
                     action: m.Action | dict, metadata: dict | None = None) -> recovery.Outcome:
        record = recovery.build_record(self.config.base_url, reservation_id, core.to_struct(commit, m.CommitRequest),
                                       core.to_struct(subject, m.Subject), core.to_struct(action, m.Action), metadata)
        return await self.settler.settle(record)

    async def flush(self, timeout: float | None = None) -> bool:
        return await self.settler.flush(self.config.retry_flush_timeout if timeout is None else timeout)

    async def recover_pending(self, timeout: float | None = None) -> recovery.RecoveryReport:
        return await self.settler.recover(self.config.retry_flush_timeout if timeout is None else timeout)

    def stream_reservation(self, **kwargs: Any):
        from .streaming import AsyncStreamReservation

        return AsyncStreamReservation(self, **kwargs)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.settler.flush(self.config.retry_flush_timeout)
        self.heartbeat.shutdown()
        if self.journal is not None:
            self.journal.close()
        if self._own_http:
            await self._http.aclose()

    close = aclose

    async def __aenter__(self) -> "AsyncCyclesClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class AsyncSettler:
    def __init__(self, client: AsyncCyclesClient) -> None:
        self.client = client
        self._tasks: set[asyncio.Task] = set()
        self._inflight: set[str] = set()
        self._mine: set[str] = set()
        self._replayed = False

    async def settle(self, record: recovery.PendingRecord) -> recovery.Outcome:
        self._inflight.add(record.reservation_id)
        self._mine.add(record.reservation_id)
        try:
            outcome = await self.client._run(recovery.first_settlement(record, self.client.journal))
        finally:
            self._inflight.discard(record.reservation_id)
        if outcome.kind in (recovery.SUCCESS, recovery.TERMINAL):
            self._mine.discard(record.reservation_id)
        if outcome.kind == recovery.RETRY and self.client.config.retry_enabled:
            self._spawn(record)
        if not self._replayed and self.client.journal is not None and self.client.config.journal_replay:
            self._replayed = True
            self._track(asyncio.ensure_future(self._replay()))
        return outcome

    async def _replay(self) -> None:
        try:
            await self.recover(None, skip_mine=True)
        except Exception:  # noqa: BLE001
            log.warning("journal replay failed", exc_info=True)

    def _track(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn(self, record: recovery.PendingRecord) -> None:
        async def run() -> None:
            self._inflight.add(record.reservation_id)
            try:
                await self.client._run(recovery.retry(record, self.client.journal, self.client.policy,
                                                      attempts=self.client.policy.max_attempts - 1))
            except Exception:  # noqa: BLE001
                log.warning("background settlement of %s failed", record.reservation_id, exc_info=True)
            finally:
                self._inflight.discard(record.reservation_id)

        self._track(asyncio.ensure_future(run()))

    def pending(self) -> int:
        return len(self._tasks)

    async def flush(self, timeout: float) -> bool:
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        if not tasks:
            return True
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, timeout))
        if pending:
            log.warning("flush timed out with %d settlement(s) unresolved; their records stay in the journal",
                        len(pending))
            return False
        return True

    async def recover(self, timeout: float | None, skip_mine: bool = False) -> recovery.RecoveryReport:
        journal = self.client.journal
        report = recovery.RecoveryReport([], [], [], [])
        if journal is None:
            return report
        scan = journal.scan()
        report.quarantined = scan.quarantined
        deadline = None if timeout is None else time.monotonic() + timeout
        for rec in scan.records:
            if rec.reservation_id in self._inflight or (skip_mine and rec.reservation_id in self._mine):
                continue
            self._inflight.add(rec.reservation_id)
            try:
                out = await self.client._run(recovery.retry(rec, journal, self.client.policy, deadline=deadline))
            finally:
                self._inflight.discard(rec.reservation_id)
            {recovery.SUCCESS: report.settled, recovery.TERMINAL: report.rejected}.get(
                out.kind, report.unresolved).append(out)
        return report


class AsyncHeartbeat:
    """Timer handles (`loop.call_later`) per lease; a task exists only while an extend is in flight."""

    def __init__(self, client: AsyncCyclesClient) -> None:
        self.client = client
        self._handles: dict[Lease, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()

    def start(self, ctx: CyclesContext, resp: m.ReservationCreateResponse, ttl_ms: int, timing: Timing,
              on_event: Callable[[HeartbeatEvent], Any] | None = None) -> Lease:
        lease = Lease(ctx, ttl_ms, LeaseSchedule(self.client.config.attempt_budget_s), on_event)
        d = lease.schedule.on_success(resp.remaining_ttl_ms, resp.expires_at_ms, timing.rtt_ms,
                                      timing.received_at or None)
        if d.delay_s is None:
            lease.stopped = True
        else:
            self._schedule(lease, d.delay_s)
        return lease

    def _schedule(self, lease: Lease, delay: float) -> None:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._handles.pop(lease, None)
            if not lease.stopped:
                task = loop.create_task(self._beat(lease))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        self._handles[lease] = loop.call_later(delay, fire)

    def stop(self, lease: Lease) -> None:
        lease.stopped = True
        handle = self._handles.pop(lease, None)
        if handle is not None:
            handle.cancel()

    async def _beat(self, lease: Lease) -> None:
        ctx = lease.ctx
        key = lease.retry_key or core.new_key()
        req = core.extend(ctx.reservation_id or "", m.ReservationExtendRequest(idempotency_key=key,
                                                                               extend_by_ms=lease.ttl_ms))
        timing = Timing()
        try:
            resp = await self.client._run(core.call(req, core.NO_RETRY), timing=timing)
        except e.CyclesError as err:
            if lease.stopped:
                return
            d = lease.schedule.on_failure(err)
            record_event(lease, err, "stop" if d.delay_s is None else f"retry same key in {d.delay_s:.3f}s")
            if d.delay_s is None:
                lease.stopped = True
            else:
                lease.retry_key = key
                self._schedule(lease, d.delay_s)
            return
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001
            record_event(lease, err, "stop")
            lease.stopped = True
            return
        delay = after_extend(lease, resp, timing)
        if delay is not None:
            self._schedule(lease, delay)

    def shutdown(self) -> None:
        for lease in list(self._handles):
            self.stop(lease)
        for task in list(self._tasks):
            task.cancel()
