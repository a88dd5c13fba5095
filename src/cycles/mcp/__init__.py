"""Cycles for MCP: the MCP server (`cycles mcp`) and the budget gate (`cycles mcp gate`). See docs/mcp.md.

Modules: `server` (tools, resources, prompts), `schemas` (input/output schemas, camelCase mapping),
`gate` (the budget gate), `mock` (CYCLES_MOCK), `run` (stdio and Streamable HTTP), `cli` (Typer).
This package imports the `mcp` SDK only when a server is built, so `cycles serve` does not pay for it.
"""
