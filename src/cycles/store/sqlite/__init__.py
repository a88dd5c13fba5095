"""The embedded store: one SQLite file in WAL mode.

Every mutating operation runs in one `BEGIN IMMEDIATE` transaction, which takes SQLite's single
write lock, so operations are serialized across threads and across every server process that opens
the same file. Reads run outside transactions and see a consistent snapshot per statement.

Calls run on the event loop's thread: a transaction is a handful of indexed statements (tens of
microseconds), cheaper than a hop to a worker thread. `busy_timeout` bounds how long one process
waits for another's write lock before the request fails with 503.

The store is one class assembled from a mixin per concern, as the Lua scripts beside it are split:
schema.py (tables, triggers, migrations), core.py (connection, group commit, transaction events),
runtime.py, quotas.py (v0.1.26 action quota counters), reads.py, budgets.py, admin.py, journal.py and evidence.py
(the SQL of each plane), common.py (shared).
"""

from __future__ import annotations

from ..base import Store
from .admin import _Admin
from .budgets import _Budgets
from .common import new_id
from .core import MAX_BATCH, _Core
from .evidence import _Evidence
from .journal import _Journal
from .quotas import _Quotas
from .reads import _Reads
from .runtime import (
    DEFAULT_GRACE_MS, DEFAULT_MAX_EXTENSIONS, DEFAULT_TTL_MS, SUBJECT_LEVELS, _Runtime, balance_record,
    time_ordered_id,
)
from .schema import COUNTER_TRIGGERS, GEN_TRIGGERS, SCHEMA


class SQLiteStore(_Runtime, _Quotas, _Reads, _Budgets, _Admin, _Journal, _Evidence, _Core, Store):
    """The embedded store (see the module docstring); constructed as SQLiteStore(path, synchronous=...,
    busy_timeout_ms=..., clock=...)."""


__all__ = [
    "COUNTER_TRIGGERS", "DEFAULT_GRACE_MS", "DEFAULT_MAX_EXTENSIONS", "DEFAULT_TTL_MS", "GEN_TRIGGERS", "MAX_BATCH",
    "SCHEMA", "SUBJECT_LEVELS", "SQLiteStore", "balance_record", "new_id", "time_ordered_id",
]
