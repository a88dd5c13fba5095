"""The SQLite file's schema: tables and indexes, the trigger blocks that keep the overview counters and the
governance generation, and `_migrate`, which brings files written by earlier versions up to date."""

from __future__ import annotations

import sqlite3

# Reservations are keyed by their (time-ordered) id alone: one B-tree, appended to at its right edge. A live
# reserve keeps its idempotency record (payload_hash, result) on its own row instead of a separate table row;
# only ACTIVE reservations are in the deadline index the expiry sweep reads.
RESERVATION_COLUMNS = """
    reservation_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, status TEXT NOT NULL,
    subject TEXT NOT NULL, action TEXT NOT NULL, unit TEXT NOT NULL, amount INTEGER NOT NULL,
    scope_path TEXT NOT NULL, affected_scopes TEXT NOT NULL, budgeted_scopes TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL, expires_at_ms INTEGER NOT NULL, grace_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL, overage_policy TEXT NOT NULL, idempotency_key TEXT,
    metadata TEXT, committed INTEGER, committed_metadata TEXT, finalized_at_ms INTEGER,
    extensions INTEGER NOT NULL DEFAULT 0, max_extensions INTEGER NOT NULL,
    s_workspace TEXT, s_app TEXT, s_workflow TEXT, s_agent TEXT, s_toolset TEXT, commit_limits TEXT,
    payload_hash TEXT, result TEXT, quota_runs TEXT
"""
RESERVATION_INDEXES = """
CREATE INDEX IF NOT EXISTS reservations_tenant_created ON reservations (tenant_id, created_at_ms, reservation_id);
CREATE INDEX IF NOT EXISTS reservations_active ON reservations (deadline_ms) WHERE status = 'ACTIVE';
CREATE INDEX IF NOT EXISTS reservations_tenant_key_time ON reservations (tenant_id, idempotency_key, created_at_ms);
"""

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
CREATE TABLE IF NOT EXISTS reservations (RESERVATION_COLUMNS) WITHOUT ROWID;
RESERVATION_INDEXES
CREATE TABLE IF NOT EXISTS idempotency (
    tenant_id TEXT NOT NULL, endpoint TEXT NOT NULL, key TEXT NOT NULL, payload_hash TEXT NOT NULL,
    result TEXT NOT NULL, reservation_id TEXT, created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, endpoint, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created_at_ms);
CREATE TABLE IF NOT EXISTS evidence (
    evidence_id TEXT PRIMARY KEY, body TEXT NOT NULL, created_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS evidence_links (link TEXT PRIMARY KEY, evidence_id TEXT NOT NULL) WITHOUT ROWID;
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
CREATE TABLE IF NOT EXISTS action_counters (
    tenant_id TEXT NOT NULL, counter TEXT NOT NULL, used INTEGER NOT NULL, expires_at_ms INTEGER NOT NULL,
    last_ms INTEGER, lim INTEGER, policy_id TEXT, ttl_ms INTEGER, PRIMARY KEY (tenant_id, counter)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gens (tenant_id TEXT PRIMARY KEY, gen INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, scope_path TEXT NOT NULL, subject TEXT NOT NULL,
    action TEXT NOT NULL, unit TEXT NOT NULL, actual INTEGER NOT NULL, charged INTEGER NOT NULL,
    overage_policy TEXT NOT NULL, metadata TEXT, created_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_tenant_time ON events (tenant_id, created_at_ms);
""".replace("RESERVATION_COLUMNS", RESERVATION_COLUMNS).replace("RESERVATION_INDEXES", RESERVATION_INDEXES)

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


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring files written by earlier versions up to the current schema."""
    table_sql = conn.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name='reservations'").fetchone()[0]
    if "WITHOUT ROWID" not in table_sql.upper():
        _rebuild_reservations(conn)
    cols = {r[1] for r in conn.execute("PRAGMA table_info(reservations)")}
    if "quota_runs" not in cols:  # per_run action quota keys a reservation counted (v0.1.26)
        conn.execute("ALTER TABLE reservations ADD COLUMN quota_runs TEXT")
    cols = {r[1] for r in conn.execute("PRAGMA table_info(action_counters)")}
    if "ttl_ms" not in cols:  # a per_run counter's TTL, refreshed by a reset
        conn.execute("ALTER TABLE action_counters ADD COLUMN ttl_ms INTEGER")
    # the overview's quota health reads only the counters at 80 % or more of their limit
    conn.execute("CREATE INDEX IF NOT EXISTS action_counters_hot ON action_counters (expires_at_ms) "
                 "WHERE used * 5 >= lim * 4")
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
    conn.execute("DROP INDEX IF EXISTS reservations_active_deadline")  # replaced by the partial reservations_active
    # replaced by reservations_tenant_key_time, which also orders a key's reservations: the replay lookup of a
    # reserve (runtime._reserve_prelude) reads the newest from the index instead of sorting in a temporary B-tree
    conn.execute("DROP INDEX IF EXISTS reservations_tenant_key")
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


def _rebuild_reservations(conn: sqlite3.Connection) -> None:
    """A file from before reservations were WITHOUT ROWID: copy them into the current table (once; their
    idempotency records stay where they were written, in the idempotency table)."""
    old = [r[1] for r in conn.execute("PRAGMA table_info(reservations)")]
    conn.execute(f"CREATE TABLE reservations_v2 ({RESERVATION_COLUMNS}) WITHOUT ROWID")
    new = [r[1] for r in conn.execute("PRAGMA table_info(reservations_v2)")]
    cols = ", ".join(c for c in old if c in new)
    conn.execute(f"INSERT INTO reservations_v2 ({cols}) SELECT {cols} FROM reservations")
    conn.execute("DROP TABLE reservations")
    conn.execute("ALTER TABLE reservations_v2 RENAME TO reservations")
    for stmt in RESERVATION_INDEXES.split(";"):
        if stmt.strip():
            conn.execute(stmt)
