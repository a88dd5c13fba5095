"""docs/integrations.md, run as written: every python block of a section, in-process, with the Cycles client
and the providers' clients configured from the environment as the doc says (CYCLES_*, OPENAI_BASE_URL,
ANTHROPIC_BASE_URL pointing at the fake provider), then what it should have reserved and committed."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from integ_helpers import ONE_STORE, reservations

from cycles.client import CyclesConfig, set_default_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def sections() -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for part in re.split(r"^## ", DOC.read_text(), flags=re.M)[1:]:
        title, _, body = part.partition("\n")
        out[title.strip()] = FENCE.findall(body)
    return out


def python_blocks(title: str) -> list[str]:
    return [code for lang, code in sections()[title] if lang == "python"]


@pytest.fixture
def env(funded, fake, monkeypatch, tmp_path):
    for k, v in {"CYCLES_BASE_URL": funded.server.base_url, "CYCLES_API_KEY": funded.key,
                 "CYCLES_TENANT": funded.tenant_id, "CYCLES_JOURNAL_DIR": str(tmp_path / "journal"),
                 "OPENAI_BASE_URL": fake.base_url + "/v1", "OPENAI_API_KEY": "sk-test",
                 "OPENAI_API_BASE": fake.base_url + "/v1",  # LlamaIndex's OpenAI LLM reads this one
                 "CREWAI_DISABLE_TELEMETRY": "true", "OTEL_SDK_DISABLED": "true", "CREWAI_TRACING_ENABLED": "false",
                 "ANTHROPIC_BASE_URL": fake.base_url, "ANTHROPIC_API_KEY": "sk-ant-test",
                 "OPENAI_AGENTS_DISABLE_TRACING": "1", "OPENAI_MAX_RETRIES": "0"}.items():
        monkeypatch.setenv(k, v)
    set_default_config(CyclesConfig.from_env())  # the SDK's default clients, from this environment
    yield funded
    set_default_config(CyclesConfig.from_env())


def run(code: str) -> dict:
    ns: dict = {"__name__": "docs_block"}
    exec(compile(code, str(DOC), "exec"), ns)  # noqa: S102 - the documentation's own code
    return ns


def committed(tenant) -> list[tuple[str, str, int]]:
    return sorted((r["action"]["kind"], r["action"]["name"], r["status"] == "COMMITTED" and r["committed"]["amount"])
                  for r in reservations(tenant))


def test_every_integration_has_a_block() -> None:
    have = {t for t, blocks in sections().items() if any(lang == "python" for lang, _ in blocks)}
    assert {"OpenAI", "Anthropic", "LangChain and LangGraph", "OpenAI Agents SDK", "Pydantic AI", "AutoGen",
            "LlamaIndex", "CrewAI", "Web frameworks", "Pricing (`cycles.pricing`)"} <= have


def _needs(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module}: installed by .ci/run (--no-deps)")


@ONE_STORE
@pytest.mark.parametrize("title, names", [
    ("OpenAI", ["openai:gpt-4o", "openai:gpt-4o-mini", "openai:gpt-4o-mini"]),
    ("Anthropic", ["anthropic:claude-sonnet-4-5", "anthropic:claude-sonnet-4-5"]),
    ("LangChain and LangGraph", ["openai:gpt-4o-mini"]),
    ("OpenAI Agents SDK", ["openai:gpt-4.1-mini"]),
    ("Pydantic AI", ["openai:gpt-4o-mini"]),
    ("AutoGen", ["openai:gpt-4o-mini"]),
    pytest.param("LlamaIndex", ["openai:gpt-4o-mini"], marks=_needs("llama_index.llms.openai")),
    pytest.param("CrewAI", ["openai:gpt-4o-mini"], marks=_needs("crewai")),
])
def test_block_runs_and_commits_priced_calls(title, names, env, fake, capsys) -> None:
    [code] = python_blocks(title)
    run(code)
    found = committed(env)
    assert sorted(n for _, n, _ in found) == sorted(names), found
    assert all(kind == "llm.completion" and amount > 0 for kind, _, amount in found), found
    assert fake.count() == len(names)
    assert capsys.readouterr().out.strip()


@ONE_STORE
def test_web_blocks(env, fake) -> None:
    from starlette.testclient import TestClient

    asgi, flask_block, django_settings = python_blocks("Web frameworks")
    with TestClient(run(asgi)["app"]) as http:
        r = http.get("/ask", params={"q": "hi"}, headers={"X-Cycles-Tenant": env.tenant_id})
    assert r.status_code == 200 and r.json()["answer"]
    app = run(flask_block)["app"]
    r = app.test_client().get("/ask?q=hi", headers={"X-Tenant": env.tenant_id})
    assert r.status_code == 200 and r.json["answer"]
    assert [n for _, n, _ in committed(env)] == ["openai:gpt-4o-mini"] * 2
    settings = run(django_settings)
    from django.utils.module_loading import import_string

    from cycles.integrations.web import WebOptions

    assert import_string(settings["MIDDLEWARE"][-1]).__name__ == "CyclesMiddleware"
    WebOptions(**settings["CYCLES_MIDDLEWARE"])


def test_pricing_block_and_table(tmp_path, capsys) -> None:
    [code] = python_blocks("Pricing (`cycles.pricing`)")
    run(code)
    estimate, actual, source = capsys.readouterr().out.split()
    # 2,000 x $3 + 500 x $15 per million tokens = $0.0135; 1,800 x $0.30 + 120 x $1.20 = $0.000684
    assert (int(estimate), int(actual), source) == (1_350_000, 68_400, "genai-prices")
    [yaml_text] = [code for lang, code in sections()["Pricing (`cycles.pricing`)"] if lang == "yaml"]
    (tmp_path / "prices.yaml").write_text(yaml_text)
    from cycles.pricing import Pricer, PriceTable

    pricer = Pricer(table=PriceTable.from_file(tmp_path / "prices.yaml"))
    assert pricer.source("ft:gpt-4o-mini:acme", "openai") == "table"
    assert pricer.source("a-model-nobody-knows", "vllm") == "fallback"
    assert pricer.estimate("claude-sonnet-4-5", "anthropic", input_tokens=1_000_000, output_tokens=0,
                           tenant="acme") == 270_000_000


