"""`cycles mcp gate -- COMMAND ARGS...`: make tool budgets binding.

The gate is an MCP server (stdio) that starts another MCP server (the upstream, over stdio) and
offers the upstream's tools unchanged. Every `tools/call` is reserved first, with the subject
`CYCLES_TENANT … CYCLES_TOOLSET` + `toolset=<tool name>` and the estimate/unit of the tool's entry in the config
file. A reservation that is not allowed returns an `isError` result and the call never reaches the
upstream; an allowed call is forwarded, and then committed (the estimate is the actual) through the
SDK's durable settlement, or released when the upstream reports an error (`on_error = "release"`,
the default). The upstream's own results and errors are passed through unchanged.

Config (TOML, or JSON with the same shape); every key is optional:

    [defaults]
    estimate = 1000000          # per call; USD_MICROCENTS: $0.01
    unit = "USD_MICROCENTS"
    action_kind = "tool.call"
    ttl_ms = 60000
    on_error = "release"        # or "commit": charge calls that failed too

    [tools.send_email]
    estimate = 1
    unit = "RISK_POINTS"
    toolset = "email"           # the budget scope level; the tool's name when absent
"""

from __future__ import annotations

import json
import os
import re
import sys
import tomllib
import uuid
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import anyio
import mcp.types as t
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError

from .. import __version__
from ..client import errors as e
from . import schemas as s
from .config import ConfigError, Settings
from .server import budget_hints, error_payload, error_result, text

UNITS = tuple(s.UNITS)


@dataclass(frozen=True)
class ToolBudget:
    estimate: int = 1_000_000
    unit: str = "USD_MICROCENTS"
    action_kind: str = "tool.call"
    ttl_ms: int = 60_000
    on_error: str = "release"
    toolset: str | None = None

    def check(self, where: str) -> "ToolBudget":
        if isinstance(self.estimate, bool) or not isinstance(self.estimate, int) or self.estimate < 0:
            raise ConfigError(f"{where}.estimate must be an integer >= 0")
        if self.unit not in UNITS:
            raise ConfigError(f"{where}.unit must be one of {', '.join(UNITS)}")
        if not isinstance(self.action_kind, str) or not 1 <= len(self.action_kind) <= 64:
            raise ConfigError(f"{where}.action_kind must be 1-64 characters")
        if isinstance(self.ttl_ms, bool) or not isinstance(self.ttl_ms, int) or not 1000 <= self.ttl_ms <= 86_400_000:
            raise ConfigError(f"{where}.ttl_ms must be an integer from 1000 to 86400000")
        if self.on_error not in ("release", "commit"):
            raise ConfigError(f"{where}.on_error must be 'release' or 'commit'")
        if self.toolset is not None and not re.fullmatch(r"[a-zA-Z0-9_.-]{1,128}", str(self.toolset)):
            raise ConfigError(f"{where}.toolset must be 1-128 characters of letters, digits, '_', '.' or '-'")
        return self


_KEYS = {f.name for f in fields(ToolBudget)}


def _entry(base: ToolBudget, raw: Any, where: str) -> ToolBudget:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_KEYS))})")
    return replace(base, **raw).check(where)


@dataclass(frozen=True)
class GateConfig:
    defaults: ToolBudget = field(default_factory=ToolBudget)
    tools: dict[str, ToolBudget] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None) -> "GateConfig":
        if path is None:
            return cls()
        p = Path(path)
        try:
            raw_text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the gate config {p}: {exc}") from None
        try:
            raw = json.loads(raw_text) if p.suffix.lower() == ".json" else tomllib.loads(raw_text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"the gate config {p} is not valid {'JSON' if p.suffix == '.json' else 'TOML'}: "
                              f"{exc}") from None
        unknown = set(raw) - {"defaults", "tools"}
        if unknown:
            raise ConfigError(f"{p}: unknown section(s) {', '.join(sorted(unknown))} (known: defaults, tools)")
        defaults = _entry(ToolBudget(), raw.get("defaults", {}), "defaults")
        tools_raw = raw.get("tools", {})
        if not isinstance(tools_raw, dict):
            raise ConfigError("tools must be a table of tool names")
        tools = {name: _entry(defaults, entry, f"tools.{name}") for name, entry in tools_raw.items()}
        return cls(defaults, tools)

    def for_tool(self, name: str) -> ToolBudget:
        return self.tools.get(name, self.defaults)


def toolset_for(name: str) -> str:
    """A tool name as a subject value (letters, digits, '_', '.', '-'; at most 128 characters)."""
    return (re.sub(r"[^a-zA-Z0-9_.-]", "_", name) or "tool")[:128]


def _log_stderr(message: str) -> None:
    print(f"cycles mcp gate: {message}", file=sys.stderr, flush=True)


