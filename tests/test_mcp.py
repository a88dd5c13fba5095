"""The MCP server (`cycles mcp`) and the gate (`cycles mcp gate`), driven by the Python `mcp` client over
stdio against a real `cycles serve` (the session `server` fixture).

Every structuredContent is validated against the tool's outputSchema with jsonschema, and every object
in those schemas must say `additionalProperties: false` (the strictness that broke the published
TypeScript server on `remainingTtlMs`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
import httpx
import pytest
from jsonschema import Draft202012Validator
from mcp import Client, MCPError, StdioServerParameters

from support import USD, Tenant, cycles_bin, free_port

NINE = ["cycles_reserve", "cycles_commit", "cycles_release", "cycles_extend", "cycles_decide",
        "cycles_check_balance", "cycles_list_reservations", "cycles_get_reservation", "cycles_create_event"]
READ_ONLY = {"cycles_check_balance", "cycles_list_reservations", "cycles_get_reservation"}
UPSTREAM = Path(__file__).parent / "mcp_fixtures" / "upstream.py"
ACTION = {"kind": "llm.completion", "name": "gpt-test"}


def usd(amount: int) -> dict[str, Any]:
    return {"unit": USD, "amount": amount}


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CYCLES_", "MCP_", "NODE_ENV"))}
    env.update(extra)
    return env


def tenant_env(tenant: Tenant, **extra: str) -> dict[str, str]:
    return base_env(CYCLES_BASE_URL=tenant.server.base_url, CYCLES_API_KEY=tenant.key,
                    CYCLES_TENANT=tenant.tenant_id, **extra)


def assert_strict(schema: Any, where: str = "$") -> None:
    """Every object schema that declares properties forbids undeclared ones."""
    if isinstance(schema, dict):
        if "properties" in schema:
            assert schema.get("additionalProperties") is False, f"{where} allows undeclared properties"
        for key, value in schema.items():
            assert_strict(value, f"{where}.{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            assert_strict(value, f"{where}[{i}]")


class Session:
    """An MCP client session that validates every successful structuredContent strictly."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.tools: dict[str, Any] = {}

    async def load(self) -> None:
        self.tools = {tool.name: tool for tool in (await self.client.list_tools()).tools}

    async def call(self, name: str, args: dict[str, Any]) -> Any:
        result = await self.client.call_tool(name, args)
        schema = self.tools[name].output_schema
        if not result.is_error and schema is not None:
            Draft202012Validator.check_schema(schema)
            Draft202012Validator(schema).validate(result.structured_content)
        return result

    async def ok(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        result = await self.call(name, args)
        assert not result.is_error, result.content[0].text
        assert json.loads(result.content[0].text) == result.structured_content
        return result.structured_content

    async def err(self, name: str, args: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        result = await self.call(name, args)
        assert result.is_error, result
        return json.loads(result.content[0].text), [c.text for c in result.content[1:]]


@asynccontextmanager
async def session(args: list[str], env: dict[str, str], mode: str = "auto") -> AsyncIterator[Session]:
    params = StdioServerParameters(command=cycles_bin(), args=args, env=env)
    async with Client(params, mode=mode) as client:
        s = Session(client)
        await s.load()
        yield s


def hints(result: Any) -> list[str]:
    return [c.text for c in result.content[1:]]


# ---------------------------------------------------------------- cycles mcp


def test_tools_are_listed_with_titles_annotations_and_strict_schemas(tenant: Tenant) -> None:
    async def main() -> None:
        async with session(["mcp"], tenant_env(tenant), mode="legacy") as s:  # the handshake era, as Claude Desktop
            assert s.client.server_info.name == "cycles-mcp-server"
            assert list(s.tools) == NINE
            for name, tool in s.tools.items():
                assert tool.title and tool.description and tool.annotations is not None
                assert tool.annotations.open_world_hint is False
                assert tool.annotations.read_only_hint is (name in READ_ONLY)
                if name not in READ_ONLY:
                    assert tool.annotations.idempotent_hint is True and tool.annotations.destructive_hint is False
                    assert "idempotencyKey" in tool.input_schema["required"]
                Draft202012Validator.check_schema(tool.output_schema)
                assert_strict(tool.output_schema)
            assert "remainingTtlMs" in s.tools["cycles_reserve"].output_schema["properties"]
            assert "remainingTtlMs" in s.tools["cycles_extend"].output_schema["properties"]

    anyio.run(main)


def test_every_tool_round_trips_against_the_server(tenant: Tenant) -> None:
    tenant.budget(amount=10_000_000)

    async def main() -> None:
        async with session(["mcp"], tenant_env(tenant)) as s:
            t0 = int(time.time() * 1000)
            rsv = await s.ok("cycles_reserve", {"idempotencyKey": "r1", "action": ACTION, "estimate": usd(400_000),
                                                "metadata": {"run_id": "x-1"}})
            assert rsv["decision"] == "ALLOW" and rsv["scopePath"] == f"tenant:{tenant.tenant_id}"
            # no ttlMs given → nothing sent → the server default (60 s) applies
            assert 55_000 <= rsv["expiresAtMs"] - t0 <= 65_000 and 0 < rsv["remainingTtlMs"] <= 60_000
            rid = rsv["reservationId"]
            again = await s.ok("cycles_reserve", {"idempotencyKey": "r1", "action": ACTION, "estimate": usd(400_000),
                                                  "metadata": {"run_id": "x-1"}})
            assert again["reservationId"] == rid  # same key: a replay, not a second hold

            ext = await s.ok("cycles_extend", {"reservationId": rid, "idempotencyKey": "e1", "extendByMs": 30_000})
            assert ext["status"] == "ACTIVE" and ext["expiresAtMs"] > rsv["expiresAtMs"] and "remainingTtlMs" in ext

            listed = await s.ok("cycles_list_reservations", {"status": "ACTIVE"})
            assert [r["reservationId"] for r in listed["reservations"]] == [rid]
            by_key = await s.ok("cycles_list_reservations", {"idempotencyKey": "r1"})
            assert [r["reservationId"] for r in by_key["reservations"]] == [rid]

            got = await s.ok("cycles_get_reservation", {"reservationId": rid})
            assert got["status"] == "ACTIVE" and got["metadata"] == {"run_id": "x-1"}

            com = await s.ok("cycles_commit", {"reservationId": rid, "idempotencyKey": "c1", "actual": usd(300_000),
                                               "metrics": {"tokensInput": 10, "tokensOutput": 20, "latencyMs": 5,
                                                           "custom": {"some_key": 1}}})
            assert com["status"] == "COMMITTED" and com["charged"] == usd(300_000)
            assert com["released"] == usd(100_000)
            got = await s.ok("cycles_get_reservation", {"reservationId": rid})
            assert got["status"] == "COMMITTED" and got["committed"] == usd(300_000) and "finalizedAtMs" in got

            r2 = await s.ok("cycles_reserve", {"idempotencyKey": "r2", "action": ACTION, "estimate": usd(100_000),
                                               "subject": {"workspace": "ws1", "dimensions": {"Team_Name": "a"}},
                                               "ttlMs": 5_000, "overagePolicy": "REJECT"})
            assert r2["scopePath"] == f"tenant:{tenant.tenant_id}/workspace:ws1"  # the default tenant merged in
            rel = await s.ok("cycles_release", {"reservationId": r2["reservationId"], "idempotencyKey": "l1",
                                                "reason": "not needed"})
            assert rel["status"] == "RELEASED" and rel["released"] == usd(100_000)

            dec = await s.ok("cycles_decide", {"idempotencyKey": "d1", "action": ACTION, "estimate": usd(1)})
            assert dec["decision"] == "ALLOW"

            evt = await s.ok("cycles_create_event", {"idempotencyKey": "v1", "action": ACTION, "actual": usd(50_000),
                                                     "clientTimeMs": t0})
            assert evt["status"] == "APPLIED" and evt["eventId"]

            bal = await s.ok("cycles_check_balance", {})  # the tenant comes from CYCLES_TENANT
            tenant_bal = next(b for b in bal["balances"] if b["scope"] == f"tenant:{tenant.tenant_id}")
            assert tenant_bal["spent"] == usd(350_000) and tenant_bal["reserved"] == usd(0)
            assert tenant_bal["remaining"] == usd(10_000_000 - 350_000)

            dry = await s.ok("cycles_reserve", {"idempotencyKey": "dry", "action": ACTION, "estimate": usd(5),
                                                "dryRun": True})
            assert dry["decision"] == "ALLOW" and "reservationId" not in dry

    anyio.run(main)
    assert tenant.balance()["spent"]["amount"] == 350_000


def test_denied_reserve_is_an_error_with_the_protocol_code_and_a_hint(tenant: Tenant) -> None:
    tenant.budget(amount=1_000)

    async def main() -> None:
        async with session(["mcp"], tenant_env(tenant)) as s:
            body, lines = await s.err("cycles_reserve", {"idempotencyKey": "big", "action": ACTION,
                                                         "estimate": usd(5_000)})
            assert body["error"] == "BUDGET_EXCEEDED" and body["httpStatus"] == 409 and body["requestId"]
            assert body["message"]
            assert len(lines) == 1 and lines[0].startswith("HINT: budget DENIED (BUDGET_EXCEEDED)")

            dec = await s.call("cycles_decide", {"idempotencyKey": "d", "action": ACTION, "estimate": usd(5_000)})
            assert not dec.is_error and dec.structured_content["decision"] == "DENY"
            assert any(h.startswith("HINT: budget DENIED") for h in hints(dec))
            dry = await s.call("cycles_reserve", {"idempotencyKey": "dry", "action": ACTION, "estimate": usd(5_000),
                                                  "dryRun": True})
            assert not dry.is_error and dry.structured_content["decision"] == "DENY"
            assert any(h.startswith("HINT: budget DENIED") for h in hints(dry))
            assert all(not h.startswith("HINT") for h in json.dumps(dry.structured_content).splitlines())

            low = await s.call("cycles_reserve", {"idempotencyKey": "low", "action": ACTION, "estimate": usd(900)})
            assert not low.is_error
            assert any(f"~10% remaining on tenant:{tenant.tenant_id}" in h for h in hints(low)), hints(low)
            assert "HINT" not in json.dumps(low.structured_content)

    anyio.run(main)
    assert tenant.balance()["spent"]["amount"] == 0


def test_errors_are_is_error_results(tenant: Tenant) -> None:
    tenant.budget(amount=1_000_000)

    async def main() -> None:
        async with session(["mcp"], tenant_env(tenant)) as s:
            body, _ = await s.err("cycles_get_reservation", {"reservationId": "rsv_nope"})
            assert body["error"] == "NOT_FOUND" and body["httpStatus"] == 404 and body["requestId"]

            body, _ = await s.err("cycles_reserve", {"action": ACTION, "estimate": usd(1)})  # no idempotencyKey
            assert body["error"] == "INVALID_REQUEST" and "idempotencyKey" in body["message"]
            body, _ = await s.err("cycles_reserve", {"idempotencyKey": "x", "action": ACTION,
                                                     "estimate": {"unit": USD, "amount": 1.5}})
            assert body["error"] == "INVALID_REQUEST" and "estimate/amount" in body["message"]
            body, _ = await s.err("cycles_reserve", {"idempotencyKey": "x", "action": ACTION, "estimate": usd(1),
                                                     "subject": {"tenant": "someone-else"}})
            assert body["error"] == "FORBIDDEN" and body["httpStatus"] == 403

            rsv = await s.ok("cycles_reserve", {"idempotencyKey": "u", "action": ACTION, "estimate": usd(10)})
            body, _ = await s.err("cycles_commit", {"reservationId": rsv["reservationId"], "idempotencyKey": "uc",
                                                    "actual": {"unit": "TOKENS", "amount": 1}})
            assert body["error"] == "UNIT_MISMATCH"
            await s.ok("cycles_release", {"reservationId": rsv["reservationId"], "idempotencyKey": "ur"})
            body, _ = await s.err("cycles_commit", {"reservationId": rsv["reservationId"], "idempotencyKey": "uc2",
                                                    "actual": usd(1)})
            assert body["error"] == "RESERVATION_FINALIZED" and body["httpStatus"] == 409

            with pytest.raises(MCPError) as exc:
                await s.client.call_tool("cycles_nope", {})
            assert exc.value.code == -32602

    anyio.run(main)


def test_subject_is_required_without_defaults(tenant: Tenant) -> None:
    env = tenant_env(tenant)
    del env["CYCLES_TENANT"]

    async def main() -> None:
        async with session(["mcp"], env) as s:
            body, _ = await s.err("cycles_reserve", {"idempotencyKey": "x", "action": ACTION, "estimate": usd(1)})
            assert body["error"] == "INVALID_REQUEST" and "CYCLES_TENANT" in body["message"]
            body, _ = await s.err("cycles_check_balance", {})
            assert body["error"] == "INVALID_REQUEST"

    anyio.run(main)


def test_resources_and_prompts(tenant: Tenant) -> None:
    tenant.budget(amount=1_000_000)

    async def main() -> None:
        async with session(["mcp"], tenant_env(tenant)) as s:
            c = s.client
            uris = {str(r.uri) for r in (await c.list_resources()).resources}
            assert uris == {"cycles://docs/quickstart", "cycles://docs/patterns"}
            templates = {t.uri_template for t in (await c.list_resource_templates()).resource_templates}
            assert templates == {"cycles://balances/{tenant}", "cycles://reservations/{reservation_id}"}
            doc = (await c.read_resource("cycles://docs/quickstart")).contents[0]
            assert "cycles_reserve" in doc.text

            data = json.loads((await c.read_resource(f"cycles://balances/{tenant.tenant_id}")).contents[0].text)
            Draft202012Validator(s.tools["cycles_check_balance"].output_schema).validate(data)
            assert data["balances"][0]["allocated"] == usd(1_000_000)
            rsv = await s.ok("cycles_reserve", {"idempotencyKey": "res", "action": ACTION, "estimate": usd(7)})
            data = json.loads((await c.read_resource(f"cycles://reservations/{rsv['reservationId']}")).contents[0].text)
            assert data["reservationId"] == rsv["reservationId"] and data["status"] == "ACTIVE"
            with pytest.raises(MCPError):
                await c.read_resource("cycles://reservations/rsv_missing")

            prompts = {p.name: p for p in (await c.list_prompts()).prompts}
            assert set(prompts) == {"integrate_cycles", "diagnose_overrun", "design_budget_strategy"}
            assert [a.name for a in prompts["design_budget_strategy"].arguments if a.required] == ["description"]
            got = await c.get_prompt("diagnose_overrun", {"reservation_id": rsv["reservationId"]})
            assert rsv["reservationId"] in got.messages[0].content.text
            got = await c.get_prompt("integrate_cycles", {})
            assert "python" in got.messages[0].content.text
            with pytest.raises(MCPError):
                await c.get_prompt("design_budget_strategy", {})

    anyio.run(main)


def test_mock_mode_needs_no_server() -> None:
    env = base_env(CYCLES_MOCK="true", CYCLES_DEFAULT_TENANT="acme")

    async def main() -> None:
        async with session(["mcp"], env) as s:
            rsv = await s.ok("cycles_reserve", {"idempotencyKey": "m", "action": ACTION, "estimate": usd(10)})
            assert rsv["decision"] == "ALLOW" and rsv["reservationId"].startswith("mock_rsv_")
            rid = rsv["reservationId"]
            await s.ok("cycles_extend", {"reservationId": rid, "idempotencyKey": "e", "extendByMs": 1000})
            assert (await s.ok("cycles_get_reservation", {"reservationId": rid}))["status"] == "ACTIVE"
            assert len((await s.ok("cycles_list_reservations", {"status": "ACTIVE"}))["reservations"]) == 1
            await s.ok("cycles_commit", {"reservationId": rid, "idempotencyKey": "c", "actual": usd(5)})
            r2 = await s.ok("cycles_reserve", {"idempotencyKey": "m2", "action": ACTION, "estimate": usd(10)})
            await s.ok("cycles_release", {"reservationId": r2["reservationId"], "idempotencyKey": "r"})
            assert (await s.ok("cycles_decide", {"idempotencyKey": "d", "action": ACTION,
                                                 "estimate": usd(1)}))["decision"] == "ALLOW"
            evt = await s.ok("cycles_create_event", {"idempotencyKey": "v", "action": ACTION, "actual": usd(1)})
            assert evt["eventId"].startswith("mock_evt_")
            assert (await s.ok("cycles_check_balance", {}))["balances"][0]["scope"] == "tenant:acme"
            body, _ = await s.err("cycles_get_reservation", {"reservationId": "nope"})
            assert body["error"] == "NOT_FOUND"

    anyio.run(main)


def _cli(*runs: tuple[list[str], dict[str, str]]) -> list[tuple[int, str]]:
    """Run `cycles ARGS` processes concurrently (each must exit by itself); (exit code, stderr) of each."""
    procs = [subprocess.Popen([cycles_bin(), *args], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for args, env in runs]
    out = []
    for proc in procs:
        _, err = proc.communicate(timeout=30)
        out.append((proc.returncode, err))
    return out


def test_startup_refusals() -> None:
    mock = base_env(CYCLES_MOCK="true")
    prod, node_prod, missing, bad, public, blank = _cli(
        (["mcp"], base_env(CYCLES_MOCK="true", CYCLES_ENV="production")),
        (["mcp"], base_env(CYCLES_MOCK="true", NODE_ENV="production")),
        (["mcp"], base_env()),
        (["mcp"], base_env(CYCLES_MOCK="true", CYCLES_DEFAULT_TENANT="has space")),
        (["mcp", "--transport", "http", "--host", "0.0.0.0"], mock),
        (["mcp", "--transport", "http", "--auth-token", "  "], mock),
    )
    assert prod[0] == 2 and "refused in production" in prod[1]
    assert node_prod[0] == 2 and "refused in production" in node_prod[1]
    assert missing[0] == 2 and "CYCLES_BASE_URL" in missing[1]
    assert bad[0] == 2 and "CYCLES_DEFAULT_TENANT" in bad[1]  # the old name is still read, and named
    assert "CYCLES_DEFAULT_TENANT is deprecated; set CYCLES_TENANT" in bad[1]
    assert public[0] == 2 and "bearer token is required" in public[1]
    assert blank[0] == 2 and "blank" in blank[1]


def test_http_transport_requires_the_bearer_token() -> None:
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    port = free_port()
    env = base_env(CYCLES_MOCK="true", CYCLES_DEFAULT_TENANT="acme", MCP_HTTP_AUTH_TOKEN="s3cret-token")
    proc = subprocess.Popen([cycles_bin(), "mcp", "--transport", "http", "--port", str(port)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                health = httpx.get(base + "/health", timeout=1)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
                time.sleep(0.1)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        denied = httpx.post(base + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                            headers={"Authorization": "Bearer wrong"})
        assert denied.status_code == 401 and denied.headers["www-authenticate"].startswith("Bearer")

        async def main() -> None:
            async with httpx2.AsyncClient(headers={"Authorization": "Bearer s3cret-token"}) as http:
                async with Client(streamable_http_client(base + "/mcp", http_client=http)) as c:
                    names = [t.name for t in (await c.list_tools()).tools]
                    assert names == NINE
                    r = await c.call_tool("cycles_reserve", {"idempotencyKey": "h", "action": ACTION,
                                                             "estimate": usd(3)})
                    assert not r.is_error and r.structured_content["reservationId"].startswith("mock_rsv_")

        anyio.run(main)
    finally:
        proc.terminate()
        proc.wait(10)


def test_hints_for_caps_and_low_budget() -> None:
    from cycles.mcp.server import budget_hints

    caps = budget_hints({"decision": "ALLOW_WITH_CAPS", "caps": {"maxTokens": 100}})
    assert caps == ["HINT: allowed WITH CAPS — respect these limits while executing: maxTokens=100."]
    low = budget_hints({"balances": [{"scopePath": "tenant:a", "remaining": usd(14), "allocated": usd(100)},
                                     {"scopePath": "tenant:a/app:b", "remaining": usd(15), "allocated": usd(100)},
                                     {"scopePath": "tenant:c", "remaining": usd(-5), "allocated": usd(100)}]})
    assert [h.split(" — ")[1].split(".")[0] for h in low] == ["~14% remaining on tenant:a",
                                                               "~0% remaining on tenant:c"]


# ---------------------------------------------------------------- cycles mcp gate


def gate_env(tenant: Tenant, tmp_path: Path) -> dict[str, str]:
    return tenant_env(tenant, UPSTREAM_CALLS=str(tmp_path / "calls.jsonl"),
                      CYCLES_JOURNAL_DIR=str(tmp_path / "journal"))


def upstream_calls(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def gate_args(tmp_path: Path, config: str) -> list[str]:
    (tmp_path / "gate.toml").write_text(config)
    return ["mcp", "gate", "--config", str(tmp_path / "gate.toml"), "--", sys.executable, str(UPSTREAM)]


GATE_CONFIG = """
[defaults]
estimate = 1000
unit = "USD_MICROCENTS"

[tools.send_email]
estimate = 5000
action_kind = "email.send"
"""


def test_gate_blocks_a_zero_budget_tool_before_the_upstream(tenant: Tenant, tmp_path: Path) -> None:
    tenant.budget(amount=1_000_000)
    tenant.budget("toolset:send_email", amount=0)

    async def main() -> None:
        async with session(gate_args(tmp_path, GATE_CONFIG), gate_env(tenant, tmp_path)) as s:
            assert s.client.server_info.name == "cycles-mcp-gate"
            assert list(s.tools) == ["echo", "send_email", "fail", "strict"]
            assert s.tools["echo"].output_schema["additionalProperties"] is False  # forwarded unchanged

            blocked = await s.call("send_email", {"to": "ceo@example.com", "body": "hi"})
            assert blocked.is_error
            body = json.loads(blocked.content[0].text)
            assert body["error"] == "BUDGET_EXCEEDED" and body["httpStatus"] == 409
            assert body["tool"] == "send_email" and body["blockedBy"] == "cycles"
            assert any("was NOT run" in h for h in hints(blocked))

            echoed = await s.call("echo", {"text": "hello"})
            assert not echoed.is_error and echoed.structured_content == {"echo": "hello"}
            assert echoed.content[0].text == "hello"

    anyio.run(main)
    assert [c["tool"] for c in upstream_calls(tmp_path)] == ["echo"]  # send_email never arrived
    assert tenant.balance()["spent"]["amount"] == 1000 and tenant.balance()["reserved"]["amount"] == 0
    assert tenant.balance("toolset:send_email")["spent"]["amount"] == 0


def test_gate_passes_upstream_errors_through_and_releases(tenant: Tenant, tmp_path: Path) -> None:
    tenant.budget(amount=1_000_000)

    async def main() -> None:
        async with session(gate_args(tmp_path, GATE_CONFIG), gate_env(tenant, tmp_path)) as s:
            failed = await s.call("fail", {})
            assert failed.is_error and [c.text for c in failed.content] == ["upstream exploded: disk full"]
            with pytest.raises(MCPError) as exc:
                await s.client.call_tool("strict", {})
            assert exc.value.code == -32602 and "strict needs n" in exc.value.message
            ok = await s.call("strict", {"n": 7})
            assert not ok.is_error and ok.content[0].text == "7"
            sent = await s.call("send_email", {"to": "a@example.com"})
            assert not sent.is_error and sent.content[0].text == "sent to a@example.com"

    anyio.run(main)
    assert [c["tool"] for c in upstream_calls(tmp_path)] == ["fail", "strict", "strict", "send_email"]
    bal = tenant.balance()
    assert bal["spent"]["amount"] == 1000 + 5000 and bal["reserved"]["amount"] == 0  # failures were released
    with tenant.client() as c:
        r = c.get("/v1/reservations", params={"status": "RELEASED"})
    assert len(r.json()["reservations"]) == 2


def test_gate_config_errors(tmp_path: Path) -> None:
    env = base_env(CYCLES_MOCK="true", CYCLES_DEFAULT_TENANT="acme")
    (tmp_path / "bad.toml").write_text("[defaults]\nestimate = -1\n")
    (tmp_path / "typo.toml").write_text("[tools.x]\nestimat = 1\n")
    bad, typo, no_tenant = _cli(
        (["mcp", "gate", "--config", str(tmp_path / "bad.toml"), "--", "true"], env),
        (["mcp", "gate", "--config", str(tmp_path / "typo.toml"), "--", "true"], env),
        (["mcp", "gate", "--", "true"], base_env(CYCLES_BASE_URL="http://127.0.0.1:1", CYCLES_API_KEY="k")),
    )
    assert bad[0] == 2 and "estimate" in bad[1]
    assert typo[0] == 2 and "estimat" in typo[1]
    assert no_tenant[0] == 2 and "CYCLES_TENANT" in no_tenant[1]


def test_gate_config_file_shapes(tmp_path: Path) -> None:
    from cycles.mcp.gate import GateConfig, toolset_for

    (tmp_path / "g.json").write_text(json.dumps({"defaults": {"unit": "TOKENS", "estimate": 3},
                                                 "tools": {"a": {"estimate": 9, "toolset": "grp"}}}))
    cfg = GateConfig.load(tmp_path / "g.json")
    assert cfg.for_tool("a").estimate == 9 and cfg.for_tool("a").unit == "TOKENS" and cfg.for_tool("a").toolset == "grp"
    assert cfg.for_tool("other").estimate == 3
    assert GateConfig.load(None).for_tool("x").unit == "USD_MICROCENTS"
    assert toolset_for("github/create issue") == "github_create_issue"
