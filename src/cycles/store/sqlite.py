"""The embedded store: one SQLite file in WAL mode.

Every mutating operation runs in one `BEGIN IMMEDIATE` transaction, which takes SQLite's single
write lock, so operations are serialized across threads and across every server process that opens
the same file. Reads run outside transactions and see a consistent snapshot per statement.

Calls run on the event loop's thread: a transaction is a handful of indexed statements (tens of
microseconds), cheaper than a hop to a worker thread. `busy_timeout` bounds how long one process
waits for another's write lock before the request fails with 503.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import msgspec

from ..core import ledger as L
from ..core import events as E
from ..core import policies as P
from ..protocol.errors import ErrorCode, ProtocolError, StoreUnavailable, VersionConflict
from .base import (
    AuditScan,
    EventCommand,
    FundCommand,
    Outcome,
    Page,
    ReservationQuery,
    ReserveCommand,
    SettleCommand,
    StaleGovernance,
    Store,
    pending_journal,
    stamp_journal,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tenants (
    tenant_id TEXT PRIMARY KEY, status TEXT NOT NULL, record TEXT NOT NULL, created_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY, prefix TEXT NOT NULL UNIQUE, tenant_id TEXT NOT NULL, record TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS budgets (
    tenant_id TEXT NOT NULL, scope TEXT NOT NULL, unit TEXT NOT NULL, ledger_id TEXT NOT NULL UNIQUE,
    allocated INTEGER NOT NULL, spent INTEGER NOT NULL DEFAULT 0, reserved INTEGER NOT NULL DEFAULT 0,
    debt INTEGER NOT NULL DEFAULT 0, overdraft_limit INTEGER NOT NULL DEFAULT 0,
    is_over_limit INTEGER NOT NULL DEFAULT 0, status TEXT NOT NULL DEFAULT 'ACTIVE',
    commit_overage_policy TEXT, extra TEXT NOT NULL DEFAULT '{}',
    created_at_ms INTEGER NOT NULL, updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, scope, unit)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (
    reservation_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, status TEXT NOT NULL,
    subject TEXT NOT NULL, action TEXT NOT NULL, unit TEXT NOT NULL, amount INTEGER NOT NULL,
    scope_path TEXT NOT NULL, affected_scopes TEXT NOT NULL, budgeted_scopes TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL, expires_at_ms INTEGER NOT NULL, grace_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL, overage_policy TEXT NOT NULL, idempotency_key TEXT,
    metadata TEXT, committed INTEGER, committed_metadata TEXT, finalized_at_ms INTEGER,
    extensions INTEGER NOT NULL DEFAULT 0, max_extensions INTEGER NOT NULL,
    s_workspace TEXT, s_app TEXT, s_workflow TEXT, s_agent TEXT, s_toolset TEXT, commit_limits TEXT
);
CREATE INDEX IF NOT EXISTS reservations_tenant_created ON reservations (tenant_id, created_at_ms, reservation_id);
CREATE INDEX IF NOT EXISTS reservations_active_deadline ON reservations (status, deadline_ms);
CREATE INDEX IF NOT EXISTS reservations_tenant_key ON reservations (tenant_id, idempotency_key);
CREATE TABLE IF NOT EXISTS idempotency (
    tenant_id TEXT NOT NULL, endpoint TEXT NOT NULL, key TEXT NOT NULL, payload_hash TEXT NOT NULL,
    result TEXT NOT NULL, reservation_id TEXT, created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, endpoint, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created_at_ms);
CREATE TABLE IF NOT EXISTS audit (
    timestamp_ms INTEGER NOT NULL, log_id TEXT NOT NULL, tenant_id TEXT NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (timestamp_ms, log_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS audit_tenant_time ON audit (tenant_id, timestamp_ms, log_id);
CREATE TABLE IF NOT EXISTS docs (
    kind TEXT NOT NULL, doc_id TEXT NOT NULL, tenant_id TEXT NOT NULL, version INTEGER NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (kind, doc_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS docs_tenant ON docs (kind, tenant_id);
CREATE TABLE IF NOT EXISTS rate_counters (
    bucket TEXT NOT NULL, window INTEGER NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (bucket, window)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gov_events (
    event_id TEXT PRIMARY KEY, timestamp_ms INTEGER NOT NULL, tenant_id TEXT NOT NULL, event_type TEXT NOT NULL,
    scope TEXT NOT NULL, correlation_id TEXT, record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS gov_events_time ON gov_events (timestamp_ms, event_id);
CREATE INDEX IF NOT EXISTS gov_events_tenant_time ON gov_events (tenant_id, timestamp_ms, event_id);
CREATE TABLE IF NOT EXISTS gens (tenant_id TEXT PRIMARY KEY, gen INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, scope_path TEXT NOT NULL, subject TEXT NOT NULL,
    action TEXT NOT NULL, unit TEXT NOT NULL, actual INTEGER NOT NULL, charged INTEGER NOT NULL,
    overage_policy TEXT NOT NULL, metadata TEXT, created_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
"""

# Counters for the overview, kept by triggers in the same transaction as every change they count.
COUNTER_TRIGGERS = """
CREATE TRIGGER counters_tenant_insert AFTER INSERT ON tenants BEGIN
  INSERT INTO counters VALUES ('tenants.' || NEW.status, 1) ON CONFLICT (name) DO UPDATE SET value = value + 1;
END;;
CREATE TRIGGER counters_tenant_status AFTER UPDATE OF status ON tenants WHEN OLD.status != NEW.status BEGIN
  UPDATE counters SET value = value - 1 WHERE name = 'tenants.' || OLD.status;
  INSERT INTO counters VALUES ('tenants.' || NEW.status, 1) ON CONFLICT (name) DO UPDATE SET value = value + 1;
END;;
CREATE TRIGGER counters_budget_insert AFTER INSERT ON budgets BEGIN
  INSERT INTO counters VALUES ('budgets.' || NEW.status, 1) ON CONFLICT (name) DO UPDATE SET value = value + 1;
  INSERT INTO counters VALUES ('budgets.unit.' || NEW.unit, 1) ON CONFLICT (name) DO UPDATE SET value = value + 1;
  INSERT INTO counters VALUES ('budgets.over_limit', NEW.is_over_limit) ON CONFLICT (name) DO UPDATE SET value = value + NEW.is_over_limit;
  INSERT INTO counters VALUES ('budgets.with_debt', NEW.debt > 0) ON CONFLICT (name) DO UPDATE SET value = value + (NEW.debt > 0);
END;;
CREATE TRIGGER counters_budget_change AFTER UPDATE OF status, is_over_limit, debt ON budgets
WHEN OLD.status != NEW.status OR OLD.is_over_limit != NEW.is_over_limit OR (OLD.debt > 0) != (NEW.debt > 0) BEGIN
  UPDATE counters SET value = value - 1 WHERE name = 'budgets.' || OLD.status;
  INSERT INTO counters VALUES ('budgets.' || NEW.status, 1) ON CONFLICT (name) DO UPDATE SET value = value + 1;
  INSERT INTO counters VALUES ('budgets.over_limit', NEW.is_over_limit - OLD.is_over_limit)
    ON CONFLICT (name) DO UPDATE SET value = value + NEW.is_over_limit - OLD.is_over_limit;
  INSERT INTO counters VALUES ('budgets.with_debt', (NEW.debt > 0) - (OLD.debt > 0))
    ON CONFLICT (name) DO UPDATE SET value = value + (NEW.debt > 0) - (OLD.debt > 0);
END
"""

# The governance generation of a tenant (Store.governance_gen), bumped in the same transaction as every change
# to what servers cache about the tenant: its record, its API keys (other than their last use), its policies.
GEN_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS gen_tenant AFTER UPDATE ON tenants BEGIN
  INSERT INTO gens VALUES (NEW.tenant_id, 1) ON CONFLICT (tenant_id) DO UPDATE SET gen = gen + 1;
END;;
CREATE TRIGGER IF NOT EXISTS gen_key_update AFTER UPDATE ON api_keys
WHEN json_remove(OLD.record, '$.last_used_at_ms') IS NOT json_remove(NEW.record, '$.last_used_at_ms') BEGIN
  INSERT INTO gens VALUES (NEW.tenant_id, 1) ON CONFLICT (tenant_id) DO UPDATE SET gen = gen + 1;
