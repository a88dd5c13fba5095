"""A tiny upstream MCP server (stdio) for the gate tests. Every tools/call it receives is appended as a
JSON line to the file named by UPSTREAM_CALLS, so a test can prove a blocked call never arrived.

Tools: `echo` (returns its text, with structured content), `send_email` (pretends to send),
`fail` (answers an isError result), `strict` (raises a protocol error on bad arguments).
"""

from __future__ import annotations

import json
import os

import anyio
import mcp.types as t
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError

TOOLS = [
    t.Tool(name="echo", title="Echo", description="Echo the text back.",
           input_schema={"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
           output_schema={"type": "object", "properties": {"echo": {"type": "string"}}, "required": ["echo"],
                          "additionalProperties": False}),
    t.Tool(name="send_email", title="Send email", description="Send an email (pretend).",
           input_schema={"type": "object", "properties": {"to": {"type": "string"}, "body": {"type": "string"}},
                         "required": ["to"]}),
    t.Tool(name="fail", description="Always fails with a tool error.", input_schema={"type": "object"}),
    t.Tool(name="strict", description="Rejects calls without 'n' as a protocol error.",
           input_schema={"type": "object", "properties": {"n": {"type": "integer"}}}),
]


def record(name: str, arguments: dict | None) -> None:
    with open(os.environ["UPSTREAM_CALLS"], "a") as f:
        f.write(json.dumps({"tool": name, "arguments": arguments or {}}) + "\n")


async def list_tools(ctx, params) -> t.ListToolsResult:
    return t.ListToolsResult(tools=TOOLS)


async def call_tool(ctx, params: t.CallToolRequestParams) -> t.CallToolResult:
    args = params.arguments or {}
    record(params.name, args)
    if params.name == "echo":
        return t.CallToolResult(content=[t.TextContent(type="text", text=args["text"])],
                                structured_content={"echo": args["text"]})
    if params.name == "send_email":
        return t.CallToolResult(content=[t.TextContent(type="text", text=f"sent to {args.get('to')}")])
    if params.name == "fail":
        return t.CallToolResult(content=[t.TextContent(type="text", text="upstream exploded: disk full")],
                                is_error=True)
    if params.name == "strict":
        if "n" not in args:
            raise MCPError(code=t.INVALID_PARAMS, message="strict needs n")
        return t.CallToolResult(content=[t.TextContent(type="text", text=str(args["n"]))])
    raise MCPError(code=t.INVALID_PARAMS, message=f"Unknown tool: {params.name}")


server = Server("fixture-upstream", version="1.0", instructions="A test upstream.",
                on_list_tools=list_tools, on_call_tool=call_tool)


async def main() -> None:
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


if __name__ == "__main__":
    anyio.run(main)
