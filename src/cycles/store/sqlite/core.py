"""The connection and the write path: opening and checking the file, the WAL checkpointer thread, group
commit (`_Op`, `_run_batch`, `_awrite`, `_flush`, `_fail`), `_read`, and the process-wide journal of the
events a transaction produces (`_TX_EVENTS`, `_emit`, `_insert_journal`), written in the same transaction.

`_TX_EVENTS` is one list per process: the other modules only reach it through `_emit` and
`_cascade_event` imported from here, and nothing rebinds it, so the batch runner clears and reads the very
object every transaction appended to."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ...protocol.errors import ProtocolError, StoreUnavailable
from ..base import pending_journal, stamp_journal
from .common import _dumps
from .schema import SCHEMA, _migrate


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


MAX_BATCH = 256  # operations per group commit; more wait for the next one
WAL_KEEP_BYTES = 16 << 20  # the WAL file is cut back to this when the log restarts
WAL_TRUNCATE_BYTES = 64 << 20  # past this the checkpointer forces the log back to empty
# a log this long (16 MiB of 4 KiB pages, WAL_KEEP_BYTES) is restarted under load (_Core._restart_log); each
# restart pauses writes for two fsyncs (a few ms), so not more often than this
RESTART_FRAMES = 4096
RESTART_LEFT = 64  # the thread copies until a pass finds fewer new frames than this
RESTART_WAIT_MS = 50  # how long the RESTART checkpoint waits for the write lock and for readers


@dataclass(slots=True, eq=False)
class _Op:
    """One queued write: the transaction body, the journal of its request, and where to answer."""

    fn: Callable[[sqlite3.Connection, int], Any]
    journal: list[dict[str, Any]]
    future: asyncio.Future
    ok: bool = False
    result: Any = None
    error: BaseException | None = None
    rerun: bool = False  # a function of the store's state alone, safe to run again (_run_batch)


class _Isolate(Exception):
    """A batch run without savepoints must run again with them (_run_batch)."""


class _Busy(Exception):
    """Another process holds the write lock; the transaction did not start."""


class _CommitThenRaise(Exception):
    """Commit what the transaction did so far, then answer with `error` (used when a denied reserve
    expired overdue leases first: those expiries stand, as on every other store)."""

    def __init__(self, error: ProtocolError) -> None:
        super().__init__(error.message)
        self.error = error


class _Core:
    """State, connection and write machinery of SQLiteStore; the other mixins build on it."""

    def __init__(self, path: str, *, synchronous: str = "NORMAL", busy_timeout_ms: int = 10_000,
                 clock: Callable[[], int] = _wall_ms) -> None:
        self.path = path
        self._clock = clock
        self._synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        self._inode: int | None = None
        self._checkpointer: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: list[_Op] = []
        self.batches = 0  # group commits run (the tests check that concurrent writes were grouped)
        self._flush_scheduled = False
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self.restarts = 0  # RESTART checkpoints run under load (the tests check that the log restarts)

    # ---- connection ----

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._connect()
            self._inode = os.stat(self.path).st_ino
            self._start_checkpointer()
        return self._conn

    def _start_checkpointer(self) -> None:
        # Requests never checkpoint (wal_autocheckpoint=0): a checkpoint inside a request's COMMIT
        # stalls the event loop for milliseconds, and with several processes it never completes and
        # repeats on every commit. A background thread copies the WAL back instead with PASSIVE
        # checkpoints, which never take a lock: the next writer then restarts the log from its start,
        # cutting the file to journal_size_limit. Under steady load that never happens by itself: commits
        # land while the thread copies, so no write transaction ever begins on a fully copied log (which is
        # what lets SQLite restart it), and the log grew until the TRUNCATE checkpoint below stalled every
        # commit; meanwhile page lookups searched an ever longer WAL index and writers met SQLITE_BUSY. So
        # once the log is RESTART_FRAMES long the thread restarts it (_restart_log).
        # A TRUNCATE checkpoint holds the write lock while it copies and syncs (commits stalled behind it
        # for 80-140 ms), so it runs only when the WAL has grown past WAL_TRUNCATE_BYTES, i.e. when readers
        # kept the log from restarting for a long time.
        if self._checkpointer is not None or self.path == ":memory:":
            return
        self._stop.clear()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="cycles-checkpoint", daemon=True)
        self._checkpointer.start()

    def _checkpoint_loop(self, interval_s: float = 0.2) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0)
            conn.execute("PRAGMA busy_timeout=0")
        except sqlite3.Error:
            return
        wal = self.path + "-wal"
        try:
            while not self._stop.wait(interval_s):
                try:
                    mode = "TRUNCATE" if os.stat(wal).st_size > WAL_TRUNCATE_BYTES else "PASSIVE"
                except OSError:
                    mode = "PASSIVE"
                try:
                    busy, log, copied = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
                    if mode == "PASSIVE" and not busy and log >= RESTART_FRAMES:
                        self._restart_log(conn, copied)
                except sqlite3.Error:
                    pass  # busy or file gone: the next tick tries again
        finally:
            conn.close()

    def _restart_log(self, conn: sqlite3.Connection, copied: int) -> None:
        """Under steady writes: copy the log again until a pass finds little new (each copies only what commits
        added during the last), then a RESTART checkpoint copies the rest while it holds the write lock, so
        the next write transaction (of any process) begins on a fully copied log and restarts it. Writers
        wait for that lock (the few dozen frames left and the checkpoint's two fsyncs, a few ms) with the
        usual async back-off; the event loop does not stop. Not while a reader pins the log: nothing would
        be copied and writers would wait for nothing."""
        for _ in range(4):
            before = copied
            busy, log, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if busy or copied == before < log:  # another checkpointer, or a reader holds the rest
                return
            if copied - before < RESTART_LEFT:
                break
        conn.execute(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")  # for the write lock and readers to finish
        try:
            busy, _log, _copied = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        finally:
            conn.execute("PRAGMA busy_timeout=0")
        if not busy:
            self.restarts += 1

    def _check_file(self) -> None:
        # An open connection keeps working on a file that was moved or deleted; writing there would
        # lose spend, so a missing or replaced file makes the store unavailable instead.
        try:
            inode = os.stat(self.path).st_ino
        except OSError as exc:
            raise StoreUnavailable(f"SQLite store file {self.path} is missing: {exc}") from exc
        if inode != self._inode:
            raise StoreUnavailable(f"SQLite store file {self.path} was replaced")

    def _connect(self) -> sqlite3.Connection:
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=self._busy_timeout_ms / 1000, cached_statements=256)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("BEGIN IMMEDIATE")
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            _migrate(conn)
            conn.execute("COMMIT")
            # Lock waits are handled by _awrite with short async back-off instead of SQLite's
            # busy handler, whose sleeps are whole milliseconds and block the event loop.
            conn.execute("PRAGMA busy_timeout=0")
            conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it
            conn.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open SQLite store at {self.path}: {exc}") from exc
        return conn

    async def close(self) -> None:
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join(5)
            self._checkpointer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def health(self) -> bool:
        try:
            self.conn.execute("SELECT 1 FROM meta LIMIT 1").fetchall()
            self._check_file()
            return True
        except (sqlite3.Error, StoreUnavailable):
            return False

    async def now_ms(self) -> int:
        return self._clock()

    # ---- group commit ----

    def _run_batch(self, batch: list[_Op]) -> None:
        """Run queued write operations in one `BEGIN IMMEDIATE ... COMMIT`: an operation that raises leaves
        no change behind and answers its error, the others commit. Nobody is answered before the COMMIT
        returned (durable at the configured `synchronous` level). Raises _Busy, before any change, while
        another process holds the lock.

        Each operation runs inside its own SAVEPOINT, except in a batch of runtime operations only (`_Op.rerun`:
        functions of the store's state alone, safe to run again): those run bare, and one that fails after it
        wrote (rare: its checks come before its writes) has the whole transaction rolled back and the batch run
        again with savepoints. A SAVEPOINT and its RELEASE are two of the nine or so statements of a reserve."""
        try:
            self._run_batch_once(batch, isolate=not all(op.rerun for op in batch))
        except _Isolate:
            self._run_batch_once(batch, isolate=True)

    def _run_batch_once(self, batch: list[_Op], isolate: bool) -> None:
        conn = self.conn
        self._check_file()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _locked(exc):
                raise _Busy() from exc
            raise StoreUnavailable(f"store error: {exc}") from exc
        execute = conn.execute
        try:
            for op in batch:
                if op.future.done():  # the request went away before its turn: nothing to do
                    continue
                if isolate:
                    execute("SAVEPOINT op")
                _TX_EVENTS.clear()
                now = self._clock()
                changes = conn.total_changes
                try:
                    op.result = op.fn(conn, now)
                    if _TX_EVENTS or (op.journal and _writes(op.journal)):
                        _insert_journal(conn, stamp_journal([*op.journal, *_TX_EVENTS], now,
                                                            getattr(op.result, "result", None)))
                    op.ok = True
                except _CommitThenRaise as outcome:
                    if _TX_EVENTS:
                        _insert_journal(conn, stamp_journal(list(_TX_EVENTS), now, None))
                    op.error = outcome.error
                except sqlite3.OperationalError:
                    raise  # the file or the disk failed: the whole transaction goes
                except Exception as exc:  # noqa: BLE001 - the operation's own answer (ProtocolError mostly)
                    if isolate:
                        execute("ROLLBACK TO op")
                    elif conn.total_changes != changes:
                        raise _Isolate() from exc  # it wrote before failing: only a savepoint undoes that alone
                    op.error = exc
                if isolate:
                    execute("RELEASE op")
            execute("COMMIT")
            self.batches += 1
        except BaseException as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            for op in batch:
                op.ok, op.error, op.result = False, None, None
            if isinstance(exc, sqlite3.OperationalError):
                if _locked(exc):
                    raise _Busy() from exc
                raise StoreUnavailable(f"store error: {exc}") from exc
            raise

    async def _awrite(self, fn: Callable[[sqlite3.Connection, int], Any],
                      journal: list[dict[str, Any]] | None = None, *, rerun: bool = False) -> Any:
        """Run `fn` in a write transaction, grouped with the other writes queued at the same time.

        Group commit on the event loop's thread: the first write schedules a flush with call_soon, the
        writes of every request that becomes ready before it joins the same transaction, so BEGIN,
        COMMIT and the pages they share (a hot budget row) are paid once per batch. A transaction never
        awaits, so it is never interleaved with another coroutine of this process. While another
        process holds the lock, the batch waits with a short async back-off; a batch that did not
        start changed nothing, so retrying it is safe.
        """
        loop = asyncio.get_running_loop()
        op = _Op(fn, pending_journal() if journal is None else journal, loop.create_future(), rerun=rerun)
        self._queue.append(op)
        if not self._flush_scheduled or self._flush_loop is not loop:
            # (a store used from a new loop after the old one closed with a flush pending)
            self._flush_scheduled, self._flush_loop = True, loop
            loop.call_soon(self._flush, loop, 0.0, None)
        return await op.future

    def _flush(self, loop: asyncio.AbstractEventLoop, delay: float, deadline: float | None) -> None:
        if loop is not self._flush_loop:
            return  # superseded by a flush on the loop now in use
        batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        try:
            self._run_batch(batch)
        except _Busy:
            now = time.monotonic()
            if deadline is None:
                deadline = now + self._busy_timeout_ms / 1000
            if now <= deadline:
                self._queue[0:0] = batch
                delay = 0.00005 if delay == 0 else min(delay * 2, 0.001)  # transactions are short: poll often
                loop.call_later(delay, self._flush, loop, delay, deadline)
                return
            self._fail(batch, StoreUnavailable("store is locked by another process"))
        except BaseException as exc:  # noqa: BLE001 - every waiting request hears of it
            self._fail(batch, exc if isinstance(exc, Exception) else StoreUnavailable(str(exc)))
        else:
            for op in batch:
                if op.future.done():
                    continue
                if op.ok:
                    op.journal.clear()
                    op.future.set_result(op.result)
                else:
                    op.future.set_exception(op.error)
        if self._queue:
            loop.call_soon(self._flush, loop, 0.0, None)
        else:
            self._flush_scheduled = False

    @staticmethod
    def _fail(batch: list[_Op], exc: BaseException) -> None:
        for op in batch:
            if not op.future.done():
                op.future.set_exception(exc)

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        attempt = 0
        while True:  # WAL readers are rarely busy (only while another process recovers the WAL index)
            try:
                return self.conn.execute(sql, tuple(params)).fetchall()
            except sqlite3.OperationalError as exc:
                attempt += 1
                if not _locked(exc) or attempt >= 200:
                    raise StoreUnavailable(str(exc)) from exc
                time.sleep(0.0005)


# Events the current transaction produced (exhausted, over limit, expired...). Transactions run one
# at a time on the event loop's thread and never await, so one list per process is enough; it is
# emptied when each transaction starts and written by it.
_TX_EVENTS: list[dict[str, Any]] = []


def _emit(event_type: str, tenant: str, scope: str | None, data: dict[str, Any], *, system: bool = False) -> None:
    entry: dict[str, Any] = {"journal": "event", "event_type": event_type, "tenant_id": tenant, "scope": scope,
                             "data": data}
    if system:
        entry["actor"] = {"type": "system"}
        entry["source"] = "expiry-sweeper"
    _TX_EVENTS.append(entry)


def _cascade_event(event_type: str, tenant: str, correlation_id: str, **data: Any) -> None:
    _emit(event_type, tenant, data.get("scope"), {**data, "cascade_reason": "tenant_closed"})
    _TX_EVENTS[-1]["correlation_id"] = correlation_id


def _writes(journal: list[dict[str, Any]]) -> bool:
    for entry in journal:  # (a loop: any() over a generator costs a frame per call on the hot path)
        if entry.get("journal") != "context":
            return True
    return False


def _insert_journal(conn: sqlite3.Connection, entries: list[dict[str, Any]]) -> None:
    audit = [e for e in entries if e.get("journal", "audit") == "audit"]
    events = [e for e in entries if e.get("journal") == "event"]
    if audit:
        conn.executemany("INSERT INTO audit (log_id, timestamp_ms, tenant_id, record) VALUES (?,?,?,?)",
                         [(e["log_id"], e["timestamp_ms"], e["tenant_id"], _dumps(e)) for e in audit])
    if events:
        conn.executemany(
            "INSERT INTO gov_events (event_id, timestamp_ms, tenant_id, event_type, scope, correlation_id, record) "
            "VALUES (?,?,?,?,?,?,?)",
            [(e["event_id"], e["timestamp_ms"], e["tenant_id"], e["event_type"], e.get("scope") or "",
              e.get("correlation_id"), _dumps(e)) for e in events])


def _locked(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text