END;;
CREATE TRIGGER IF NOT EXISTS gen_key_delete AFTER DELETE ON api_keys BEGIN
  INSERT INTO gens VALUES (OLD.tenant_id, 1) ON CONFLICT (tenant_id) DO UPDATE SET gen = gen + 1;
END;;
CREATE TRIGGER IF NOT EXISTS gen_policy_insert AFTER INSERT ON docs WHEN NEW.kind = 'policy' BEGIN
  INSERT INTO gens VALUES (NEW.tenant_id, 1) ON CONFLICT (tenant_id) DO UPDATE SET gen = gen + 1;
END;;
CREATE TRIGGER IF NOT EXISTS gen_policy_update AFTER UPDATE ON docs WHEN NEW.kind = 'policy' OR OLD.kind = 'policy' BEGIN
  INSERT INTO gens VALUES (NEW.tenant_id, 1) ON CONFLICT (tenant_id) DO UPDATE SET gen = gen + 1;
  INSERT INTO gens VALUES (OLD.tenant_id, 1) ON CONFLICT (tenant_id) DO UPDATE SET gen = gen + 1;
END;;
CREATE TRIGGER IF NOT EXISTS gen_policy_delete AFTER DELETE ON docs WHEN OLD.kind = 'policy' BEGIN
  INSERT INTO gens VALUES (OLD.tenant_id, 1) ON CONFLICT (tenant_id) DO UPDATE SET gen = gen + 1;
