"""The durable commit journal.

Two layers (docs/sdk.md, "Journal design"):

* **Intent log** (the hot path). Each process appends one JSON line per settlement to its own
  `wal-<pid>-<random>.log` in the partition directory *before* the first commit/event request leaves
  the process, and one `done` line when the first attempt reaches a terminal outcome. That is one
  `write(2)` into an already open `O_APPEND` descriptor (no file create, rename, unlink or fsync),
  so a commit that succeeds at once costs two small appends. The data is in the kernel before the
  request is sent, so it survives the process being killed at any point; `journal_fsync=True`
  additionally fsyncs each intent (survives power loss, costs a disk flush per call). The process
  holds an exclusive `flock` on its log for as long as it lives.
* **Record files** (anything unresolved). A settlement whose first attempt is not terminal is
  *promoted* to the standard record `v2-<sha256(reservation_id)>.json` (atomic temp file + rename,
  mode 0600, directory 0700), in the published runcycles 0.5 record format, before any retry. Mode
  switches (commit -> event) and 429 not-before floors are written to the record before the next
  request. A record is deleted only on schema-valid success or an understood terminal rejection.

Recovery (`scan`): an intent log whose `flock` can be taken belongs to a dead process; its intents
without `done` are promoted to record files and the log is removed. Record files are then loaded;
corrupt or unsupported ones are renamed to `*.corrupt` and reported; legacy filenames are migrated.

Partition: `<journal_dir>/<fingerprint>/`, fingerprint = PBKDF2 of the base URL and the tenant (or the
API key when no tenant is configured), the same derivation as runcycles 0.5.3, so a tenant's records
survive API-key rotation and the key itself is never stored.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger("cycles.client.journal")

RECORD_VERSION = 1
_SUFFIX = ".json"
_WAL_COMPACT_BYTES = 1 << 20


@lru_cache(maxsize=256)
def _principal_digest(base_url: str, principal: str) -> str:
    digest = hashlib.pbkdf2_hmac("sha256", principal.encode(), f"runcycles-commit-journal\n{base_url}".encode(),
                                 30_000)
    return digest.hex()[:16]


def fingerprint(base_url: str, api_key: str, tenant: str | None = None) -> str:
    principal = f"tenant\n{tenant}" if tenant and tenant.strip() else f"key\n{api_key}"
    return _principal_digest(base_url, principal)


def record_filename(reservation_id: str) -> str:
    return f"v2-{hashlib.sha256(reservation_id.encode('utf-8')).hexdigest()}{_SUFFIX}"


def legacy_filename(reservation_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", reservation_id) + _SUFFIX


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class PendingRecord:
    reservation_id: str
    base_url: str
    mode: str = "commit"  # "commit" | "event"
    commit_body: dict[str, Any] | None = None
    event_fallback_body: dict[str, Any] | None = None
    recorded_at_ms: int = field(default_factory=now_ms)
    not_before_ms: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"version": RECORD_VERSION, "reservation_id": self.reservation_id, "base_url": self.base_url,
                "mode": self.mode, "commit_body": self.commit_body, "event_fallback_body": self.event_fallback_body,
                "recorded_at_ms": self.recorded_at_ms, "not_before_ms": self.not_before_ms}

    @classmethod
    def from_dict(cls, data: Any) -> "PendingRecord":
        if not isinstance(data, dict):
            raise ValueError("journal record must be a JSON object")
        version = data.get("version")
        if type(version) is not int or version != RECORD_VERSION:
            raise ValueError(f"unsupported journal record version: {version!r}")
        rid = data.get("reservation_id")
        if not isinstance(rid, str) or not rid:
            raise ValueError("journal record has no reservation_id")
        mode = data.get("mode", "commit")
        if mode not in ("commit", "event"):
            raise ValueError(f"journal record has unknown mode {mode!r}")
        for key in ("commit_body", "event_fallback_body"):
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise ValueError(f"journal record has an invalid {key}")
        if mode == "commit" and not isinstance(data.get("commit_body"), dict):
            raise ValueError("commit-mode record has no commit_body")
        if mode == "event" and not isinstance(data.get("event_fallback_body"), dict):
            raise ValueError("event-mode record has no event_fallback_body")
        base_url = data.get("base_url", "")
        if not isinstance(base_url, str):
            raise ValueError("journal record has an invalid base_url")
        recorded = data.get("recorded_at_ms", 0)
        nb = data.get("not_before_ms")
        if type(recorded) is not int or recorded < 0:
            raise ValueError("journal record has an invalid recorded_at_ms")
        if nb is not None and (type(nb) is not int or nb < 0):
            raise ValueError("journal record has an invalid not_before_ms")
        return cls(rid, base_url, mode, data.get("commit_body"), data.get("event_fallback_body"), recorded, nb)


@dataclass
class ScanReport:
    records: list[PendingRecord] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    promoted_from_logs: int = 0
    migrated: int = 0


class Journal:
    """One partition (server + principal) of the journal. Thread-safe; never raises on I/O failure
    except through `persist(..., strict=True)` (failures are logged at ERROR and counted)."""

    def __init__(self, root: Path, base_url: str, api_key: str, tenant: str | None, *, fsync: bool = False) -> None:
        self.root = Path(root)
        self.base_url = base_url
        self.dir = self.root / fingerprint(base_url, api_key, tenant)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._wal_fd: int | None = None
        self._wal_path: Path | None = None
        self._wal_pid: int | None = None
        self._open_intents: set[str] = set()
        self.failures = 0

    # ---------------------------------------------------------------- helpers

    def _ensure_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for d in (self.root, self.dir):
            try:
                os.chmod(d, 0o700)
            except OSError:
                pass

    def _fail(self, what: str, rid: str) -> None:
        self.failures += 1
        log.error("commit journal %s failed for reservation %s in %s; settlement continues WITHOUT durability",
                  what, rid, self.dir, exc_info=True)

    def path_for(self, reservation_id: str) -> Path:
        return self.dir / record_filename(reservation_id)

    # ---------------------------------------------------------------- intent log (hot path)

    def _wal(self) -> int:
        if self._wal_fd is not None and self._wal_pid == os.getpid():
            return self._wal_fd
        self._ensure_dir()
        path = self.dir / f"wal-{os.getpid()}-{uuid.uuid4().hex[:8]}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._wal_fd, self._wal_path, self._wal_pid = fd, path, os.getpid()
        self._open_intents = set()
        return fd

    def _append(self, line: dict[str, Any], sync: bool) -> None:
        fd = self._wal()
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to the intent log ({written} of {len(data)} bytes)")
        if sync:
            os.fsync(fd)

    def intend(self, record: PendingRecord) -> bool:
        """Durably note a settlement before its first request. True when the note is in place."""
        with self._lock:
            try:
                self._append({"op": "put", "record": record.to_dict()}, self.fsync)
                self._open_intents.add(record.reservation_id)
                return True
            except Exception:  # noqa: BLE001
                self._fail("intent write", record.reservation_id)
                return False

    def resolve_intent(self, reservation_id: str) -> None:
        """The first attempt reached a terminal outcome, or the record was promoted to its own file."""
        with self._lock:
            if reservation_id not in self._open_intents:
                return
            try:
                self._append({"op": "done", "reservation_id": reservation_id}, False)
                self._open_intents.discard(reservation_id)
                if not self._open_intents and self._wal_fd is not None and os.fstat(self._wal_fd).st_size > _WAL_COMPACT_BYTES:
                    os.ftruncate(self._wal_fd, 0)
            except Exception:  # noqa: BLE001 - a stale intent only causes a harmless same-key replay
                log.warning("could not mark intent done for %s", reservation_id, exc_info=True)

    def close(self) -> None:
        with self._lock:
            if self._wal_fd is not None and self._wal_pid == os.getpid():
                try:
                    if not self._open_intents and self._wal_path is not None:
                        self._wal_path.unlink(missing_ok=True)
                    os.close(self._wal_fd)
                except OSError:
                    pass
            self._wal_fd = None

    # ---------------------------------------------------------------- record files

    def persist(self, record: PendingRecord) -> bool:
        """Write (or overwrite) the standard record file atomically. True on success."""
        try:
            self._ensure_dir()
            target = self.path_for(record.reservation_id)
            tmp = self.dir / f"{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, json.dumps(record.to_dict()).encode())
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
            return True
        except Exception:  # noqa: BLE001
            self._fail("record write", record.reservation_id)
            try:
                tmp.unlink(missing_ok=True)  # type: ignore[possibly-undefined]
            except Exception:  # noqa: BLE001
                pass
            return False

    def promote(self, record: PendingRecord) -> bool:
        """Move an intent to its own record file (before any retry)."""
        ok = self.persist(record)
        if ok:
            self.resolve_intent(record.reservation_id)
        return ok

    def discard(self, reservation_id: str) -> None:
        """Remove a record after a terminal outcome (never a colliding legacy file)."""
        self.resolve_intent(reservation_id)
        try:
            self.path_for(reservation_id).unlink(missing_ok=True)
            legacy = self.dir / legacy_filename(reservation_id)
            if legacy.exists():
                try:
                    rec = PendingRecord.from_dict(json.loads(legacy.read_text("utf-8")))
                    if rec.reservation_id == reservation_id:
                        legacy.unlink(missing_ok=True)
                except (OSError, ValueError):
                    pass
        except OSError:
            log.warning("could not remove journal record for %s", reservation_id, exc_info=True)

    def load(self, reservation_id: str) -> PendingRecord | None:
        try:
            return PendingRecord.from_dict(json.loads(self.path_for(reservation_id).read_text("utf-8")))
        except (OSError, ValueError):
            return None

    # ---------------------------------------------------------------- recovery scan

    def _quarantine(self, path: Path, report: ScanReport, why: str) -> None:
        target = path.with_name(path.name + ".corrupt") if not path.name.endswith(_SUFFIX) else path.with_suffix(".corrupt")
        try:
            os.replace(path, target)
        except OSError:
            pass
        report.quarantined.append(str(target))
        log.error("quarantined corrupt commit-journal record %s (%s) -> %s", path, why, target)

    def _claim_dead_logs(self, report: ScanReport) -> None:
        for wal in sorted(self.dir.glob("wal-*.log")):
            if self._wal_path is not None and wal == self._wal_path:
                continue
            try:
                fd = os.open(wal, os.O_RDWR)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # its writer is alive
                pending: dict[str, dict[str, Any]] = {}
                with os.fdopen(os.dup(fd), "rb") as fh:
                    raw_lines = fh.read().split(b"\n")
                bad: list[bytes] = []
                for raw in raw_lines:
                    if not raw.strip():
                        continue
                    try:
                        line = json.loads(raw)
                        if line.get("op") == "put":
                            rec = PendingRecord.from_dict(line["record"])
                            pending[rec.reservation_id] = rec.to_dict()
                        elif line.get("op") == "done":
                            pending.pop(line["reservation_id"], None)
                        else:
                            raise ValueError("unknown op")
                    except (ValueError, KeyError, TypeError, AttributeError):
                        bad.append(raw)
                for data in pending.values():
                    rec = PendingRecord.from_dict(data)
                    if not self.path_for(rec.reservation_id).exists():
                        if self.persist(rec):
                            report.promoted_from_logs += 1
                if bad:
                    qpath = wal.with_name(wal.name + ".corrupt")
                    qpath.write_bytes(b"\n".join(bad) + b"\n")
                    report.quarantined.append(str(qpath))
                    log.error("quarantined %d unreadable intent-log lines from %s -> %s", len(bad), wal, qpath)
                wal.unlink(missing_ok=True)
            finally:
                os.close(fd)

    def scan(self) -> ScanReport:
        """Adopt dead processes' intents, quarantine corrupt records, migrate legacy names, load the rest."""
        report = ScanReport()
        if not self.dir.is_dir():
            return report
        try:
            self._claim_dead_logs(report)
            cutoff = time.time() - 3600
            for tmp in self.dir.glob("*.tmp"):
                try:
                    if tmp.stat().st_mtime < cutoff:
                        tmp.unlink(missing_ok=True)
                except OSError:
                    pass
            for path in sorted(self.dir.glob(f"*{_SUFFIX}")):
                try:
                    rec = PendingRecord.from_dict(json.loads(path.read_text("utf-8")))
                except FileNotFoundError:
                    continue  # settled concurrently by another worker
                except (OSError, ValueError, UnicodeDecodeError) as exc:
                    self._quarantine(path, report, str(exc))
                    continue
                standard = self.path_for(rec.reservation_id)
                if path != standard:
                    try:
                        if not standard.exists():
                            os.replace(path, standard)
                            report.migrated += 1
                            log.info("migrated legacy journal record %s -> %s", path.name, standard.name)
                        else:
                            existing = self.load(rec.reservation_id)
                            if existing is not None and existing.reservation_id == rec.reservation_id:
                                path.unlink(missing_ok=True)
                            continue
                    except OSError:
                        log.warning("could not migrate legacy journal record %s", path, exc_info=True)
                if rec.base_url == self.base_url:
                    report.records.append(rec)
        except OSError:
            log.warning("could not scan commit journal %s", self.dir, exc_info=True)
        return report
