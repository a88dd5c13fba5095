"""Client configuration: from arguments or from the environment. Every duration is in SECONDS."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

SUBJECT_LEVELS = ("tenant", "workspace", "app", "workflow", "agent", "toolset")


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {raw!r}")


@dataclass(frozen=True)
class CyclesConfig:
    base_url: str
    api_key: str
    tenant: str | None = None
    workspace: str | None = None
    app: str | None = None
    workflow: str | None = None
    agent: str | None = None
    toolset: str | None = None
    connect_timeout: float = 2.0
    read_timeout: float = 5.0
    write_timeout: float = 5.0
    pool_timeout: float = 5.0
    max_connections: int = 100
    max_keepalive_connections: int = 20
    retry_enabled: bool = True
    retry_max_attempts: int = 5
    retry_initial_delay: float = 0.5
    retry_multiplier: float = 2.0
    retry_max_delay: float = 30.0
    retry_max_wait: float = 30.0  # longest Retry-After a foreground call waits; longer raises RateLimitedError
    retry_flush_timeout: float = 10.0
    journal_enabled: bool = True
    journal_dir: str | None = None
    journal_fsync: bool = False
    journal_replay: bool = True  # replay this partition's records in the background at the first settlement
    heartbeat_enabled: bool = True
    user_agent: str = "cycles-python-sdk"
    extra_headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.base_url:
            raise ValueError("base_url is required (argument or CYCLES_BASE_URL)")
        if not self.api_key:
            raise ValueError("api_key is required (argument or CYCLES_API_KEY)")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        for name in ("connect_timeout", "read_timeout", "write_timeout", "pool_timeout", "retry_initial_delay",
                     "retry_max_delay", "retry_flush_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds")
        if self.retry_max_attempts < 1:
            raise ValueError("retry_max_attempts must be >= 1")
        if self.retry_multiplier < 1:
            raise ValueError("retry_multiplier must be >= 1")

    @classmethod
    def from_env(cls, prefix: str = "CYCLES_", **overrides: Any) -> "CyclesConfig":
        """Read `<prefix>BASE_URL`, `<prefix>API_KEY`, `<prefix>TENANT` ... `<prefix>TOOLSET`, timeouts (seconds)."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extra_headers":
                continue
            raw = os.environ.get(prefix + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            try:
                if kind.startswith("bool"):
                    kwargs[f.name] = _bool(raw)
                elif kind.startswith("int"):
                    kwargs[f.name] = int(raw)
                elif kind.startswith("float"):
                    kwargs[f.name] = float(raw)
                else:
                    kwargs[f.name] = raw
            except ValueError as exc:
                raise ValueError(f"{prefix}{f.name.upper()}: {exc}") from None
        kwargs.setdefault("base_url", "")
        kwargs.setdefault("api_key", "")
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)

    def with_(self, **changes: Any) -> "CyclesConfig":
        return replace(self, **changes)

    @property
    def attempt_budget_s(self) -> float:
        """Upper bound of one complete request attempt (connect + write + read), used by the heartbeat."""
        return self.connect_timeout + self.write_timeout + self.read_timeout

    def default_subject(self) -> dict[str, str]:
        return {lvl: getattr(self, lvl) for lvl in SUBJECT_LEVELS if getattr(self, lvl)}

    def resolved_journal_dir(self) -> Path:
        if self.journal_dir:
            return Path(self.journal_dir)
        return Path.home() / ".cycles" / "commit-journal"