END
"""

_LEDGER_COLS = "scope, unit, allocated, spent, reserved, debt, overdraft_limit, is_over_limit, status, commit_overage_policy"
_RES_COLS = (
    "reservation_id, tenant_id, status, subject, action, unit, amount, scope_path, affected_scopes, "
    "budgeted_scopes, created_at_ms, expires_at_ms, grace_ms, deadline_ms, overage_policy, idempotency_key, "
    "metadata, committed, committed_metadata, finalized_at_ms, extensions, max_extensions"
)
SUBJECT_LEVELS = ("workspace", "app", "workflow", "agent", "toolset")

DEFAULT_TTL_MS = 60_000
DEFAULT_GRACE_MS = 5_000
DEFAULT_MAX_EXTENSIONS = 10


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


_ID_PROCESS = secrets.randbits(40)
_ID_SEQ = itertools.count()


def time_ordered_id(prefix: str, now_ms: int) -> str:
    """`<prefix>_` + 24 hex digits: the time, then this process's random part and a counter. Unique across
    processes (40 random bits) and time-ordered, so a batch of new rows fills one B-tree page instead of
    dirtying a random page each."""
    return f"{prefix}_{now_ms & 0xFFFFFFFFFF:010x}{_ID_PROCESS:010x}{next(_ID_SEQ) & 0xFFFF:04x}"


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def _dumps(obj: Any) -> str:
    return _encode(obj).decode()


MAX_BATCH = 256  # operations per group commit; more wait for the next one


@dataclass(slots=True, eq=False)
class _Op:
    """One queued write: the transaction body, the journal of its request, and where to answer."""

    fn: Callable[[sqlite3.Connection, int], Any]
    journal: list[dict[str, Any]]
    future: asyncio.Future
    ok: bool = False
    result: Any = None
    error: BaseException | None = None


class _Busy(Exception):
    """Another process holds the write lock; the transaction did not start."""


class _CommitThenRaise(Exception):
    """Commit what the transaction did so far, then answer with `error` (used when a denied reserve
    expired overdue leases first: those expiries stand, as on every other store)."""

    def __init__(self, error: ProtocolError) -> None:
        super().__init__(error.message)
        self.error = error


def _ledger(row: Sequence[Any]) -> L.Ledger:
    return L.Ledger(row[0], row[1], row[2], row[3], row[4], row[5], row[6], bool(row[7]), row[8])


def balance_record(led: L.Ledger) -> list[Any]:
    """The compact form of a ledger inside result records (rendered into a wire Balance)."""
    return [led.scope, led.unit, led.allocated, led.spent, led.reserved, led.debt, led.overdraft_limit, led.is_over_limit]


class SQLiteStore(Store):
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
        self.batches = 0  # group commits run, and the operations they carried (tests, /metrics)
        self.batched_ops = 0
        self._flush_scheduled = False
        self._flush_loop: asyncio.AbstractEventLoop | None = None

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
        # repeats on every commit. A background thread copies the WAL back instead; PASSIVE never
        # waits for a lock, and TRUNCATE (tried now and then) keeps the WAL file small.
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
        ticks = 0
        try:
            while not self._stop.wait(interval_s):
                ticks += 1
                mode = "TRUNCATE" if ticks % 25 == 0 else "PASSIVE"
                try:
                    conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
                except sqlite3.Error:
                    pass  # busy or file gone: the next tick tries again
        finally:
            conn.close()

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

    def _run_batch(self, batch: list[_Op]) -> None:
        """Run queued write operations in one `BEGIN IMMEDIATE ... COMMIT`, each inside its own
        SAVEPOINT: an operation that raises is rolled back to its savepoint and answers its error,
        the others commit. Nobody is answered before the COMMIT returned (durable at the configured
        `synchronous` level). Raises _Busy, before any change, while another process holds the lock."""
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
                execute("SAVEPOINT op")
                _TX_EVENTS.clear()
                now = self._clock()
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
                    execute("ROLLBACK TO op")
                    op.error = exc
                execute("RELEASE op")
            execute("COMMIT")
            self.batches += 1
            self.batched_ops += len(batch)
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

    async def _awrite(self, fn: Callable[[sqlite3.Connection, int], Any]) -> Any:
        """Run `fn` in a write transaction, grouped with the other writes queued at the same time.

        Group commit on the event loop's thread: the first write schedules a flush with call_soon, the
        writes of every request that becomes ready before it joins the same transaction, so BEGIN,
        COMMIT and the pages they share (a hot budget row) are paid once per batch. A transaction never
        awaits, so it is never interleaved with another coroutine of this process. While another
        process holds the lock, the batch waits with a short async back-off; a batch that did not
        start changed nothing, so retrying it is safe.
        """
        loop = asyncio.get_running_loop()
        op = _Op(fn, pending_journal(), loop.create_future())
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

    # ---- settings, tenants, keys ----

    async def get_setting(self, name: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE name=?", (name,))
        return rows[0][0] if rows else None

    async def put_setting(self, name: str, value: str, *, only_if_absent: bool) -> str:
        def tx(conn: sqlite3.Connection, now: int) -> str:
            if only_if_absent:
                conn.execute("INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)", (name, value))
                return conn.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()[0]
            conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))
            return value

        return await self._awrite(tx)

    async def create_tenant(self, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        def tx(conn: sqlite3.Connection, now: int) -> tuple[dict[str, Any], bool]:
            row = conn.execute("SELECT record FROM tenants WHERE tenant_id=?", (record["tenant_id"],)).fetchone()
            if row:
                journal = pending_journal()
                journal[:] = [e for e in journal if not e.get("only_if_created")]
                return _decode(row[0]), False
            conn.execute(
                "INSERT INTO tenants (tenant_id, status, record, created_at_ms) VALUES (?, ?, ?, ?)",
                (record["tenant_id"], record["status"], _dumps(record), now),
            )
            return record, True

        return await self._awrite(tx)

    async def get_tenant(self, tenant_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT record FROM tenants WHERE tenant_id=?", (tenant_id,))
        return _decode(rows[0][0]) if rows else None

    async def update_tenant(self, tenant_id: str, changes: dict[str, Any], now_iso: str) -> dict[str, Any]:
        def tx(conn: sqlite3.Connection, now: int) -> dict[str, Any]:
            record = _tenant_state(conn, tenant_id)
            if record is None:
                raise ProtocolError(ErrorCode.NOT_FOUND, f"Tenant {tenant_id} not found")
            if record["status"] == "CLOSED":
                raise ProtocolError(ErrorCode.TENANT_CLOSED, f"Tenant {tenant_id} is closed")
            status = changes.get("status")
            if status == "SUSPENDED" and record["status"] != "SUSPENDED":
                record["suspended_at"] = now_iso
            if status == "CLOSED":
                record["closed_at"] = now_iso
                record["cascade"] = "PENDING"  # finished by cascade_close, resumed after a crash
            record.update(changes)
            record["updated_at"] = now_iso
            conn.execute("UPDATE tenants SET status=?, record=? WHERE tenant_id=?",
                         (record["status"], _dumps(record), tenant_id))
            return record

        return await self._awrite(tx)

    async def create_api_key(self, record: dict[str, Any]) -> None:
        def tx(conn: sqlite3.Connection, now: int) -> None:
            try:
                conn.execute(
                    "INSERT INTO api_keys (key_id, prefix, tenant_id, record, created_at_ms) VALUES (?, ?, ?, ?, ?)",
                    (record["key_id"], record["key_prefix"], record["tenant_id"], _dumps(record), now),
                )
            except sqlite3.IntegrityError:
                raise ProtocolError(ErrorCode.INTERNAL_ERROR, "API key prefix collision; retry the request") from None

        await self._awrite(tx)

    async def governance_gen(self, tenant: str) -> int:
        rows = self._read("SELECT gen FROM gens WHERE tenant_id=?", (tenant,))
        return rows[0][0] if rows else 0

    async def find_api_key(self, prefix: str) -> dict[str, Any] | None:
        rows = self._read("SELECT record FROM api_keys WHERE prefix=?", (prefix,))
        return _decode(rows[0][0]) if rows else None

    # ---- budgets ----

    async def create_budget(self, record: dict[str, Any]) -> dict[str, Any]:
        def tx(conn: sqlite3.Connection, now: int) -> dict[str, Any]:
            _guard_tenant_open(conn, record["tenant_id"])
            exists = conn.execute(
                "SELECT 1 FROM budgets WHERE tenant_id=? AND scope=? AND unit=?",
                (record["tenant_id"], record["scope"], record["unit"]),
            ).fetchone()
            if exists:
                raise ProtocolError(
                    ErrorCode.DUPLICATE_RESOURCE,
                    f"Budget already exists for scope {record['scope']} and unit {record['unit']}",
                    details={"scope": record["scope"], "unit": record["unit"]},
                )
            ledger_id = new_id("ldg")
            conn.execute(
                "INSERT INTO budgets (tenant_id, scope, unit, ledger_id, allocated, overdraft_limit, "
                "commit_overage_policy, extra, created_at_ms, updated_at_ms, period_end_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (record["tenant_id"], record["scope"], record["unit"], ledger_id, record["allocated"],
                 record.get("overdraft_limit", 0), record.get("commit_overage_policy"),
                 _dumps(record.get("extra") or {}), now, now, (record.get("extra") or {}).get("period_end_ms")),
            )
            return _budget_rows(conn, "WHERE tenant_id=? AND scope=? AND unit=?",
                                (record["tenant_id"], record["scope"], record["unit"]))[0]

        return await self._awrite(tx)

    async def list_budgets(self, tenant: str | None, filters: dict[str, Any], limit: int,
                           after: tuple[str, str, str] | None) -> Page:
        where, params = [], []
        if tenant is not None:
            where.append("tenant_id=?")
            params.append(tenant)
        if filters.get("scope_prefix"):
            # the scope itself and its descendants: workspace:eng does not take in workspace:engineering
            prefix = filters["scope_prefix"].rstrip("/")
            where.append("(scope = ? OR substr(scope, 1, ?) = ?)")
            params += [prefix, len(prefix) + 1, prefix + "/"]
        for col in ("unit", "status"):
            if filters.get(col):
                where.append(f"{col}=?")
                params.append(filters[col])
        if filters.get("over_limit") is not None:
            where.append("is_over_limit=?")
            params.append(1 if filters["over_limit"] else 0)
        if filters.get("has_debt") is not None:
            where.append("debt > 0" if filters["has_debt"] else "debt = 0")
        if after is not None:
            where.append("(tenant_id, scope, unit) > (?, ?, ?)")
            params += list(after)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        rows = _budget_rows(self.conn, f"{clause} ORDER BY tenant_id, scope, unit LIMIT ?", (*params, limit + 1))
        return Page(rows[:limit], len(rows) > limit)

    async def fund(self, cmd: FundCommand) -> Outcome:
        def tx(conn: sqlite3.Connection, now: int) -> Outcome:
            if cmd.idempotency_key:
                replay = _replay(conn, cmd.tenant, "fund", cmd.idempotency_key, cmd.payload_hash)
                if replay is not None:
                    return Outcome(_decode(replay[0]), replay=True, now_ms=now)
            _guard_tenant_open(conn, cmd.tenant)
            row = conn.execute(
                f"SELECT {_LEDGER_COLS} FROM budgets WHERE tenant_id=? AND scope=? AND unit=?",
                (cmd.tenant, cmd.scope, cmd.unit),
            ).fetchone()
            if row is None:
                raise ProtocolError(ErrorCode.NOT_FOUND, f"Budget not found for scope {cmd.scope} and unit {cmd.unit}")
            before = _ledger(row)
            after = L.fund(before, cmd.operation, cmd.amount, cmd.spent)
            _write_ledgers(conn, cmd.tenant, [after], now, before=[before])
            if cmd.operation in ("RESET", "RESET_SPENT"):
                _set_period_allocation(conn, cmd.tenant, cmd.scope, cmd.unit, cmd.amount)
            result = {
                "operation": cmd.operation, "unit": cmd.unit, "timestamp_ms": now,
                "previous": [before.allocated, before.remaining, before.debt, before.spent],
                "new": [after.allocated, after.remaining, after.debt, after.spent],
            }
            if cmd.idempotency_key:
                _remember(conn, cmd.tenant, "fund", cmd.idempotency_key, cmd.payload_hash, result, None, now)
            return Outcome(result, now_ms=now)

        return await self._awrite(tx)

    # ---- runtime ----

    async def reserve(self, cmd: ReserveCommand) -> Outcome:
        return await self._awrite(lambda conn, now: self._reserve(conn, now, cmd))

    def _reserve(self, conn: sqlite3.Connection, now: int, cmd: ReserveCommand) -> Outcome:
        if cmd.gen is not None:
            _check_gen(conn, cmd.tenant, cmd.gen)
        replay = _replay(conn, cmd.tenant, cmd.endpoint, cmd.idempotency_key, cmd.payload_hash)
        if replay is not None:
            return _replayed(conn, replay, now)
        evaluate_only = cmd.dry_run or cmd.endpoint == "decide"
        tenant = _tenant_state(conn, cmd.tenant)
        base = {"scope_path": cmd.scope_path, "affected_scopes": cmd.scopes, "unit": cmd.unit, "amount": cmd.amount}

        def deny(reason: str, ledgers: Sequence[L.Ledger] = ()) -> Outcome:
            result = {**base, "decision": "DENY", "reason_code": reason,
                      "balances": [balance_record(l) for l in ledgers]}
            _remember(conn, cmd.tenant, cmd.endpoint, cmd.idempotency_key, cmd.payload_hash, result, None, now)
            return Outcome(result, now_ms=now)

        status = tenant.get("status") if tenant else None
        if status == "CLOSED":
            if evaluate_only:
                return deny("TENANT_CLOSED")
            raise ProtocolError(ErrorCode.TENANT_CLOSED, f"Tenant {cmd.tenant} is closed")
        if status == "SUSPENDED":
            if evaluate_only:
                return deny("TENANT_SUSPENDED")
            raise ProtocolError(ErrorCode.FORBIDDEN, f"Tenant {cmd.tenant} is suspended; new reservations are refused")

        if cmd.limits and not evaluate_only:
            _rate_check(conn, cmd.limits, now)
        overage: dict[str, str | None] = {}
        ledgers = _scope_ledgers(conn, cmd.tenant, cmd.scopes, cmd.unit, overage)
        if not ledgers:
            if evaluate_only:
                return deny("BUDGET_NOT_FOUND")
            raise ProtocolError(ErrorCode.NOT_FOUND, f"Budget not found for provided scope: {cmd.scope_path}",
                                details={"scope": cmd.scope_path, "unit": cmd.unit})
        denial = L.check_reserve(ledgers, cmd.amount)
        expired = 0
        if denial is not None:
            expired = _expire_due(conn, now, 1000, tenant=cmd.tenant)
            if expired:
                ledgers = _scope_ledgers(conn, cmd.tenant, cmd.scopes, cmd.unit, overage)
                denial = L.check_reserve(ledgers, cmd.amount)
        if denial is not None:
            if evaluate_only:
                return deny(denial.code.value, ledgers)
            if expired:
                raise _CommitThenRaise(denial.error())
            raise denial.error()

        caps = cmd.caps
        decision = "ALLOW_WITH_CAPS" if caps else "ALLOW"
        if evaluate_only:
            result = {**base, "decision": decision, "caps": caps, "balances": [balance_record(l) for l in ledgers]}
            _remember(conn, cmd.tenant, cmd.endpoint, cmd.idempotency_key, cmd.payload_hash, result, None, now)
            return Outcome(result, now_ms=now)

        # Precedence for every setting: the request, then the governing policy, then the budget
        # (overage only), then the tenant, then the built-in default.
        pol, t = cmd.policy, tenant or {}
        ttl = cmd.ttl_ms or pol.get("default_ttl_ms") or t.get("default_reservation_ttl_ms") or DEFAULT_TTL_MS
        max_ttl = pol.get("max_ttl_ms") or t.get("max_reservation_ttl_ms")
        if max_ttl:
            ttl = min(ttl, max_ttl)
        grace = DEFAULT_GRACE_MS if cmd.grace_ms is None else cmd.grace_ms
        policy = (cmd.overage_policy or pol.get("overage_policy") or _budget_policy(ledgers, overage)
                  or t.get("default_commit_overage_policy") or L.ALLOW_IF_AVAILABLE)
        max_ext = pol.get("max_extensions", t.get("max_reservation_extensions"))
        max_ext = DEFAULT_MAX_EXTENSIONS if max_ext is None else max_ext
        if cmd.limits:
            _rate_count(conn, cmd.limits, now)
        held = L.hold(ledgers, cmd.amount)
        _write_ledgers(conn, cmd.tenant, held, now, before=ledgers)
        rid = time_ordered_id("rsv", now)
        expires = now + ttl
        subj = cmd.subject
        conn.execute(
            f"INSERT INTO reservations ({_RES_COLS}, s_workspace, s_app, s_workflow, s_agent, s_toolset, commit_limits) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (rid, cmd.tenant, "ACTIVE", _dumps(subj), _dumps(cmd.action), cmd.unit, cmd.amount, cmd.scope_path,
             _dumps(cmd.scopes), _dumps([l.scope for l in held]), now, expires, grace, expires + grace, policy,
             cmd.idempotency_key, _dumps(cmd.metadata) if cmd.metadata is not None else None, None, None, None,
             0, max_ext, *(_lower(subj.get(level)) for level in SUBJECT_LEVELS),
             _dumps(cmd.commit_limits) if cmd.commit_limits else None),
        )
        result = {**base, "decision": decision, "caps": caps, "reservation_id": rid, "expires_at_ms": expires,
                  "balances": [balance_record(l) for l in held]}
        _remember(conn, cmd.tenant, cmd.endpoint, cmd.idempotency_key, cmd.payload_hash, result, rid, now)
        return Outcome(result, now_ms=now, reservation_active=True)

    async def commit(self, cmd: SettleCommand) -> Outcome:
        def tx(conn: sqlite3.Connection, now: int) -> Outcome:
            res, replay = _open_reservation(conn, now, cmd, "commit", allow_grace=True)
            if replay is not None:
                return replay
            if cmd.unit != res["unit"]:
                raise ProtocolError(
                    ErrorCode.UNIT_MISMATCH,
                    f"Commit unit {cmd.unit} does not match the reservation unit {res['unit']}",
                    details={"scope": res["scope_path"], "requested_unit": cmd.unit, "expected_units": [res["unit"]]},
                )
            limits = res["commit_limits"]
            if limits:
                _rate_check(conn, limits, now)
            ledgers = _scope_ledgers(conn, res["tenant_id"], _decode(res["budgeted_scopes"]), res["unit"])
            settled = L.settle(ledgers, res["amount"], cmd.actual or 0, res["overage_policy"], reject_any_overage=True)
            if limits:
                _rate_count(conn, limits, now)
            _write_ledgers(conn, res["tenant_id"], settled.ledgers, now, before=ledgers,
                           reservation_id=cmd.reservation_id, overage_policy=res["overage_policy"])
            if settled.charged > res["amount"] or (cmd.actual or 0) > res["amount"]:
                _emit("reservation.commit_overage", res["tenant_id"], res["scope_path"], {
                    "reservation_id": cmd.reservation_id, "scope": res["scope_path"], "unit": res["unit"],
                    "estimated_amount": res["amount"], "actual_amount": cmd.actual or 0,
                    "overage": (cmd.actual or 0) - res["amount"], "overage_policy": res["overage_policy"],
                    "debt_incurred": sum(a.debt - b.debt for a, b in zip(settled.ledgers, ledgers))})
            conn.execute(
                "UPDATE reservations SET status='COMMITTED', committed=?, committed_metadata=?, finalized_at_ms=? "
                "WHERE reservation_id=?",
                (settled.charged, _dumps(cmd.metadata) if cmd.metadata is not None else None, now,
                 cmd.reservation_id),
            )
            result = {"unit": res["unit"], "charged": settled.charged,
                      "released": max(0, res["amount"] - settled.charged),
                      "balances": [balance_record(l) for l in settled.ledgers]}
            _remember(conn, res["tenant_id"], "commit", cmd.idempotency_key, cmd.payload_hash, result,
                      cmd.reservation_id, now)
            return Outcome(result, now_ms=now)

        return await self._awrite(tx)

    async def release(self, cmd: SettleCommand) -> Outcome:
        def tx(conn: sqlite3.Connection, now: int) -> Outcome:
            res, replay = _open_reservation(conn, now, cmd, "release", allow_grace=True)
            if replay is not None:
                return replay
            ledgers = _scope_ledgers(conn, res["tenant_id"], _decode(res["budgeted_scopes"]), res["unit"])
            freed = L.unhold(ledgers, res["amount"])
            _write_ledgers(conn, res["tenant_id"], freed, now, before=ledgers)
            conn.execute("UPDATE reservations SET status='RELEASED', finalized_at_ms=? WHERE reservation_id=?",
                         (now, cmd.reservation_id))
            result = {"unit": res["unit"], "released": res["amount"], "balances": [balance_record(l) for l in freed]}
            _remember(conn, res["tenant_id"], "release", cmd.idempotency_key, cmd.payload_hash, result,
                      cmd.reservation_id, now)
            return Outcome(result, now_ms=now)

        return await self._awrite(tx)

    async def extend(self, cmd: SettleCommand) -> Outcome:
        def tx(conn: sqlite3.Connection, now: int) -> Outcome:
            res, replay = _open_reservation(conn, now, cmd, "extend", allow_grace=False)
            if replay is not None:
                return replay
            if res["extensions"] >= res["max_extensions"]:
                raise ProtocolError(
                    ErrorCode.MAX_EXTENSIONS_EXCEEDED,
                    f"Reservation {cmd.reservation_id} reached its maximum of {res['max_extensions']} extensions",
                )
            expires = res["expires_at_ms"] + (cmd.extend_by_ms or 0)
            max_ttl = (_tenant_state(conn, res["tenant_id"]) or {}).get("max_reservation_ttl_ms")
            if max_ttl:
                expires = max(res["expires_at_ms"], min(expires, now + max_ttl))
            conn.execute(
                "UPDATE reservations SET expires_at_ms=?, deadline_ms=?, extensions=extensions+1 WHERE reservation_id=?",
                (expires, expires + res["grace_ms"], cmd.reservation_id),
            )
            result = {"expires_at_ms": expires, "reservation_id": cmd.reservation_id}
            _remember(conn, res["tenant_id"], "extend", cmd.idempotency_key, cmd.payload_hash, result,
                      cmd.reservation_id, now)
            return Outcome(result, now_ms=now, reservation_active=True)

        return await self._awrite(tx)

    async def create_event(self, cmd: EventCommand) -> Outcome:
        def tx(conn: sqlite3.Connection, now: int) -> Outcome:
            if cmd.gen is not None:
                _check_gen(conn, cmd.tenant, cmd.gen)
            replay = _replay(conn, cmd.tenant, "event", cmd.idempotency_key, cmd.payload_hash)
            if replay is not None:
                return Outcome(_decode(replay[0]), replay=True, now_ms=now)
            tenant = _tenant_state(conn, cmd.tenant)
            if tenant and tenant.get("status") == "CLOSED":
                raise ProtocolError(ErrorCode.TENANT_CLOSED, f"Tenant {cmd.tenant} is closed")
            overage: dict[str, str | None] = {}
            ledgers = _scope_ledgers(conn, cmd.tenant, cmd.scopes, cmd.unit, overage)
            if not ledgers:
                raise ProtocolError(ErrorCode.NOT_FOUND, f"Budget not found for provided scope: {cmd.scope_path}",
                                    details={"scope": cmd.scope_path, "unit": cmd.unit})
            policy = (cmd.overage_policy or _budget_policy(ledgers, overage)
                      or (tenant or {}).get("default_commit_overage_policy") or L.ALLOW_IF_AVAILABLE)
            settled = L.settle(ledgers, 0, cmd.amount, policy, reject_any_overage=False)
            _write_ledgers(conn, cmd.tenant, settled.ledgers, now, before=ledgers, overage_policy=policy)
            event_id = new_id("evt")
            conn.execute(
                "INSERT INTO events (event_id, tenant_id, scope_path, subject, action, unit, actual, charged, "
                "overage_policy, metadata, created_at_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (event_id, cmd.tenant, cmd.scope_path, _dumps(cmd.subject), _dumps(cmd.action), cmd.unit,
                 cmd.amount, settled.charged, policy,
                 _dumps({"metadata": cmd.metadata, "metrics": cmd.metrics, "client_time_ms": cmd.client_time_ms}),
                 now),
            )
            result = {"event_id": event_id, "unit": cmd.unit, "actual": cmd.amount, "charged": settled.charged,
                      "balances": [balance_record(l) for l in settled.ledgers]}
            _remember(conn, cmd.tenant, "event", cmd.idempotency_key, cmd.payload_hash, result, None, now)
            return Outcome(result, now_ms=now)

        return await self._awrite(tx)

    # ---- reads ----

    async def get_reservation(self, reservation_id: str) -> dict[str, Any] | None:
        rows = self._read(f"SELECT {_RES_COLS} FROM reservations WHERE reservation_id=?", (reservation_id,))
        return _reservation(rows[0]) if rows else None

    async def list_reservations(self, q: ReservationQuery) -> Page:
        where, params = ["tenant_id=?"], [q.tenant]
        if q.status:
            where.append("status=?")
            params.append(q.status)
        if q.idempotency_key:
            where.append("idempotency_key=?")
            params.append(q.idempotency_key)
        for level, value in q.subject.items():
            where.append(f"s_{level}=?")
            params.append(value.lower())
        for col, (lo, hi) in q.windows.items():
            if lo is not None:
                where.append(f"{col} >= ?")
                params.append(lo)
            if hi is not None:
                where.append(f"{col} <= ?")
                params.append(hi)
        col = _SORT_COLUMNS[q.sort_by]
        op, direction = ("<", "DESC") if q.sort_dir == "desc" else (">", "ASC")
        if q.after is not None:
            where.append(f"({col}, reservation_id) {op} (?, ?)")
            params += list(q.after)
        rows = self._read(
            f"SELECT {_RES_COLS} FROM reservations WHERE {' AND '.join(where)} "
            f"ORDER BY {col} {direction}, reservation_id {direction} LIMIT ?",
            (*params, q.limit + 1),
        )
        return Page([_reservation(r) for r in rows[:q.limit]], len(rows) > q.limit)

    async def balances(self, tenant: str, wanted: dict[str, str], include_children: bool, limit: int,
                       after: tuple[str, str] | None) -> Page:
        from ..core.scopes import matches_filter

        items: list[dict[str, Any]] = []
        cursor = after
        # Scopes are filtered in Python (segment matching); scan in keyset batches until the page fills.
        while True:
            where, params = ["tenant_id=?"], [tenant]
            if cursor is not None:
                where.append("(scope, unit) > (?, ?)")
                params += list(cursor)
            rows = self._read(
                f"SELECT {_LEDGER_COLS} FROM budgets WHERE {' AND '.join(where)} ORDER BY scope, unit LIMIT 500",
                params,
            )
            for row in rows:
                if matches_filter(row[0], wanted, include_children):
                    if len(items) == limit:
                        return Page(items, True)
                    items.append({"ledger": _ledger(row)})
            if len(rows) < 500:
                return Page(items, False)
            cursor = (rows[-1][0], rows[-1][1])

    # ---- maintenance ----

    async def expire_due(self, limit: int = 500) -> int:
        return await self._awrite(lambda conn, now: _expire_due(conn, now, limit))

    async def count_active(self) -> int:
        return self._read("SELECT count(*) FROM reservations WHERE status='ACTIVE'")[0][0]

    async def purge_idempotency(self, older_than_ms: int) -> int:
        return await self._awrite(
            lambda conn, now: conn.execute("DELETE FROM idempotency WHERE created_at_ms < ?", (older_than_ms,)).rowcount
        )


    # ---- admin plane ----

    async def append_journal(self, entries: list[dict[str, Any]]) -> None:
        def tx(conn: sqlite3.Connection, now: int) -> None:
            _insert_journal(conn, stamp_journal(entries, now, None))

        await self._awrite(tx)

    async def scan_audit(self, scan: AuditScan) -> list[dict[str, Any]]:
        return self._scan("audit", "log_id", scan)

    def _scan(self, table: str, id_col: str, scan: AuditScan) -> list[dict[str, Any]]:
        where, params = [], []
        if scan.tenant is not None:
            where.append("tenant_id=?")
            params.append(scan.tenant)
        if scan.from_ms is not None:
            where.append("timestamp_ms >= ?")
            params.append(scan.from_ms)
        if scan.to_ms is not None:
            where.append("timestamp_ms <= ?")
            params.append(scan.to_ms)
        op, direction = ("<", "DESC") if scan.descending else (">", "ASC")
        if scan.after is not None:
            where.append(f"(timestamp_ms, {id_col}) {op} (?, ?)")
            params += list(scan.after)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        rows = self._read(f"SELECT record FROM {table} {clause} ORDER BY timestamp_ms {direction}, {id_col} {direction} "
                          "LIMIT ?", (*params, scan.limit))
        return [_decode(r[0]) for r in rows]

    async def scan_events(self, scan: AuditScan) -> list[dict[str, Any]]:
        return self._scan("gov_events", "event_id", scan)

    async def get_event(self, event_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT record FROM gov_events WHERE event_id=?", (event_id,))
        return _decode(rows[0][0]) if rows else None

    async def purge_events(self, older_than_ms: int) -> int:
        return await self._awrite(
            lambda conn, now: conn.execute("DELETE FROM gov_events WHERE timestamp_ms < ?", (older_than_ms,)).rowcount)

    async def purge_audit(self, older_than_ms: int) -> int:
        return await self._awrite(
            lambda conn, now: conn.execute("DELETE FROM audit WHERE timestamp_ms < ?", (older_than_ms,)).rowcount)

    async def list_tenants(self) -> list[dict[str, Any]]:
        return [_decode(r[0]) for r in self._read("SELECT record FROM tenants ORDER BY tenant_id")]

    async def list_api_keys(self, tenant: str | None) -> list[dict[str, Any]]:
        if tenant is None:
            rows = self._read("SELECT record FROM api_keys ORDER BY created_at_ms, key_id")
        else:
            rows = self._read("SELECT record FROM api_keys WHERE tenant_id=? ORDER BY created_at_ms, key_id", (tenant,))
        return [_decode(r[0]) for r in rows]

    async def get_api_key(self, key_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT record FROM api_keys WHERE key_id=?", (key_id,))
        return _decode(rows[0][0]) if rows else None

    async def update_api_key(self, key_id: str, changes: dict[str, Any], *, guard_tenant: bool = True) -> dict[str, Any]:
        def tx(conn: sqlite3.Connection, now: int) -> dict[str, Any]:
            row = conn.execute("SELECT record FROM api_keys WHERE key_id=?", (key_id,)).fetchone()
            if row is None:
                raise ProtocolError(ErrorCode.NOT_FOUND, f"API key {key_id} not found")
            record = _decode(row[0])
            if guard_tenant:
                _guard_tenant_open(conn, record["tenant_id"])
            if record.get("status") == "REVOKED":
                raise ProtocolError(ErrorCode.KEY_REVOKED, f"API key {key_id} is revoked", status=409)
            record.update(changes)
            conn.execute("UPDATE api_keys SET record=? WHERE key_id=?", (_dumps(record), key_id))
            return record

        return await self._awrite(tx)

    async def touch_api_keys(self, last_used: dict[str, int]) -> None:
        def tx(conn: sqlite3.Connection, now: int) -> None:
            for key_id, at_ms in last_used.items():
                row = conn.execute("SELECT record FROM api_keys WHERE key_id=?", (key_id,)).fetchone()
                if row is None:
                    continue
                record = _decode(row[0])
                if (record.get("last_used_at_ms") or 0) < at_ms:
                    record["last_used_at_ms"] = at_ms
                    conn.execute("UPDATE api_keys SET record=? WHERE key_id=?", (_dumps(record), key_id))

        await self._awrite(tx)

    async def get_doc(self, kind: str, doc_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT record FROM docs WHERE kind=? AND doc_id=?", (kind, doc_id))
        return _decode(rows[0][0]) if rows else None

    async def list_docs(self, kind: str, tenant: str | None) -> list[dict[str, Any]]:
        if tenant is None:
            rows = self._read("SELECT record FROM docs WHERE kind=? ORDER BY doc_id", (kind,))
        else:
            rows = self._read("SELECT record FROM docs WHERE kind=? AND tenant_id=? ORDER BY doc_id", (kind, tenant))
        return [_decode(r[0]) for r in rows]

    async def save_doc(self, kind: str, tenant: str, doc_id: str, record: dict[str, Any] | None,
                       expect_version: int | None, *, guard_tenant: bool = True) -> dict[str, Any] | None:
        def tx(conn: sqlite3.Connection, now: int) -> dict[str, Any] | None:
            if guard_tenant:
                _guard_tenant_open(conn, tenant)
            row = conn.execute("SELECT version FROM docs WHERE kind=? AND doc_id=?", (kind, doc_id)).fetchone()
            current = row[0] if row else None
            if current != expect_version:
                raise _doc_conflict(kind, doc_id, current, expect_version)
            if record is None:
                conn.execute("DELETE FROM docs WHERE kind=? AND doc_id=?", (kind, doc_id))
                return None
            stored = {**record, "version": (current or 0) + 1}
            conn.execute("INSERT OR REPLACE INTO docs (kind, doc_id, tenant_id, version, record, due_ms) "
                         "VALUES (?,?,?,?,?,?)",
                         (kind, doc_id, tenant, stored["version"], _dumps(stored), stored.get("due_ms")))
            return stored

        return await self._awrite(tx)

    async def due_docs(self, kind: str, now_ms: int, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._read("SELECT record FROM docs WHERE kind=? AND due_ms IS NOT NULL AND due_ms <= ? "
                          "ORDER BY due_ms LIMIT ?", (kind, now_ms, limit))
        return [_decode(r[0]) for r in rows]

    async def get_budget(self, tenant: str, scope: str, unit: str) -> dict[str, Any] | None:
        rows = _budget_rows(self.conn, "WHERE tenant_id=? AND scope=? AND unit=?", (tenant, scope, unit))
        return rows[0] if rows else None

    async def update_budget(self, tenant: str, scope: str, unit: str, changes: dict[str, Any],
                            *, guard_tenant: bool = True) -> dict[str, Any]:
        def tx(conn: sqlite3.Connection, now: int) -> dict[str, Any]:
            if guard_tenant:
                _guard_tenant_open(conn, tenant)
            rows = _budget_rows(conn, "WHERE tenant_id=? AND scope=? AND unit=?", (tenant, scope, unit))
            if not rows:
                raise ProtocolError(ErrorCode.NOT_FOUND, f"Budget not found for scope {scope} and unit {unit}")
            row = rows[0]
            led, extra = row["ledger"], row["extra"]
            new = L.configure(led, changes)
            if changes.get("extra"):
                extra = {**extra, **changes["extra"]}
                extra = {k: v for k, v in extra.items() if v is not None}
            for event_type, ev_scope, data in E.transitions(led, new):
                _emit(event_type, tenant, ev_scope, data)
            policy = changes["commit_overage_policy"] if "commit_overage_policy" in changes else row["commit_overage_policy"]
            conn.execute(
                "UPDATE budgets SET allocated=?, overdraft_limit=?, is_over_limit=?, status=?, commit_overage_policy=?, "
                "extra=?, updated_at_ms=? WHERE tenant_id=? AND scope=? AND unit=?",
                (new.allocated, new.overdraft_limit, int(new.is_over_limit), new.status, policy, _dumps(extra), now,
                 tenant, scope, unit))
            return _budget_rows(conn, "WHERE tenant_id=? AND scope=? AND unit=?", (tenant, scope, unit))[0]

        return await self._awrite(tx)

    async def due_rollovers(self, now_ms: int, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._read("SELECT tenant_id, scope, unit FROM budgets WHERE period_end_ms IS NOT NULL AND period_end_ms <= ? "
                          "AND status != 'CLOSED' ORDER BY period_end_ms LIMIT ?", (now_ms, limit))
        out = []
        for tenant, scope, unit in rows:
            rec = await self.get_budget(tenant, scope, unit)
            if rec is not None:
                out.append(rec)
        return out

    async def rollover_budget(self, tenant: str, scope: str, unit: str, expected_end_ms: int,
                              period: dict[str, Any]) -> dict[str, Any] | None:
        def tx(conn: sqlite3.Connection, now: int) -> dict[str, Any] | None:
            rows = _budget_rows(conn, "WHERE tenant_id=? AND scope=? AND unit=?", (tenant, scope, unit))
            if not rows or rows[0]["extra"].get("period_end_ms") != expected_end_ms or rows[0]["ledger"].status == "CLOSED":
                return None  # another process rolled it over first (or it was closed): exactly once
            row = rows[0]
            extra = row["extra"]
            before = row["ledger"]
            after = L.rollover(before, extra.get("rollover_policy") or "NONE", before.allocated if extra.get("period_allocation") is None else extra["period_allocation"])
            extra = {**extra, **period}
            conn.execute("UPDATE budgets SET allocated=?, spent=?, is_over_limit=?, extra=?, period_end_ms=?, updated_at_ms=? "
                         "WHERE tenant_id=? AND scope=? AND unit=?",
                         (after.allocated, after.spent, int(after.is_over_limit), _dumps(extra), extra["period_end_ms"],
                          now, tenant, scope, unit))
            _emit("budget.reset_spent", tenant, scope, {
                "ledger_id": row["ledger_id"], "scope": scope, "unit": unit, "operation": "ROLLOVER",
                "rollover_policy": extra.get("rollover_policy"), "previous_state": E.ledger_state(before),
                "new_state": E.ledger_state(after), "period_start": extra.get("period_start"),
                "period_end": extra.get("period_end")})
            return {"before": before, "after": after, "extra": extra}

        return await self._awrite(tx)

    async def counters(self) -> dict[str, int]:
        return {name: value for name, value in self._read("SELECT name, value FROM counters")}

    async def top_budgets(self, kind: str, limit: int = 10) -> list[dict[str, Any]]:
        where = "is_over_limit = 1" if kind == "over_limit" else "debt > 0"
        return _budget_rows(self.conn, f"WHERE {where} ORDER BY debt DESC LIMIT ?", (limit,))

    async def cascade_close(self, tenant: str, batch: int = 200) -> bool:
        def tx(conn: sqlite3.Connection, now: int) -> bool:
            record = _tenant_state(conn, tenant)
            if record is None or record["status"] != "CLOSED":
                return True
            rows = conn.execute(f"SELECT {_RES_COLS} FROM reservations WHERE tenant_id=? AND status='ACTIVE' LIMIT ?",
                                (tenant, batch)).fetchall()
            corr = f"tenant_close_cascade:{tenant}:{record.get('closed_at', '')}"
            released: dict[tuple[str, str], int] = {}
            for r in rows:
                res = _reservation(r)
                ledgers = _scope_ledgers(conn, tenant, _decode(res["budgeted_scopes"]), res["unit"])
                _write_ledgers(conn, tenant, L.unhold(ledgers, res["amount"]), now)
                conn.execute("UPDATE reservations SET status='RELEASED', finalized_at_ms=? WHERE reservation_id=?",
                             (now, res["reservation_id"]))
                for led in ledgers:
                    released[(led.scope, led.unit)] = released.get((led.scope, led.unit), 0) + res["amount"]
            for (scope, unit), amount in sorted(released.items()):  # one aggregate per ledger and step
                _cascade_event("reservation.released_via_tenant_cascade", tenant, corr, scope=scope, unit=unit,
                               released_amount=amount)
            if len(rows) == batch:
                return False
            for ledger_id, scope, unit, status in conn.execute(
                    "SELECT ledger_id, scope, unit, status FROM budgets WHERE tenant_id=? AND status!='CLOSED'",
                    (tenant,)).fetchall():
                _cascade_event("budget.closed_via_tenant_cascade", tenant, corr, ledger_id=ledger_id, scope=scope,
                               unit=unit, prior_status=status, new_status="CLOSED")
            conn.execute("UPDATE budgets SET status='CLOSED', updated_at_ms=? WHERE tenant_id=? AND status!='CLOSED'",
                         (now, tenant))
            for key_id, raw in conn.execute("SELECT key_id, record FROM api_keys WHERE tenant_id=?", (tenant,)).fetchall():
                key = _decode(raw)
                if key.get("status") != "REVOKED":
                    _cascade_event("api_key.revoked_via_tenant_cascade", tenant, corr, key_id=key_id,
                                   name=key.get("name"), prior_status=key.get("status"), new_status="REVOKED")
                    key.update(status="REVOKED", revoked_at_ms=now, revoked_reason="tenant closed")
                    conn.execute("UPDATE api_keys SET record=? WHERE key_id=?", (_dumps(key), key_id))
            for doc_id, raw in conn.execute("SELECT doc_id, record FROM docs WHERE kind='webhook' AND tenant_id=?",
                                            (tenant,)).fetchall():
                hook = _decode(raw)
                if hook.get("status") != "DISABLED":
                    _cascade_event("webhook.disabled_via_tenant_cascade", tenant, corr, subscription_id=doc_id,
                                   prior_status=hook.get("status"), new_status="DISABLED")
                    hook.update(status="DISABLED", version=hook.get("version", 0) + 1)
                    conn.execute("UPDATE docs SET record=?, version=? WHERE kind='webhook' AND doc_id=?",
                                 (_dumps(hook), hook["version"], doc_id))
            record["cascade"] = "DONE"
            conn.execute("UPDATE tenants SET record=? WHERE tenant_id=?", (_dumps(record), tenant))
            return True

        return await self._awrite(tx)

    async def pending_cascades(self) -> list[str]:
        rows = self._read("SELECT tenant_id, record FROM tenants WHERE status='CLOSED'")
        return [t for t, raw in rows if _decode(raw).get("cascade") == "PENDING"]


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring files written by earlier versions up to the current schema."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(reservations)")}
    if "commit_limits" not in cols:
        conn.execute("ALTER TABLE reservations ADD COLUMN commit_limits TEXT")
    cols = {r[1] for r in conn.execute("PRAGMA table_info(docs)")}
    if "due_ms" not in cols:
        conn.execute("ALTER TABLE docs ADD COLUMN due_ms INTEGER")
    conn.execute("CREATE INDEX IF NOT EXISTS docs_due ON docs (kind, due_ms) WHERE due_ms IS NOT NULL")
    cols = {r[1] for r in conn.execute("PRAGMA table_info(budgets)")}
    if "period_end_ms" not in cols:
        conn.execute("ALTER TABLE budgets ADD COLUMN period_end_ms INTEGER")
    conn.execute("CREATE INDEX IF NOT EXISTS budgets_period_end ON budgets (period_end_ms) WHERE period_end_ms IS NOT NULL")
    conn.execute("CREATE INDEX IF NOT EXISTS budgets_over_limit ON budgets (debt DESC) WHERE is_over_limit = 1")
    conn.execute("CREATE INDEX IF NOT EXISTS budgets_with_debt ON budgets (debt DESC) WHERE debt > 0")
    for stmt in GEN_TRIGGERS.split(";;"):
        conn.execute(stmt)
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='counters'").fetchone() is None:
        conn.execute("CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID")
        for stmt in COUNTER_TRIGGERS.split(";;"):
            if stmt.strip():
                conn.execute(stmt)
        # counts of a file written before counters existed, taken once
        conn.execute("INSERT INTO counters SELECT 'tenants.' || status, count(*) FROM tenants GROUP BY status")
        conn.execute("INSERT INTO counters SELECT 'budgets.' || status, count(*) FROM budgets GROUP BY status")
        conn.execute("INSERT INTO counters SELECT 'budgets.unit.' || unit, count(*) FROM budgets GROUP BY unit")
        conn.execute("INSERT INTO counters SELECT 'budgets.over_limit', count(*) FROM budgets WHERE is_over_limit = 1")
        conn.execute("INSERT INTO counters SELECT 'budgets.with_debt', count(*) FROM budgets WHERE debt > 0")


def _rate_check(conn: sqlite3.Connection, limits: Sequence[Sequence[Any]], now: int) -> None:
    """Refuse with 429 when one more event would exceed any bucket's per-minute limit."""
    window = now // P.WINDOW_MS
    for bucket, limit, policy_id, scope in limits:
        counts = dict(conn.execute("SELECT window, count FROM rate_counters WHERE bucket=? AND window IN (?, ?)",
                                   (bucket, window - 1, window)).fetchall())
        prev, cur = counts.get(window - 1, 0), counts.get(window, 0)
        scaled, _ = P.window_count(prev, cur, now)
        if scaled + P.WINDOW_MS > limit * P.WINDOW_MS:
            raise P.rate_error(bucket, limit, policy_id, scope, P.retry_after_ms(prev, cur, limit, now))


