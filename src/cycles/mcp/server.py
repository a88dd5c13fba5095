"""The Cycles MCP server: the nine tools, the resources and the prompts (low-level `mcp` Server).

Each tool makes one call through the SDK's `AsyncCyclesClient` (or the mock backend) and answers
with the JSON text plus `structuredContent` in camelCase. Errors are `isError` results whose text
is `{"error": <protocol code>, "message", "requestId", "httpStatus", "details"}`. Plain-language
`HINT:` lines follow the JSON on DENY, ALLOW_WITH_CAPS, budget denials and balances under 15 %;
they are never part of `structuredContent`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import mcp.types as t
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError

from .. import __version__
from ..client import errors as e
from . import schemas as s
from .config import Settings
from .texts import INSTRUCTIONS, PATTERNS, PROMPTS, QUICKSTART, prompt_text

log = logging.getLogger("cycles.mcp")
SERVER_NAME = "cycles-mcp-server"
LOW_BUDGET = 0.15
DENIAL_CODES = ("BUDGET_EXCEEDED", "OVERDRAFT_LIMIT_EXCEEDED", "DEBT_OUTSTANDING", "BUDGET_FROZEN", "BUDGET_CLOSED",
                "TENANT_CLOSED")
RESOURCE_NOT_FOUND = -32002

READ_ONLY = t.ToolAnnotations(read_only_hint=True, open_world_hint=False)
IDEMPOTENT_WRITE = t.ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                                     open_world_hint=False)


@dataclass(frozen=True)
class ToolSpec:
    name: str
    title: str
    description: str
    read_only: bool = False


TOOLS = [
    ToolSpec("cycles_reserve", "Reserve Budget",
             "Reserve budget BEFORE a costly or risky operation (LLM call, paid API, tool invocation, external "
             "action). Proceed only if the decision is ALLOW or ALLOW_WITH_CAPS; an error such as BUDGET_EXCEEDED "
             "means do not run the operation. Always settle the returned reservationId afterwards: cycles_commit "
             "with the actual cost, or cycles_release if the operation did not run. For a preflight check that "
             "holds nothing use cycles_decide."),
    ToolSpec("cycles_commit", "Commit Actual Spend",
             "Commit the actual cost of an operation to its reservation. Always commit after a reserved "
             "operation ran; the unused part of the reservation returns to the budget."),
    ToolSpec("cycles_release", "Release Reservation",
             "Release a reservation whose operation did not run (cancelled, failed, skipped); the held amount "
             "returns to the budget."),
    ToolSpec("cycles_extend", "Extend Reservation",
             "Extend the lease of an ACTIVE reservation for long-running work, before it expires."),
    ToolSpec("cycles_decide", "Preflight Decision",
             "Ask whether an operation would be allowed, without holding budget. Cheaper than reserving; use "
             "it to choose between options (e.g. a cheap or an expensive model)."),
    ToolSpec("cycles_check_balance", "Check Balance",
             "Show allocated, spent, reserved and remaining budget for the scopes matching the filters "
             "(missing filters come from CYCLES_TENANT … CYCLES_TOOLSET).", read_only=True),
    ToolSpec("cycles_list_reservations", "List Reservations",
             "List reservations of this tenant, optionally filtered by status, idempotency key or subject.",
             read_only=True),
    ToolSpec("cycles_get_reservation", "Get Reservation",
             "Show one reservation: status, amounts, subject, scope path and timestamps.", read_only=True),
    ToolSpec("cycles_create_event", "Record Spend Event",
             "Record spend that had no reservation (or whose reservation expired) directly against the budget."),
]
TOOL_NAMES = [spec.name for spec in TOOLS]


def tool_list() -> list[t.Tool]:
    return [t.Tool(name=spec.name, title=spec.title, description=spec.description,
                   input_schema=s.INPUTS[spec.name], output_schema=s.OUTPUTS[spec.name],
                   annotations=(READ_ONLY if spec.read_only else IDEMPOTENT_WRITE).model_copy(
                       update={"title": spec.title}))
            for spec in TOOLS]


# ---------------------------------------------------------------- hints and results


def budget_hints(data: dict[str, Any]) -> list[str]:
    hints: list[str] = []
    decision = data.get("decision")
    if decision == "DENY":
        reason = f" ({data['reasonCode']})" if data.get("reasonCode") else ""
        hints.append(f"HINT: budget DENIED{reason} — do not proceed with the operation. Check the remaining budget "
                     "with cycles_check_balance, switch to a cheaper approach, or stop and report.")
    elif decision == "ALLOW_WITH_CAPS":
        caps = ", ".join(f"{k}={v}" for k, v in (data.get("caps") or {}).items())
        hints.append(f"HINT: allowed WITH CAPS — respect these limits while executing: {caps or 'see caps'}.")
    for bal in data.get("balances") or []:
        remaining = bal.get("remaining", {}).get("amount")
        allocated = bal.get("allocated", {}).get("amount")
        if isinstance(remaining, int) and isinstance(allocated, int) and allocated > 0 \
                and remaining / allocated < LOW_BUDGET:
            pct = max(0, round(remaining * 100 / allocated))
            hints.append(f"HINT: low budget — ~{pct}% remaining on {bal.get('scopePath') or bal.get('scope')}. "
                         "Consider cheaper models, skipping optional work, or fewer retries.")
    return hints


def text(value: str) -> t.TextContent:
    return t.TextContent(type="text", text=value)


def ok_result(data: dict[str, Any]) -> t.CallToolResult:
    content = [text(json.dumps(data, indent=2))] + [text(h) for h in budget_hints(data)]
    return t.CallToolResult(content=content, structured_content=data)


def error_payload(err: e.CyclesError) -> dict[str, Any]:
    if isinstance(err, e.CyclesTransportError):
        code = "TRANSPORT_ERROR"
    elif isinstance(err, e.InvalidResponseError):
        code = "INVALID_RESPONSE"
    else:
        code = getattr(err, "error_code", None) or "UNKNOWN"
    payload: dict[str, Any] = {"error": code, "message": getattr(err, "message", str(err))}
    status = getattr(err, "status", -1)
    for key, value in (("requestId", getattr(err, "request_id", None)), ("traceId", getattr(err, "trace_id", None)),
                       ("httpStatus", status if status != -1 else None),
                       ("details", getattr(err, "details", None)),
                       ("retryAfterMs", getattr(err, "retry_after_ms", None))):
        if value is not None:
            payload[key] = value
    return payload


def error_result(payload: dict[str, Any], hints: list[str] | None = None) -> t.CallToolResult:
    content = [text(json.dumps(payload, indent=2))] + [text(h) for h in hints or []]
    return t.CallToolResult(content=content, is_error=True)


def error_hints(tool: str, payload: dict[str, Any]) -> list[str]:
    code = payload.get("error")
    if code in DENIAL_CODES and tool in ("cycles_reserve", "cycles_decide", "cycles_create_event"):
        return [f"HINT: budget DENIED ({code}) — do not proceed with the operation. Check the remaining budget "
                "with cycles_check_balance, switch to a cheaper approach, or stop and report."]
    if code == "RESERVATION_EXPIRED" and tool == "cycles_commit":
        return ["HINT: the reservation expired before the commit. If the operation ran, record its cost with "
                "cycles_create_event (same subject and action); extend long work with cycles_extend next time."]
    if code == "LIMIT_EXCEEDED":
        wait = payload.get("retryAfterMs")
        return [f"HINT: rate limited — retry the same call with the same idempotencyKey"
                f"{f' after {wait} ms' if wait is not None else ' later'}."]
    return []


def invalid(message: str) -> t.CallToolResult:
    return error_result({"error": "INVALID_REQUEST", "message": message})


class InvalidArguments(ValueError):
    pass


# ---------------------------------------------------------------- the tools


class CyclesTools:
    """Tool implementations over a backend with the `AsyncCyclesClient` methods."""

    def __init__(self, settings: Settings, backend: Any) -> None:
        self.settings = settings
        self.backend = backend
        self.validators = {name: Draft202012Validator(schema) for name, schema in s.INPUTS.items()}
        self.handlers: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "cycles_reserve": self.reserve, "cycles_commit": self.commit, "cycles_release": self.release,
            "cycles_extend": self.extend, "cycles_decide": self.decide, "cycles_check_balance": self.check_balance,
            "cycles_list_reservations": self.list_reservations, "cycles_get_reservation": self.get_reservation,
            "cycles_create_event": self.create_event,
        }

    def _with_subject(self, body: dict[str, Any]) -> dict[str, Any]:
        subject = self.settings.subject(body.get("subject"))
        if not any(subject.get(level) for level in s.LEVELS):
            raise InvalidArguments("subject needs at least one of tenant, workspace, app, workflow, agent, toolset; "
                                   "pass one or configure CYCLES_TENANT (or another level: CYCLES_WORKSPACE ... CYCLES_TOOLSET)")
        body["subject"] = subject
        return body

    async def reserve(self, body: dict[str, Any]) -> Any:
        return await self.backend.create_reservation(self._with_subject(body))

    async def decide(self, body: dict[str, Any]) -> Any:
        return await self.backend.decide(self._with_subject(body))

    async def create_event(self, body: dict[str, Any]) -> Any:
        return await self.backend.create_event(self._with_subject(body))

    async def commit(self, body: dict[str, Any]) -> Any:
        rid = body.pop("reservation_id")
        return await self.backend.commit_reservation(rid, body)

    async def release(self, body: dict[str, Any]) -> Any:
        rid = body.pop("reservation_id")
        return await self.backend.release_reservation(rid, body)

    async def extend(self, body: dict[str, Any]) -> Any:
        rid = body.pop("reservation_id")
        return await self.backend.extend_reservation(rid, body)

    async def check_balance(self, body: dict[str, Any]) -> Any:
        query = self.settings.subject({k: v for k, v in body.items() if k in s.LEVELS})
        if not any(query.get(level) for level in s.LEVELS):
            raise InvalidArguments("give at least one of tenant, workspace, app, workflow, agent, toolset, or "
                                   "configure CYCLES_TENANT")
        for key in ("include_children", "limit", "cursor"):
            if key in body:
                query[key] = body[key]
        return await self.backend.get_balances(**query)

    async def list_reservations(self, body: dict[str, Any]) -> Any:
        return await self.backend.list_reservations(**body)  # no subject defaults: the API key scopes the tenant

    async def get_reservation(self, body: dict[str, Any]) -> Any:
        return await self.backend.get_reservation(body["reservation_id"])

    async def call(self, name: str, arguments: dict[str, Any] | None) -> t.CallToolResult:
        handler = self.handlers.get(name)
        if handler is None:
            raise MCPError(code=t.INVALID_PARAMS, message=f"Unknown tool: {name}")
        args = arguments or {}
        problem = best_match(self.validators[name].iter_errors(args))
        if problem is not None:
            where = "/".join(str(p) for p in problem.absolute_path)
            return invalid(f"invalid arguments for {name}{f' at {where}' if where else ''}: {problem.message}")
        try:
            response = await handler(s.wire_args(args))
        except e.CyclesError as err:
            payload = error_payload(err)
            return error_result(payload, error_hints(name, payload))
        except ValueError as err:  # InvalidArguments, or a body the wire models reject
            return invalid(str(err))
        except Exception as err:  # noqa: BLE001 - a bug must reach the agent as a tool error, not a dead session
            log.exception("%s failed", name)
            return error_result({"error": "INTERNAL_ERROR", "message": f"{type(err).__name__}: {err}"})
        return ok_result(s.to_tool(response))


# ---------------------------------------------------------------- resources and prompts

DOCS = {
    "cycles://docs/quickstart": ("quickstart", "Cycles quickstart", "Reserve, check, commit or release.", QUICKSTART),
    "cycles://docs/patterns": ("patterns", "Cycles integration patterns", "How to budget agents well.", PATTERNS),
}
BALANCES = re.compile(r"^cycles://balances/([^/?#]+)$")
RESERVATION = re.compile(r"^cycles://reservations/([^/?#]+)$")


def build_server(settings: Settings, backend: Any) -> Server:
    tools = CyclesTools(settings, backend)

    async def list_tools(ctx: Any, params: Any) -> t.ListToolsResult:
        return t.ListToolsResult(tools=tool_list())

    async def call_tool(ctx: Any, params: t.CallToolRequestParams) -> t.CallToolResult:
        return await tools.call(params.name, params.arguments)

    async def list_resources(ctx: Any, params: Any) -> t.ListResourcesResult:
        return t.ListResourcesResult(resources=[
            t.Resource(uri=uri, name=name, title=title, description=desc, mime_type="text/markdown")
            for uri, (name, title, desc, _) in DOCS.items()])

    async def list_templates(ctx: Any, params: Any) -> t.ListResourceTemplatesResult:
        return t.ListResourceTemplatesResult(resource_templates=[
            t.ResourceTemplate(name="balances", title="Tenant balances", uri_template="cycles://balances/{tenant}",
                               description="Every budget balance of a tenant (with children).",
                               mime_type="application/json"),
            t.ResourceTemplate(name="reservation", title="Reservation",
                               uri_template="cycles://reservations/{reservation_id}",
                               description="One reservation by id.", mime_type="application/json"),
        ])

    async def read_resource(ctx: Any, params: t.ReadResourceRequestParams) -> t.ReadResourceResult:
        uri = str(params.uri)
        if uri in DOCS:
            return t.ReadResourceResult(contents=[t.TextResourceContents(uri=uri, mime_type="text/markdown",
                                                                         text=DOCS[uri][3])])
        try:
            if match := BALANCES.match(uri):
                data = await backend.get_balances(tenant=match.group(1), include_children=True, limit=200)
            elif match := RESERVATION.match(uri):
                data = await backend.get_reservation(match.group(1))
            else:
                raise MCPError(code=RESOURCE_NOT_FOUND, message=f"Resource not found: {uri}")
        except e.CyclesError as err:
            payload = error_payload(err)
            code = RESOURCE_NOT_FOUND if payload.get("error") == "NOT_FOUND" else t.INTERNAL_ERROR
            raise MCPError(code=code, message=f"{payload['error']}: {payload['message']}", data=payload) from None
        except ValueError as err:
            raise MCPError(code=t.INVALID_PARAMS, message=str(err)) from None
        return t.ReadResourceResult(contents=[t.TextResourceContents(
            uri=uri, mime_type="application/json", text=json.dumps(s.to_tool(data), indent=2))])

    async def list_prompts(ctx: Any, params: Any) -> t.ListPromptsResult:
        return t.ListPromptsResult(prompts=[
            t.Prompt(name=name, description=spec["description"],
                     arguments=[t.PromptArgument(name=a, description=d, required=r) for a, d, r in spec["arguments"]])
            for name, spec in PROMPTS.items()])

    async def get_prompt(ctx: Any, params: t.GetPromptRequestParams) -> t.GetPromptResult:
        spec = PROMPTS.get(params.name)
        if spec is None:
            raise MCPError(code=t.INVALID_PARAMS, message=f"Unknown prompt: {params.name}")
        args = dict(params.arguments or {})
        missing = [a for a, _, required in spec["arguments"] if required and not args.get(a)]
        if missing:
            raise MCPError(code=t.INVALID_PARAMS, message=f"Missing required argument(s): {', '.join(missing)}")
        return t.GetPromptResult(description=spec["description"], messages=[
            t.PromptMessage(role="user", content=text(prompt_text(params.name, args)))])

    return Server(SERVER_NAME, version=__version__, title="Cycles", instructions=INSTRUCTIONS,
                  on_list_tools=list_tools, on_call_tool=call_tool, on_list_resources=list_resources,
                  on_list_resource_templates=list_templates, on_read_resource=read_resource,
                  on_list_prompts=list_prompts, on_get_prompt=get_prompt)


def make_backend(settings: Settings) -> Any:
    """The SDK client (or the mock). The MCP server is a thin pass-through: no journal, no heartbeat."""
    if settings.mock:
        from .mock import MockBackend

        return MockBackend()
    from ..client import AsyncCyclesClient, CyclesConfig

    config = CyclesConfig.from_env(base_url=settings.base_url, api_key=settings.api_key, journal_enabled=False,
                                   heartbeat_enabled=False, user_agent=f"cycles-mcp/{__version__}")
    return AsyncCyclesClient(config)
