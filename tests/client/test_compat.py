"""`cycles.client.compat`: runcycles 0.5.3 user programs run against the real server with ONLY the import
changed (`import cycles.client.compat as runcycles`), plus one program run with the real runcycles 0.5.3
(conformance venv, subprocess) and with the compat module, whose observable results must be equal."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

import cycles.client.compat as runcycles
from cycles.client import decorator as _native_deco
from cycles.client import errors as native_errors
from published_sdk import PYTHON as CONFORMANCE_PY, ensure_runcycles
from support import free_port


@pytest.fixture(autouse=True)
def _restore_defaults():
    saved = (_native_deco._default_config, _native_deco._default_sync, _native_deco._default_async)
    yield
    _native_deco._default_config, _native_deco._default_sync, _native_deco._default_async = saved


@pytest.fixture
def cfg(tenant, tmp_path):
    def make(**kw: Any) -> runcycles.CyclesConfig:
        base = dict(base_url=tenant.server.base_url, api_key=tenant.key, tenant=tenant.tenant_id,
                    journal_dir=str(tmp_path / "journal"), retry_initial_delay=0.05, retry_flush_timeout=0)
        base.update(kw)
        return runcycles.CyclesConfig(**base)

    return make


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


# ---------------------------------------------------------------- surface


def test_public_surface_matches_runcycles_names():
    names = ["CyclesClient", "AsyncCyclesClient", "CyclesConfig", "cycles", "set_default_client",
             "set_default_config", "CyclesContext", "get_cycles_context", "CyclesResponse", "StreamReservation",
             "AsyncStreamReservation", "StreamUsage", "CyclesError", "CyclesProtocolError", "CyclesTransportError",
             "BudgetExceededError", "DebtOutstandingError", "OverdraftLimitExceededError", "ReservationExpiredError",
             "ReservationFinalizedError", "TenantClosedError", "Unit", "Amount", "SignedAmount", "Subject", "Action",
             "Caps", "Decision", "CyclesMetrics", "Balance", "CommitOveragePolicy", "ErrorCode", "ErrorResponse",
             "ReservationStatus", "CommitStatus", "ReleaseStatus", "ExtendStatus", "EventStatus",
             "ReservationCreateRequest", "CommitRequest", "ReleaseRequest", "ReservationExtendRequest",
             "DecisionRequest", "EventCreateRequest", "ReservationCreateResponse", "CommitResponse",
             "ReleaseResponse", "ReservationExtendResponse", "DecisionResponse", "EventCreateResponse",
             "DryRunResult", "ReservationDetail", "ReservationSummary", "ReservationListResponse",
             "BalanceResponse"]
    missing = [n for n in names if not hasattr(runcycles, n)]
    assert not missing
    # the exception classes ARE ours, so except clauses catch what our SDK raises
    assert runcycles.BudgetExceededError is native_errors.BudgetExceededError
    assert issubclass(runcycles.BudgetExceededError, runcycles.CyclesProtocolError)
    assert issubclass(runcycles.CyclesProtocolError, runcycles.CyclesError)


def test_config_fields_defaults_and_from_env(monkeypatch):
    c = runcycles.CyclesConfig(base_url="http://x", api_key="k")
    assert (c.connect_timeout, c.read_timeout, c.retry_enabled, c.retry_max_attempts, c.retry_initial_delay,
            c.retry_multiplier, c.retry_max_delay, c.retry_flush_timeout, c.journal_enabled, c.journal_dir) == \
        (2.0, 5.0, True, 5, 0.5, 2.0, 30.0, 10.0, True, None)
    c.tenant = "acme"  # mutable like runcycles' dataclass
    n = c.to_native()
    assert n.tenant == "acme" and n.connect_timeout == 2.0 and n.journal_dir.endswith(".runcycles/commit-journal")
    for k in list(os.environ):
        if k.startswith("CYCLES_"):
            monkeypatch.delenv(k)
    with pytest.raises(ValueError, match="CYCLES_BASE_URL"):
        runcycles.CyclesConfig.from_env()
    monkeypatch.setenv("CYCLES_BASE_URL", "http://h:1")
    monkeypatch.setenv("CYCLES_API_KEY", "key")
    monkeypatch.setenv("CYCLES_TENANT", "t1")
    monkeypatch.setenv("CYCLES_CONNECT_TIMEOUT", "3")
    monkeypatch.setenv("CYCLES_RETRY_ENABLED", "yes")  # runcycles: only "true" counts
    monkeypatch.setenv("CYCLES_JOURNAL_ENABLED", "FALSE")
    e = runcycles.CyclesConfig.from_env()
    assert (e.base_url, e.tenant, e.connect_timeout, e.retry_enabled, e.journal_enabled) == \
        ("http://h:1", "t1", 3.0, False, False)


def test_models_construct_like_pydantic_and_serialize_without_nulls():
    req = runcycles.ReservationCreateRequest(
        idempotency_key="k1", subject=runcycles.Subject(tenant="acme"),
        action=runcycles.Action(kind="llm.completion", name="gpt-4o"),
        estimate=runcycles.Amount(unit=runcycles.Unit.USD_MICROCENTS, amount=1000))
    assert req.model_dump() == {"idempotency_key": "k1", "subject": {"tenant": "acme"},
                                "action": {"kind": "llm.completion", "name": "gpt-4o"},
                                "estimate": {"unit": "USD_MICROCENTS", "amount": 1000}}
    assert "null" not in req.model_dump_json()
    with pytest.raises(ValueError):
        runcycles.Amount(unit=runcycles.Unit.TOKENS, amount=-1)
    nested = runcycles.CommitRequest(idempotency_key="c", actual={"unit": "TOKENS", "amount": 3},
                                     metrics=runcycles.CyclesMetrics(tokens_input=3))
    assert nested.actual.amount == 3
    assert json.loads(nested.model_dump_json()) == {"idempotency_key": "c", "actual": {"unit": "TOKENS", "amount": 3},
                                                    "metrics": {"tokens_input": 3}}
    resp = runcycles.ReservationCreateResponse.model_validate({"decision": "ALLOW", "affected_scopes": ["tenant:a"]})
    assert resp.is_allowed() and resp.decision == runcycles.Decision.ALLOW
    assert runcycles.ErrorCode.from_string("NOPE") is runcycles.ErrorCode.UNKNOWN
    assert runcycles.Caps(tool_denylist=["rm"]).is_tool_allowed("ls")


# ---------------------------------------------------------------- README / demo programs


def test_runaway_demo_guarded_agent(tenant, cfg):
    """clients.md §5.1 guarded agent: set_default_client + three @cycles + except BudgetExceededError."""
    tenant.budget(amount=5_000_000)  # $0.05 = 5 calls at $0.01
    COST = 1_000_000
    runcycles.set_default_client(runcycles.CyclesClient(cfg(workspace="default", app="default",
                                                            workflow="default", agent="support-bot")))

    @runcycles.cycles(estimate=COST, action_kind="llm.completion", action_name="draft-response")
    def draft_response(ticket):
        return f"draft for {ticket}"

    @runcycles.cycles(estimate=COST, action_kind="llm.completion", action_name="evaluate-quality")
    def evaluate_quality(text):
        ctx = runcycles.get_cycles_context()
        assert ctx is not None and ctx.reservation_id
        return 6.2

    @runcycles.cycles(estimate=COST, action_kind="llm.completion", action_name="refine-response")
    def refine_response(text):
        return text + "!"

    calls, stopped_by = 0, None
    try:
        text = draft_response("T-1")
        calls += 1
        while True:
            score = evaluate_quality(text)
            calls += 1
            if score >= 8.0:
                break
            text = refine_response(text)
            calls += 1
    except runcycles.BudgetExceededError as exc:
        stopped_by = exc
    except runcycles.CyclesError as exc:  # pragma: no cover - the demo reports it as unexpected
        pytest.fail(f"unexpected {exc!r}")
    assert calls == 5
    assert stopped_by is not None and stopped_by.status == 409 and stopped_by.error_code == "BUDGET_EXCEEDED"
    assert stopped_by.is_budget_exceeded()
    bal = tenant.balance()
    assert bal["spent"]["amount"] == 5 * COST and bal["reserved"]["amount"] == 0


def test_lowlevel_program(tenant, cfg):
    """The README low-level flow: every method returns a CyclesResponse; models or dict bodies."""
    tenant.budget(amount=100_000)
    tid = tenant.tenant_id
    with runcycles.CyclesClient(cfg()) as client:
        req = runcycles.ReservationCreateRequest(
            idempotency_key=str(uuid.uuid4()), subject=runcycles.Subject(tenant=tid),
            action=runcycles.Action(kind="llm.completion", name="gpt-4o"),
            estimate=runcycles.Amount(unit=runcycles.Unit.USD_MICROCENTS, amount=1000), ttl_ms=60_000)
        r = client.create_reservation(req)
        assert isinstance(r, runcycles.CyclesResponse)
        assert r.is_success and r.status == 200 and not r.is_client_error and not r.is_transport_error
        assert r.get_body_attribute("decision") == "ALLOW" and r.request_id
        rid = r.get_body_attribute("reservation_id")
        assert runcycles.ReservationCreateResponse.model_validate(r.body).is_allowed()

        g = client.get_reservation(rid)
        assert g.status == 200 and g.body["status"] == runcycles.ReservationStatus.ACTIVE
        ext = client.extend_reservation(rid, runcycles.ReservationExtendRequest(idempotency_key="x1",
                                                                                extend_by_ms=5000))
        assert ext.status == 200 and ext.body["status"] == "ACTIVE"
        c = client.commit_reservation(rid, runcycles.CommitRequest(
            idempotency_key="c1", actual=runcycles.Amount(unit=runcycles.Unit.USD_MICROCENTS, amount=700),
            metrics=runcycles.CyclesMetrics(tokens_input=10, tokens_output=20)))
        assert c.status == 200 and c.body["charged"]["amount"] == 700

        again = client.commit_reservation(rid, {"idempotency_key": "c2",
                                                "actual": {"unit": "USD_MICROCENTS", "amount": 1}})
        assert again.status == 409 and again.is_client_error and not again.is_success
        err = again.get_error_response()
        assert err is not None and err.error == "RESERVATION_FINALIZED"
        assert err.error_code == runcycles.ErrorCode.RESERVATION_FINALIZED and again.error_message

        r2 = client.create_reservation({"idempotency_key": str(uuid.uuid4()), "subject": {"tenant": tid},
                                        "action": {"kind": "llm.completion", "name": "gpt-4o"},
                                        "estimate": {"unit": "USD_MICROCENTS", "amount": 500}})
        assert r2.status == 200
        rel = client.release_reservation(r2.body["reservation_id"],
                                         runcycles.ReleaseRequest(idempotency_key="r1", reason="user cancelled"))
        assert rel.status == 200 and rel.body["released"]["amount"] == 500

        d = client.decide(runcycles.DecisionRequest(
            idempotency_key="d1", subject=runcycles.Subject(tenant=tid),
            action=runcycles.Action(kind="tool.search", name="web"),
            estimate=runcycles.Amount(unit=runcycles.Unit.USD_MICROCENTS, amount=5)))
        assert d.status == 200 and d.body["decision"] == "ALLOW"
        ev = client.create_event(runcycles.EventCreateRequest(
            idempotency_key="e1", subject=runcycles.Subject(tenant=tid),
            action=runcycles.Action(kind="tool.search", name="web"),
            actual=runcycles.Amount(unit=runcycles.Unit.USD_MICROCENTS, amount=50)))
        assert ev.status == 201 and ev.body["status"] == "APPLIED"

        lst = client.list_reservations(tenant=tid, status="COMMITTED")
        assert lst.status == 200 and [x["reservation_id"] for x in lst.body["reservations"]] == [rid]
        bal = client.get_balances(tenant=tid)
        assert bal.status == 200 and bal.body["balances"][0]["spent"]["amount"] == 750
        with pytest.raises(ValueError, match="subject filter"):
            client.get_balances()
        with pytest.raises(ValueError):
            client.get_balances(limit=5)

        # HTTP errors never raise
        missing = client.get_reservation("res_does_not_exist")
        assert missing.status == 404 and missing.is_client_error and missing.error_message
        bad = client.create_reservation({"idempotency_key": "b1", "subject": {"tenant": tid}})
        assert bad.status == 400 and bad.get_error_response().error == "INVALID_REQUEST"


def test_budget_exceeded_lowlevel_is_a_409_response_not_an_exception(tenant, cfg):
    tenant.budget(amount=100)
    with runcycles.CyclesClient(cfg()) as client:
        r = client.create_reservation({"idempotency_key": "k", "subject": {"tenant": tenant.tenant_id},
                                       "action": {"kind": "llm", "name": "m"},
                                       "estimate": {"unit": "USD_MICROCENTS", "amount": 1000},
                                       "overage_policy": "REJECT"})
        assert r.status == 409 and r.get_body_attribute("error") == "BUDGET_EXCEEDED"


def test_transport_error_is_status_minus_one_and_never_raises(tmp_path):
    config = runcycles.CyclesConfig(base_url=dead_url(), api_key="k", tenant="acme",
                                    journal_dir=str(tmp_path / "j"), connect_timeout=1.0)
    with runcycles.CyclesClient(config) as client:
        results = [
            client.create_reservation({"idempotency_key": "k"}),
            client.commit_reservation("r", {"idempotency_key": "k"}),
            client.release_reservation("r", {"idempotency_key": "k"}),
            client.extend_reservation("r", {"idempotency_key": "k", "extend_by_ms": 1000}),
            client.decide({"idempotency_key": "k"}),
            client.create_event({"idempotency_key": "k"}),
            client.list_reservations(tenant="acme"),
            client.get_reservation("r"),
            client.get_balances(tenant="acme"),
        ]
    for r in results:
        assert r.status == -1 and r.is_transport_error and not r.is_success and not r.is_server_error
        assert r.error_message and r.transport_exception is not None and r.body is None

    # the decorator surfaces the same failure as a CyclesProtocolError with status -1
    with runcycles.CyclesClient(config.__class__(**{**config.__dict__, "retry_max_attempts": 1})) as client:
        @runcycles.cycles(estimate=10, client=client)
        def f():
            return 1

        with pytest.raises(runcycles.CyclesProtocolError) as exc:
            f()
        assert exc.value.status == -1


def test_async_program(tenant, cfg):
    tenant.budget(amount=3_000)

    async def main():
        async with runcycles.AsyncCyclesClient(cfg()) as client:
            r = await client.create_reservation(runcycles.ReservationCreateRequest(
                idempotency_key=str(uuid.uuid4()), subject=runcycles.Subject(tenant=tenant.tenant_id),
                action=runcycles.Action(kind="llm", name="m"),
                estimate=runcycles.Amount(unit=runcycles.Unit.USD_MICROCENTS, amount=1000)))
            assert r.status == 200
            c = await client.commit_reservation(r.body["reservation_id"],
                                                {"idempotency_key": "c", "actual": {"unit": "USD_MICROCENTS",
                                                                                    "amount": 1000}})
            assert c.status == 200
            with pytest.raises(ValueError):
                await client.get_balances()
            runcycles.set_default_client(client)

            @runcycles.cycles(estimate=1000, action_kind="llm", action_name="m")
            async def ask(q):
                return q.upper()

            done = []
            with pytest.raises(runcycles.BudgetExceededError):
                for q in "abcdef":
                    done.append(await ask(q))
            assert done == ["A", "B"]
            bal = await client.get_balances(tenant=tenant.tenant_id)
            return bal.body["balances"][0]

    bal = asyncio.run(main())
    assert bal["spent"]["amount"] == 3_000


def test_stream_reservation_and_dry_run(tenant, cfg):
    tenant.budget(amount=10_000)
    with runcycles.CyclesClient(cfg()) as client:
        with client.stream_reservation(action=runcycles.Action(kind="llm.completion", name="gpt-4o"),
                                       estimate=runcycles.Amount(unit=runcycles.Unit.USD_MICROCENTS, amount=2000),
                                       cost_fn=lambda u: u.tokens_output * 10) as stream:
            assert stream.reservation_id and stream.decision == runcycles.Decision.ALLOW
            stream.usage.add_output_tokens(30)

        @runcycles.cycles(estimate=500, dry_run=True, client=client)
        def never_runs():
            raise AssertionError("dry_run must not run the function")

        res = never_runs()
        assert isinstance(res, runcycles.DryRunResult) and res.is_allowed()
    bal = tenant.balance()
    assert bal["spent"]["amount"] == 300 and bal["reserved"]["amount"] == 0


# ---------------------------------------------------------------- same program, real runcycles vs compat

PROGRAM = textwrap.dedent('''
    import uuid

    def program(rc, p):
        out = {}
        def cfg(**kw):
            base = dict(base_url=p["base_url"], api_key=p["api_key"], tenant=p["tenant"],
                        journal_dir=p["journal_dir"], retry_initial_delay=0.05, retry_max_attempts=1,
                        retry_flush_timeout=0)
            base.update(kw)
            return rc.CyclesConfig(**base)

        def summ(r):
            body = r.body or {}
            return {"status": r.status, "ok": r.is_success, "client_error": r.is_client_error,
                    "transport": r.is_transport_error, "keys": sorted(body), "error": body.get("error"),
                    "has_request_id": r.request_id is not None}

        client = rc.CyclesClient(cfg())
        req = rc.ReservationCreateRequest(
            idempotency_key=str(uuid.uuid4()), subject=rc.Subject(tenant=p["tenant"]),
            action=rc.Action(kind="llm.completion", name="gpt-4o"),
            estimate=rc.Amount(unit=rc.Unit.USD_MICROCENTS, amount=1000), ttl_ms=60000)
        r = client.create_reservation(req)
        out["create"] = summ(r)
        rid = r.get_body_attribute("reservation_id")
        out["get"] = summ(client.get_reservation(rid))
        out["extend"] = summ(client.extend_reservation(rid, {"idempotency_key": str(uuid.uuid4()),
                                                             "extend_by_ms": 5000}))
        out["commit"] = summ(client.commit_reservation(rid, rc.CommitRequest(
            idempotency_key=str(uuid.uuid4()), actual=rc.Amount(unit=rc.Unit.USD_MICROCENTS, amount=700))))
        again = client.commit_reservation(rid, {"idempotency_key": str(uuid.uuid4()),
                                                "actual": {"unit": "USD_MICROCENTS", "amount": 1}})
        out["commit_again"] = summ(again)
        er = again.get_error_response()
        out["commit_again_error"] = None if er is None else str(getattr(er.error_code, "value", er.error_code))
        r2 = client.create_reservation({"idempotency_key": str(uuid.uuid4()), "subject": {"tenant": p["tenant"]},
                                        "action": {"kind": "llm.completion", "name": "gpt-4o"},
                                        "estimate": {"unit": "USD_MICROCENTS", "amount": 500}})
        out["create_dict"] = summ(r2)
        out["release"] = summ(client.release_reservation(r2.body["reservation_id"], rc.ReleaseRequest(
            idempotency_key=str(uuid.uuid4()), reason="done")))
        out["decide"] = summ(client.decide(rc.DecisionRequest(
            idempotency_key=str(uuid.uuid4()), subject=rc.Subject(tenant=p["tenant"]),
            action=rc.Action(kind="tool", name="web"), estimate=rc.Amount(unit=rc.Unit.USD_MICROCENTS, amount=5))))
        out["event"] = summ(client.create_event(rc.EventCreateRequest(
            idempotency_key=str(uuid.uuid4()), subject=rc.Subject(tenant=p["tenant"]),
            action=rc.Action(kind="tool", name="web"), actual=rc.Amount(unit=rc.Unit.USD_MICROCENTS, amount=50))))
        out["list"] = summ(client.list_reservations(tenant=p["tenant"]))
        bal = client.get_balances(tenant=p["tenant"])
        out["balances"] = summ(bal)
        out["spent_after_lowlevel"] = bal.body["balances"][0]["spent"]["amount"]
        out["missing"] = summ(client.get_reservation("res_missing"))
        out["invalid"] = summ(client.create_reservation({"idempotency_key": "x", "subject": {"tenant": p["tenant"]}}))
        try:
            client.get_balances()
            out["balances_no_filter"] = None
        except Exception as exc:
            out["balances_no_filter"] = type(exc).__name__
        dead = rc.CyclesClient(cfg(base_url=p["dead_url"]))
        out["transport"] = summ(dead.get_reservation("r"))
        out["transport_post"] = summ(dead.create_reservation(req))
        dead.close()

        rc.set_default_client(client)

        @rc.cycles(estimate=2000, action_kind="llm.completion", action_name="gpt-4o")
        def work(i):
            ctx = rc.get_cycles_context()
            return str(getattr(ctx.decision, "value", ctx.decision))

        decisions, caught = [], None
        for i in range(10):
            try:
                decisions.append(work(i))
            except rc.BudgetExceededError as exc:
                caught = exc
                break
        out["decisions"] = decisions
        out["exception"] = None if caught is None else {
            "type": type(caught).__name__, "status": caught.status, "error_code": caught.error_code,
            "is_protocol_error": isinstance(caught, rc.CyclesProtocolError),
            "is_budget_exceeded": caught.is_budget_exceeded()}
        out["spent_final"] = client.get_balances(tenant=p["tenant"]).body["balances"][0]["spent"]["amount"]
        client.close()
        return out
''')


def _run_with_runcycles(params: dict[str, Any], workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "home").mkdir(exist_ok=True)
    script = workdir / "program.py"
    script.write_text(PROGRAM + textwrap.dedent('''
        import json, os, runcycles
        assert runcycles.__version__ == "0.5.3"
        print("@@RESULT@@ " + json.dumps(program(runcycles, json.loads(os.environ["PROGRAM_PARAMS"]))))
    '''))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir / "home"), "PYTHONNOUSERSITE": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "PROGRAM_PARAMS": json.dumps(params)}
    proc = subprocess.run([str(CONFORMANCE_PY), str(script)], env=env, cwd=str(workdir), capture_output=True,
                          text=True, timeout=60)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@ ")]
    assert proc.returncode == 0 and len(lines) == 1, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[0][len("@@RESULT@@ "):])


def test_same_program_real_runcycles_vs_compat(server, tmp_path):
    ensure_runcycles()  # made here if no conformance test ran first: never skipped for an ordering reason
    from support import new_tenant

    results = {}
    for name in ("runcycles", "compat"):
        t = new_tenant(server)
        t.budget(amount=10_000)
        params = {"base_url": server.base_url, "api_key": t.key, "tenant": t.tenant_id,
                  "journal_dir": str(tmp_path / name / "journal"), "dead_url": dead_url()}
        if name == "runcycles":
            results[name] = _run_with_runcycles(params, tmp_path / name)
        else:
            ns: dict[str, Any] = {}
            exec(compile(PROGRAM, "program.py", "exec"), ns)
            results[name] = json.loads(json.dumps(ns["program"](runcycles, params)))
    ref, ours = results["runcycles"], results["compat"]
    assert ref["create"]["status"] == 200 and ref["transport"]["status"] == -1  # sanity of the reference run
    assert ref["decisions"] == ["ALLOW"] * 4 and ref["exception"]["type"] == "BudgetExceededError"
    # Known, intended divergence: runcycles' get_error_response() forbids extra fields, so it returns None
    # for our error bodies (they carry `trace_id`); the compat one parses them.
    assert ref.pop("commit_again_error") in (None, "RESERVATION_FINALIZED")
    assert ours.pop("commit_again_error") == "RESERVATION_FINALIZED"
    assert ours == ref


def test_caps_and_metrics_helpers_match_runcycles() -> None:
    from cycles.client.context import CyclesMetrics
    from cycles.protocol.models import Caps

    assert Caps(tool_allowlist=["search"]).is_tool_allowed("search")
    assert not Caps(tool_allowlist=["search"], tool_denylist=["search"]).is_tool_allowed("email")
    assert not Caps(tool_denylist=["email"]).is_tool_allowed("email")
    assert Caps(tool_denylist=["email"]).is_tool_allowed("search")
    assert Caps().is_tool_allowed("anything")
    metrics = CyclesMetrics()
    metrics.put_custom("cache_hit", True)
    assert metrics.custom == {"cache_hit": True} and not metrics.is_empty()