def _rate_count(conn: sqlite3.Connection, limits: Sequence[Sequence[Any]], now: int) -> None:
    window = now // P.WINDOW_MS
    for bucket, *_ in limits:
        conn.execute("INSERT INTO rate_counters (bucket, window, count) VALUES (?, ?, 1) "
                     "ON CONFLICT (bucket, window) DO UPDATE SET count = count + 1", (bucket, window))
        conn.execute("DELETE FROM rate_counters WHERE bucket=? AND window < ?", (bucket, window - 1))


def _doc_conflict(kind: str, doc_id: str, current: int | None, expected: int | None) -> ProtocolError:
    if expected is None:
        return ProtocolError(ErrorCode.DUPLICATE_RESOURCE, f"{kind} {doc_id} already exists")
    if current is None:
        return ProtocolError(ErrorCode.NOT_FOUND, f"{kind} {doc_id} not found")
    return VersionConflict(f"{kind} {doc_id}")


def _set_period_allocation(conn: sqlite3.Connection, tenant: str, scope: str, unit: str, amount: int) -> None:
    row = conn.execute("SELECT extra FROM budgets WHERE tenant_id=? AND scope=? AND unit=?", (tenant, scope, unit)).fetchone()
    extra = _decode(row[0])
    if "period_allocation" in extra:
        extra["period_allocation"] = amount
        conn.execute("UPDATE budgets SET extra=? WHERE tenant_id=? AND scope=? AND unit=?", (_dumps(extra), tenant, scope, unit))


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
    return any(e.get("journal") != "context" for e in journal)


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


