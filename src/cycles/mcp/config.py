"""Configuration of `cycles mcp` and `cycles mcp gate`, read from the environment.

| Variable | Meaning |
|---|---|
| `CYCLES_BASE_URL`, `CYCLES_API_KEY` | the Cycles server and a tenant API key (required unless `CYCLES_MOCK=true`) |
| `CYCLES_TENANT` … `CYCLES_TOOLSET` | subject levels filled into calls that leave them out (the SDK's names; the older `CYCLES_DEFAULT_TENANT` … are still read, with a deprecation note) |
| `CYCLES_MOCK=true` | synthetic answers, no server (refused when `CYCLES_ENV`/`NODE_ENV` is `production` unless `CYCLES_ALLOW_MOCK_IN_PRODUCTION=true`) |
| `CYCLES_CONNECT_TIMEOUT`, `CYCLES_READ_TIMEOUT`, `CYCLES_RETRY_*` | the SDK's own settings (seconds) |
| `MCP_HTTP_AUTH_TOKEN` | bearer token required on `/mcp` by `--transport http` |
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Mapping

LEVELS = ("tenant", "workspace", "app", "workflow", "agent", "toolset")
_VALUE = re.compile(r"^[a-zA-Z0-9_.-]{1,128}$")
TRUE = ("1", "true", "yes", "on")


class ConfigError(ValueError):
    """A configuration problem that must stop startup with a clear message."""


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in TRUE


def is_production(env: Mapping[str, str]) -> bool:
    return any(env.get(n, "").strip().lower() in ("production", "prod") for n in ("CYCLES_ENV", "NODE_ENV"))


def deprecated(old: str, new: str) -> None:
    # stderr: stdout carries the MCP protocol on the stdio transport
    sys.stderr.write(f"note: {old} is deprecated; set {new} (the name the SDK and the CLI read)\n")


@dataclass(frozen=True)
class Settings:
    base_url: str | None = None
    api_key: str | None = None
    defaults: dict[str, str] = field(default_factory=dict)
    mock: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        defaults: dict[str, str] = {}
        for level in LEVELS:
            name = f"CYCLES_{level.upper()}"
            value = env.get(name, "")
            old = f"CYCLES_DEFAULT_{level.upper()}"
            if value == "" and env.get(old, ""):
                name, value = old, env[old]
                deprecated(old, f"CYCLES_{level.upper()}")
            if value == "":
                continue
            if not _VALUE.fullmatch(value):
                raise ConfigError(f"{name}={value!r} is invalid: it must be 1-128 characters of "
                                  "letters, digits, '_', '.' or '-'")
            defaults[level] = value
        mock = _flag(env, "CYCLES_MOCK")
        if mock and is_production(env) and not _flag(env, "CYCLES_ALLOW_MOCK_IN_PRODUCTION"):
            raise ConfigError("CYCLES_MOCK=true is refused in production (CYCLES_ENV/NODE_ENV=production): mock "
                              "mode allows everything. Set CYCLES_ALLOW_MOCK_IN_PRODUCTION=true to override.")
        base_url, api_key = env.get("CYCLES_BASE_URL") or None, env.get("CYCLES_API_KEY") or None
        if not mock:
            missing = [n for n, v in (("CYCLES_BASE_URL", base_url), ("CYCLES_API_KEY", api_key)) if not v]
            if missing:
                raise ConfigError(f"{' and '.join(missing)} must be set (or CYCLES_MOCK=true to try the tools "
                                  "without a server)")
        return cls(base_url=base_url, api_key=api_key, defaults=defaults, mock=mock)

    def subject(self, given: Mapping[str, str] | None) -> dict[str, str]:
        """The caller's subject with the configured defaults filled in; explicit values win."""
        merged = dict(given or {})
        for level, value in self.defaults.items():
            if merged.get(level) is None:
                merged[level] = value
        return merged


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_http_token(host: str, token: str | None) -> str | None:
    """The token to require, or None on loopback without one. Refuses a blank token and a public bind
    without a token."""
    if token is not None and token.strip() == "":
        raise ConfigError("the HTTP auth token is blank; set a real token or leave it unset")
    if token is None and not is_loopback(host):
        raise ConfigError(f"--host {host} is not loopback: a bearer token is required (--auth-token or "
                          "MCP_HTTP_AUTH_TOKEN), otherwise anyone who can reach the port spends your budgets")
    return token


MOCK_BANNER = """\
================================================================================
  CYCLES MCP SERVER IN MOCK MODE (CYCLES_MOCK=true)
  Every call is ALLOWED with synthetic data. No budget is enforced and no Cycles
  server is contacted. Do not use this to protect real spend.
================================================================================"""