class Gate:
    def __init__(self, settings: Settings, config: GateConfig, backend: Any, upstream: Any) -> None:
        self.settings = settings
        self.config = config
        self.backend = backend
        self.upstream = upstream

    async def list_tools(self) -> list[t.Tool]:
        tools: list[t.Tool] = []
        cursor: str | None = None
        while True:
            page = await self.upstream.list_tools(cursor=cursor)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                return tools

    async def _settle(self, reservation_id: str, budget: ToolBudget, subject: dict[str, Any], action: dict[str, Any],
                      ran: bool, reason: str) -> None:
        key = f"gate-{uuid.uuid4()}"
        try:
            if not ran:
                await self.backend.release_reservation(reservation_id, {"idempotency_key": key, "reason": reason})
                return
            commit = {"idempotency_key": key, "actual": {"unit": budget.unit, "amount": budget.estimate},
                      "metadata": {"settled_by": "cycles-mcp-gate", "outcome": reason}}
            if hasattr(self.backend, "settle"):  # durable: journal, same-key retries, event after expiry
                outcome = await self.backend.settle(reservation_id, commit, subject=subject, action=action)
                if not outcome.settled:
                    _log_stderr(f"commit of {reservation_id} not confirmed yet ({outcome.kind}): {outcome.error}")
            else:
                await self.backend.commit_reservation(reservation_id, commit)
        except e.CyclesError as err:
            _log_stderr(f"{'commit' if ran else 'release'} of {reservation_id} failed: {err}")

    def _blocked(self, name: str, payload: dict[str, Any]) -> t.CallToolResult:
        payload = {**payload, "tool": name, "blockedBy": "cycles"}
        hint = (f"HINT: budget DENIED ({payload.get('error')}) — the tool {name} was NOT run. Do not retry it "
                "blindly: check the budget with the operator, use another approach, or stop and report.")
        return error_result(payload, [hint])

    async def call(self, name: str, arguments: dict[str, Any] | None) -> t.CallToolResult:
        budget = self.config.for_tool(name)
        subject = self.settings.subject({"toolset": budget.toolset or toolset_for(name)})
        action = {"kind": budget.action_kind, "name": name[:256]}
        try:
            res = await self.backend.create_reservation({
                "idempotency_key": f"gate-{uuid.uuid4()}", "subject": subject, "action": action,
                "estimate": {"unit": budget.unit, "amount": budget.estimate}, "ttl_ms": budget.ttl_ms,
                "metadata": {"mcp_tool": name, "gate": "cycles-mcp-gate"}})
        except e.CyclesError as err:  # budget denials, and fail-closed on anything else (auth, transport)
            return self._blocked(name, error_payload(err))
        except ValueError as err:
            return self._blocked(name, {"error": "INVALID_REQUEST", "message": str(err)})
        if res.decision == "DENY" or not res.reservation_id:
            return self._blocked(name, {"error": res.reason_code or "DENIED", "message": "reservation denied"})
        caps = res.caps
        if caps is not None and ((caps.tool_allowlist is not None and name not in caps.tool_allowlist)
                                 or (caps.tool_denylist is not None and name in caps.tool_denylist)):
            await self._settle(res.reservation_id, budget, subject, action, False, "tool_not_allowed_by_caps")
            return self._blocked(name, {"error": "TOOL_NOT_ALLOWED", "message": f"the caps do not allow {name}"})
        try:
            result = await self.upstream.call_tool(name, arguments)
        except MCPError:
            await self._settle(res.reservation_id, budget, subject, action, budget.on_error == "commit",
                               "upstream_protocol_error")
            raise
        except Exception as exc:  # noqa: BLE001 - upstream died or answered something unusable
            await self._settle(res.reservation_id, budget, subject, action, budget.on_error == "commit",
                               "upstream_failed")
            return error_result({"error": "UPSTREAM_ERROR", "message": f"{type(exc).__name__}: {exc}",
                                 "tool": name})
        except BaseException:  # cancelled by the client or at shutdown: do not leave the hold until its TTL
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await self._settle(res.reservation_id, budget, subject, action, budget.on_error == "commit",
                                   "cancelled")
            raise
        failed = bool(result.is_error)
        await self._settle(res.reservation_id, budget, subject, action, not failed or budget.on_error == "commit",
                           "upstream_tool_error" if failed else "ok")
        update: dict[str, Any] = {}
        if result.meta:  # the upstream's protocol stamps (its serverInfo) are not ours to forward
            update["meta"] = {k: v for k, v in result.meta.items()
                              if not k.startswith("io.modelcontextprotocol/")} or None
        hints = [h for h in budget_hints(s.to_tool(res)) if h.startswith("HINT: low budget")]
        if hints:
            update["content"] = [*result.content, *(text(h) for h in hints)]
        return result.model_copy(update=update) if update else result


def build_gate_server(gate: Gate, instructions: str | None = None) -> Server:
    async def list_tools(ctx: Any, params: Any) -> t.ListToolsResult:
        return t.ListToolsResult(tools=await gate.list_tools())

    async def call_tool(ctx: Any, params: t.CallToolRequestParams) -> t.CallToolResult:
        return await gate.call(params.name, params.arguments)

    return Server("cycles-mcp-gate", version=__version__, title="Cycles gate", instructions=instructions,
                  on_list_tools=list_tools, on_call_tool=call_tool)


def make_gate_backend(settings: Settings) -> Any:
    if settings.mock:
        from .mock import MockBackend

        return MockBackend()
    from ..client import AsyncCyclesClient, CyclesConfig

    config = CyclesConfig.from_env(base_url=settings.base_url, api_key=settings.api_key, heartbeat_enabled=False,
                                   user_agent=f"cycles-mcp-gate/{__version__}")
    return AsyncCyclesClient(config)


async def run_gate(command: list[str], settings: Settings, config: GateConfig) -> None:
    from mcp import Client, StdioServerParameters
    from mcp.server.stdio import stdio_server

    if not settings.mock and "tenant" not in settings.defaults:
        raise ConfigError("cycles mcp gate needs CYCLES_TENANT (the tenant whose budgets gate the tools)")
    backend = make_gate_backend(settings)
    params = StdioServerParameters(command=command[0], args=command[1:], env=dict(os.environ))
    try:
        async with Client(params) as upstream:
            gate = Gate(settings, config, backend, upstream)
            server = build_gate_server(gate, upstream.instructions)
            async with stdio_server() as (read, write):
                await server.run(read, write, server.create_initialization_options())
    finally:
        await backend.aclose()