_SORT_COLUMNS = {
    "reservation_id": "reservation_id",
    "tenant": "tenant_id",
    "scope_path": "scope_path",
    "status": "status",
    "reserved": "amount",
    "created_at_ms": "created_at_ms",
    "expires_at_ms": "expires_at_ms",
}


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else None


def _replay(conn: sqlite3.Connection, tenant: str, endpoint: str, key: str, payload_hash: str) -> tuple[str, str | None] | None:
    row = conn.execute(
        "SELECT payload_hash, result, reservation_id FROM idempotency WHERE tenant_id=? AND endpoint=? AND key=?",
        (tenant, endpoint, key),
    ).fetchone()
    if row is None:
        return None
    if row[0] != payload_hash:
        raise ProtocolError(
            ErrorCode.IDEMPOTENCY_MISMATCH,
            f"Idempotency key {key!r} was already used with a different request payload",
        )
    return row[1], row[2]


def _replayed(conn: sqlite3.Connection, replay: tuple[str, str | None], now: int) -> Outcome:
    result_json, rid = replay
    active = False
    if rid:
        row = conn.execute("SELECT status, expires_at_ms FROM reservations WHERE reservation_id=?", (rid,)).fetchone()
        active = bool(row) and row[0] == "ACTIVE" and now <= row[1]
    return Outcome(_decode(result_json), replay=True, now_ms=now, reservation_active=active)


