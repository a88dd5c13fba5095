"""One guarded call: reserve (or shadow-evaluate), run, then commit the actual or release.

Used by the `@cycles` decorator and by `stream_reservation`. Settlement goes through the client's
settler (journal + same-key recovery); a failure after the work ran never releases the reservation.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from typing import Any

from ..protocol import models as m
from . import errors as e
from . import recovery
from .context import CyclesContext, HeartbeatEvent
from .lifecycle import CallSpec, deny_error, usage_metrics
from .sync import Timing

log = logging.getLogger("cycles.client")


def _shadow_context(spec: CallSpec, resp: m.ReservationCreateResponse | None, err: Exception | None) -> CyclesContext:
    if resp is not None:
        ctx = CyclesContext.from_response(resp, estimate=spec.estimate, unit=spec.unit, key=spec.keys.reservation,
                                          shadow=True)
        ctx.reservation_id = None
    else:
        ctx = CyclesContext(None, spec.estimate, spec.unit, "UNKNOWN", spec.keys.reservation, shadow=True,
                            reason_code=type(err).__name__ if err else None)
    log.info("shadow decision for %s/%s: %s%s (nothing held or charged)", spec.action.kind, spec.action.name,
             ctx.decision, f" reason={ctx.reason_code}" if ctx.reason_code else "")
    return ctx


class _GuardBase:
    def __init__(self, client: Any, spec: CallSpec, *, shadow: bool = False, heartbeat: bool = True,
                 on_heartbeat_event: Any = None) -> None:
        self.client = client
        self.spec = spec
        self.shadow = shadow
        self.heartbeat = heartbeat and client.config.heartbeat_enabled
        self.on_heartbeat_event = on_heartbeat_event
        self.ctx: CyclesContext | None = None
        self.lease: Any = None
        self.started = 0.0
        self.outcome: recovery.Outcome | None = None
        self.release_error: BaseException | None = None
        self.finished = False

    def _latency(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    def _record(self, actual: int, actual_source: str | None) -> recovery.PendingRecord:
        assert self.ctx is not None and self.ctx.reservation_id is not None
        usage_metrics(self.ctx, self._latency())
        commit = self.spec.commit_request(self.ctx, actual, actual_source=actual_source)
        return recovery.build_record(self.client.config.base_url, self.ctx.reservation_id, commit, self.spec.subject,
                                     self.spec.action, self.spec.metadata)

    def _heartbeat(self) -> Any:
        return self.client.heartbeat

    def _stop_heartbeat(self) -> None:
        if self.lease is not None:
            self._heartbeat().stop(self.lease)

    def _entered(self, resp: m.ReservationCreateResponse, timing: Timing) -> CyclesContext:
        """Turn a live create response into the call's context and start its heartbeat."""
        if resp.decision == "DENY":
            raise deny_error(resp)
        spec = self.spec
        if spec.keys.chosen and resp.reservation_id and resp.remaining_ttl_ms == 0:
            # A replay answers with the original reservation and, once it is no longer ACTIVE, a
            # remaining_ttl_ms of 0 (protocol IDEMPOTENCY): the key was used by a call already settled.
            raise e.IdempotencyKeyReusedError(
                f"idempotency_key {spec.keys.reservation!r} was already used by a finished call (reservation "
                f"{resp.reservation_id}); this call would not be charged, so it does not run. Give each unit of "
                "work its own key (e.g. job id + step)", status=200, error_code="RESERVATION_FINALIZED")
        self.ctx = CyclesContext.from_response(resp, estimate=spec.estimate, unit=spec.unit, key=spec.keys.reservation)
        if self.heartbeat and resp.reservation_id:
            self.lease = self._heartbeat().start(self.ctx, resp, spec.ttl_ms, timing, self.on_heartbeat_event)
        self.started = time.monotonic()
        return self.ctx

    def _shadow_entered(self, resp: m.ReservationCreateResponse | None, err: Exception | None) -> CyclesContext:
        if err is not None:
            log.warning("shadow evaluation failed (the function still runs): %s", err)
        self.ctx = _shadow_context(self.spec, resp, err)
        self.started = time.monotonic()
        return self.ctx

    def _finish(self) -> bool:
        """Mark the call settled and stop its heartbeat; False when it already was."""
        if self.finished:
            return False
        self.finished = True
        self._stop_heartbeat()
        return True

    def _log_outcome(self) -> None:
        o = self.outcome
        if o is not None and o.kind != recovery.SUCCESS:
            log.warning("settlement of %s: %s (%s)", o.reservation_id, o.kind, o.error)
            if self.spec.keys.chosen and isinstance(o.error, e.IdempotencyMismatchError):
                # the work ran and its spend was not recorded: a log line alone goes unseen
                warnings.warn(e.IdempotencyKeyWarning(
                    f"commit of {o.reservation_id} was refused ({o.error.error_code}): its idempotency key "
                    f"{self.spec.keys.commit!r} belongs to a different request, so this call's spend was not "
                    "charged; give each unit of work its own idempotency_key"), stacklevel=4)