def _remember(conn: sqlite3.Connection, tenant: str, endpoint: str, key: str, payload_hash: str,
              result: dict[str, Any], reservation_id: str | None, now: int) -> None:
    conn.execute(
        "INSERT INTO idempotency (tenant_id, endpoint, key, payload_hash, result, reservation_id, created_at_ms) "
        "VALUES (?,?,?,?,?,?,?)",
        (tenant, endpoint, key, payload_hash, _dumps(result), reservation_id, now),
    )


def _gen(conn: sqlite3.Connection, tenant: str) -> int:
    row = conn.execute("SELECT gen FROM gens WHERE tenant_id=?", (tenant,)).fetchone()
    return row[0] if row else 0


def _check_gen(conn: sqlite3.Connection, tenant: str, gen: int) -> None:
    if _gen(conn, tenant) != gen:
        raise StaleGovernance()


def _tenant_state(conn: sqlite3.Connection, tenant_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT record FROM tenants WHERE tenant_id=?", (tenant_id,)).fetchone()
    if row is None:
        return None
    try:
        record = _decode(row[0])
        if record.get("status") not in ("ACTIVE", "SUSPENDED", "CLOSED"):
            raise ValueError("status")
        return record
    except (ValueError, AttributeError) as exc:
        # The spec requires failing closed when governance state cannot be read.
        raise ProtocolError(ErrorCode.INTERNAL_ERROR, f"Malformed tenant record: {tenant_id}") from exc


def _guard_tenant_open(conn: sqlite3.Connection, tenant_id: str) -> None:
    tenant = _tenant_state(conn, tenant_id)
    if tenant is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"Tenant {tenant_id} not found")
    if tenant["status"] == "CLOSED":
        raise ProtocolError(ErrorCode.TENANT_CLOSED, f"Tenant {tenant_id} is closed")


def _scope_ledgers(conn: sqlite3.Connection, tenant: str, scopes: list[str], unit: str,
                   overage: dict[str, str | None] | None = None) -> list[L.Ledger]:
    """Ledgers of `scopes` in `unit`, in canonical order; raises UNIT_MISMATCH when only other units exist.
    `overage`, when given, receives each ledger's own commit_overage_policy (by scope)."""
    marks = ",".join("?" * len(scopes))
    rows = conn.execute(
        f"SELECT {_LEDGER_COLS} FROM budgets WHERE tenant_id=? AND scope IN ({marks})", (tenant, *scopes)
    ).fetchall()
    same = {r[0]: r for r in rows if r[1] == unit}
    if not same and rows:
        by_scope: dict[str, list[str]] = {}
        for r in rows:
            by_scope.setdefault(r[0], []).append(r[1])
        scope = next(s for s in scopes if s in by_scope)
        raise ProtocolError(
            ErrorCode.UNIT_MISMATCH,
            f"No budget in unit {unit} at the derived scopes; scope {scope} has budgets in {', '.join(sorted(by_scope[scope]))}",
            details={"scope": scope, "requested_unit": unit, "expected_units": sorted(by_scope[scope])},
        )
    if overage is not None:
        overage.update((r[0], r[9]) for r in same.values())
    return [_ledger(same[s]) for s in scopes if s in same]