class SyncGuard(_GuardBase):
    def enter(self) -> CyclesContext:
        spec = self.spec
        if self.shadow:
            try:
                return self._shadow_entered(self.client.create_reservation(spec.create_request(dry_run=True)), None)
            except e.CyclesError as err:
                return self._shadow_entered(None, err)
        timing = Timing()
        from . import core

        resp = self.client._run(core.call(core.create_reservation(spec.create_request()), self.client.policy),
                                timing=timing)
        return self._entered(resp, timing)

    def _heartbeat(self) -> Any:
        return self.client._hb()  # the sync client starts its heartbeat thread on first use

    def commit(self, actual: int, actual_source: str | None = None) -> recovery.Outcome | None:
        if not self._finish():
            return self.outcome
        if self.shadow or self.ctx is None:
            return None
        self.outcome = self.client.settler.settle(self._record(actual, actual_source))
        self._log_outcome()
        return self.outcome

    def release(self, reason: str) -> None:
        if not self._finish() or self.shadow or self.ctx is None or self.ctx.reservation_id is None:
            return
        try:
            self.client.release_reservation(self.ctx.reservation_id, self.spec.release_request(reason))
        except BaseException as err:  # noqa: BLE001 - the original exception is what the caller must see
            self.release_error = err
            log.warning("release of %s failed (it expires at its TTL): %s", self.ctx.reservation_id, err)


class AsyncGuard(_GuardBase):
    async def enter(self) -> CyclesContext:
        from . import core

        spec = self.spec
        if self.shadow:
            try:
                return self._shadow_entered(await self.client.create_reservation(spec.create_request(dry_run=True)),
                                            None)
            except e.CyclesError as err:
                return self._shadow_entered(None, err)
        timing = Timing()
        create = asyncio.ensure_future(self.client._run(
            core.call(core.create_reservation(spec.create_request()), self.client.policy), timing=timing))
        try:
            resp = await asyncio.shield(create)
        except asyncio.CancelledError:
            # Cancelled while the create was in flight: let it finish, then release what it may hold.
            asyncio.ensure_future(self._release_after(create))
            raise
        return self._entered(resp, timing)

    async def _release_after(self, create: "asyncio.Future[Any]") -> None:
        try:
            resp = await create
        except BaseException:  # noqa: BLE001
            return
        if resp.reservation_id and resp.decision != "DENY":
            try:
                await self.client.release_reservation(resp.reservation_id, self.spec.release_request("cancelled"))
            except BaseException as err:  # noqa: BLE001
                log.warning("release of %s after cancellation failed: %s", resp.reservation_id, err)

    async def commit(self, actual: int, actual_source: str | None = None) -> recovery.Outcome | None:
        if not self._finish():
            return self.outcome
        if self.shadow or self.ctx is None:
            return None
        record = self._record(actual, actual_source)
        # Shielded: a cancellation arriving now must not abandon a commit whose actual is known.
        self.outcome = await asyncio.shield(self.client.settler.settle(record))
        self._log_outcome()
        return self.outcome

    async def release(self, reason: str) -> None:
        if not self._finish() or self.shadow or self.ctx is None or self.ctx.reservation_id is None:
            return
        task = asyncio.ensure_future(self.client.release_reservation(self.ctx.reservation_id,
                                                                     self.spec.release_request(reason)))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # Cancelled again during release: the shielded task still completes on the loop.
            log.warning("release of %s continues in the background after a second cancellation",
                        self.ctx.reservation_id)
            raise
        except BaseException as err:  # noqa: BLE001
            self.release_error = err
            log.warning("release of %s failed (it expires at its TTL): %s", self.ctx.reservation_id, err)


__all__ = ["SyncGuard", "AsyncGuard", "HeartbeatEvent"]