def _budget_policy(ledgers: Sequence[L.Ledger], overage: dict[str, str | None]) -> str | None:
    """The commit overage policy set on the deepest budgeted scope, if any."""
    for led in reversed(ledgers):
        if overage.get(led.scope):
            return overage[led.scope]
    return None


def _write_ledgers(conn: sqlite3.Connection, tenant: str, ledgers: Sequence[L.Ledger], now: int,
                   before: Sequence[L.Ledger] | None = None, reservation_id: str | None = None,
                   overage_policy: str | None = None) -> None:
    for old, new in zip(before or (), ledgers):
        for event_type, scope, data in E.transitions(old, new, reservation_id=reservation_id,
                                                     overage_policy=overage_policy):
            _emit(event_type, tenant, scope, data)
    conn.executemany(
        "UPDATE budgets SET allocated=?, spent=?, reserved=?, debt=?, is_over_limit=?, updated_at_ms=? "
        "WHERE tenant_id=? AND scope=? AND unit=?",
        [(l.allocated, l.spent, l.reserved, l.debt, int(l.is_over_limit), now, tenant, l.scope, l.unit) for l in ledgers],
    )


_RES_KEYS = tuple(k.strip() for k in _RES_COLS.split(","))


def _reservation(row: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(_RES_KEYS, row))


def _open_reservation(conn: sqlite3.Connection, now: int, cmd: SettleCommand, endpoint: str,
                      *, allow_grace: bool) -> tuple[dict[str, Any], Outcome | None]:
    """Load a reservation for a mutation, applying replay, ownership, tenant and state rules in spec order."""
    if cmd.gen is not None and cmd.tenant is not None:
        _check_gen(conn, cmd.tenant, cmd.gen)
    row = conn.execute(f"SELECT {_RES_COLS}, commit_limits FROM reservations WHERE reservation_id=?",
                       (cmd.reservation_id,)).fetchone()
    res = _reservation(row) if row else None
    if res is not None:
        res["commit_limits"] = _decode(row[-1]) if row[-1] else []
    # Ownership before replay: another tenant must never see this tenant's stored responses.
    if res is not None and cmd.tenant is not None and res["tenant_id"] != cmd.tenant:
        raise ProtocolError(ErrorCode.FORBIDDEN, f"Reservation {cmd.reservation_id} belongs to another tenant")
    owner = res["tenant_id"] if res else cmd.tenant
    if owner is not None:
        replay = _replay(conn, owner, endpoint, cmd.idempotency_key, cmd.payload_hash)
        if replay is not None:
            return res or {}, _replayed(conn, replay, now)
    if res is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"Reservation {cmd.reservation_id} not found")
    tenant = _tenant_state(conn, res["tenant_id"])
    if tenant and tenant.get("status") == "CLOSED":
        raise ProtocolError(ErrorCode.TENANT_CLOSED, f"Tenant {res['tenant_id']} is closed")
    if res["status"] in ("COMMITTED", "RELEASED"):
        raise ProtocolError(ErrorCode.RESERVATION_FINALIZED,
                            f"Reservation {cmd.reservation_id} is already {res['status']}",
                            details={"status": res["status"]})
    limit = res["deadline_ms"] if allow_grace else res["expires_at_ms"]
    if res["status"] == "EXPIRED" or now > limit:
        raise ProtocolError(ErrorCode.RESERVATION_EXPIRED, f"Reservation {cmd.reservation_id} has expired",
                            details={"expires_at_ms": res["expires_at_ms"]})
    return res, None


def _expire_due(conn: sqlite3.Connection, now: int, limit: int, tenant: str | None = None) -> int:
    sql = f"SELECT {_RES_COLS} FROM reservations WHERE status='ACTIVE' AND deadline_ms < ?"
    params: list[Any] = [now]
    if tenant is not None:
        sql += " AND tenant_id=?"
        params.append(tenant)
    rows = conn.execute(sql + " LIMIT ?", (*params, limit)).fetchall()
    for row in rows:
        res = _reservation(row)
        ledgers = _scope_ledgers(conn, res["tenant_id"], _decode(res["budgeted_scopes"]), res["unit"])
        _write_ledgers(conn, res["tenant_id"], L.unhold(ledgers, res["amount"]), now, before=ledgers)
        conn.execute("UPDATE reservations SET status='EXPIRED' WHERE reservation_id=?", (res["reservation_id"],))
        _emit("reservation.expired", res["tenant_id"], res["scope_path"], {
            "reservation_id": res["reservation_id"], "scope": res["scope_path"], "unit": res["unit"],
            "estimated_amount": res["amount"], "created_at_ms": res["created_at_ms"], "expired_at_ms": now,
            "ttl_ms": res["expires_at_ms"] - res["created_at_ms"], "extensions_used": res["extensions"]}, system=True)
    return len(rows)


def _budget_rows(conn: sqlite3.Connection, clause: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT tenant_id, ledger_id, created_at_ms, updated_at_ms, extra, " + _LEDGER_COLS + f" FROM budgets {clause}",
        tuple(params),
    ).fetchall()
    out = []
    for r in rows:
        out.append({
            "tenant_id": r[0], "ledger_id": r[1], "created_at_ms": r[2], "updated_at_ms": r[3],
            "extra": _decode(r[4]), "commit_overage_policy": r[14], "ledger": _ledger(r[5:]),
        })
    return out
