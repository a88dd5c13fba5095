"""Action governance and evidence in the dashboard, in real Chromium against real servers: quota
counters (and an operator's reset), observe mode's would-be denials, the policy editor's action rules,
and the evidence viewer verifying a real server's envelope in the page (and failing tampered ones)."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import uuid
from pathlib import Path

import httpx

from cycles.core import jcs
from support import ADMIN_KEY, USD, new_tenant, reserve_body
from .conftest import Data, Tab, Work
from .test_dashboard_2_actions import dialog_button, eventually


def test_quota_counters_and_observed_denials_show_the_seeded_data(admin_tab: Tab, dash: Data) -> None:
    page = admin_tab.page
    admin_tab.go("governance?tenant=acme-corp")
    row = page.locator("#quota-counters .vt-row", has_text="message.email.send")
    row.wait_for()
    cells = row.locator("[role=cell]").all_inner_texts()
    assert cells[0] == "tenant:acme-corp/workspace:eng/agent:mailer" and cells[3:5] == ["2", "20"]
    risk = page.locator("#quota-counters .vt-row", has_text="risk: external_side_effect")
    assert risk.locator("[role=cell]").all_inner_texts()[3:5] == ["2", "50"]
    assert page.get_by_role("button", name="Reset tenant:acme-corp/workspace:eng/agent:mailer message.email.send").count() == 1
    assert "0 reservation(s) would have been denied" in page.locator("#observed-total").inner_text()
    admin_tab.go("governance?tenant=beta-labs")
    page.locator("#observed-total", has_text="3 reservation(s) would have been denied").wait_for()
    assert page.locator("#observed").get_by_text("OBSERVE", exact=True).count() == 1
    assert "ACTION_KIND_DENIED" in page.get_by_label("would-be denials by reason").inner_text()
    assert "code.exec" in page.get_by_label("would-be denials by action kind").inner_text()
    agents = page.get_by_label("would-be denials by agent").locator("li").all_inner_texts()
    assert "scout" in agents[0] and agents[0].endswith("2") and "coder" in agents[1]
    points = page.locator("#observed circle.pt").evaluate_all("els => els.map(e => Number(e.dataset.v))")
    assert sum(points) == 3
    # the API the page reads: observed denials stay out of the production denial figures
    with dash.server.admin() as c:
        assert c.get("/v1/admin/denials", params={"tenant_id": "beta-labs"}).json().get("total", 0) == 0
        assert c.get("/v1/admin/denials", params={"tenant_id": "beta-labs", "observed": "true"}).json()["total"] == 3


def test_tenant_key_sees_its_counters_and_no_reset(tab: Tab, dash: Data) -> None:
    tab.login(dash.acme.key)  # balances:read: still accepted for counters (deprecated), no action_quotas:read
    page = tab.page
    assert "Governance" in page.locator("nav a").all_inner_texts()
    tab.go("governance")
    page.locator("#quota-counters .vt-row", has_text="message.email.send").wait_for()
    assert page.get_by_role("button", name="Reset").count() == 0
    assert page.locator("#gov-tenant").count() == 0


def _quota_tenant(work: Work) -> tuple[str, str]:
    t = new_tenant(work.server)
    t.budget("", 1_000_000)
    with work.server.admin() as c:
        r = c.post("/v1/admin/policies", json={"tenant_id": t.tenant_id, "name": "mail", "scope_pattern": f"tenant:{t.tenant_id}",
                                               "action_quotas": [{"action_kind": "message.email.send", "max_calls": 3,
                                                                  "window": "per_day_tumbling"}]})
        assert r.status_code == 201, r.text
    with t.client() as c:
        for i in range(4):
            r = c.post("/v1/reservations", json=reserve_body(t, 10, action={"kind": "message.email.send", "name": "smtp"}))
            assert r.status_code == (200 if i < 3 else 409), r.text  # the fourth is over the quota
    return t.tenant_id, t.key


def test_operator_resets_a_quota_counter(work_tab: Tab, work: Work) -> None:
    tid, key = _quota_tenant(work)
    page = work_tab.page
    work_tab.go(f"governance?tenant={tid}")
    page.get_by_role("button", name=f"Reset tenant:{tid} message.email.send").click()
    dialog_button(work_tab, "Reset counter")
    page.get_by_text("(was 3)").wait_for()

    def used() -> int:
        with work.server.admin() as c:
            rows = c.get("/v1/admin/action-quota-counters", params={"tenant_id": tid, "include_zero": "true"}).json()["counters"]
        return rows[0]["used"]

    assert eventually(lambda: used() == 0)
    with httpx.Client(base_url=work.server.base_url, headers={"X-Cycles-API-Key": key}) as c:  # headroom is back
        r = c.post("/v1/reservations", json={"idempotency_key": uuid.uuid4().hex, "subject": {"tenant": tid},
                                             "action": {"kind": "message.email.send", "name": "smtp"},
                                             "estimate": {"unit": USD, "amount": 10}})
        assert r.status_code == 200 and r.json()["decision"] == "ALLOW", r.text
    with work.server.admin() as c:
        logs = c.get("/v1/admin/audit/logs", params={"operation": "resetActionQuotaCounter", "limit": 50}).json()["logs"]
    assert any(tid in json.dumps(row) for row in logs)


def test_operator_switches_a_tenant_to_observe_mode_and_back(work_tab: Tab, work: Work) -> None:
    t = new_tenant(work.server)
    page = work_tab.page

    def mode() -> str:
        with work.server.admin() as c:
            return c.get(f"/v1/admin/tenants/{t.tenant_id}").json()["observe_mode"]

    assert mode() == "ENFORCE"
    work_tab.go(f"governance?tenant={t.tenant_id}")
    page.get_by_role("button", name="Switch to OBSERVE").click()
    dialog_button(work_tab, "Set OBSERVE")
    eventually(lambda: mode() == "OBSERVE")
    page.get_by_role("button", name="Switch to ENFORCE").click()
    dialog_button(work_tab, "Set ENFORCE")
    eventually(lambda: mode() == "ENFORCE")


def test_policy_editor_sets_and_changes_the_four_action_rule_fields(work_tab: Tab, work: Work, shots: Path) -> None:
    t = new_tenant(work.server)
    tid = t.tenant_id
    page = work_tab.page
    work_tab.go(f"tenant/{tid}?tab=policies")
    page.get_by_role("button", name="Create policy").click()
    dlg = page.get_by_role("dialog")
    dlg.get_by_label("Name", exact=True).fill("rules")
    dlg.get_by_label("Scope pattern").fill(f"tenant:{tid}/agent:*")
    dlg.get_by_label("Action kind access list").select_option("denied")
    dlg.get_by_label("Filter kinds").fill("code.")
    dlg.get_by_label("code.exec", exact=False).first.check()  # from the registry GET /v1/action-kinds
    dlg.locator("label[data-kind='code.deploy'] input").check()
    assert dlg.locator("label[data-kind='db.query']").is_hidden()  # the filter narrowed the list
    dlg.locator("#add-action-quota").click()
    dlg.get_by_label("Action kind", exact=True).fill("message.email.send")
    dlg.get_by_label("Max calls").fill("5")
    dlg.get_by_label("Window").select_option("per_run")
    dlg.locator("#add-risk-quota").click()
    row = dlg.locator(".quota-row").nth(1)
    row.get_by_label("Risk class").select_option("high_risk")
    row.get_by_label("Max calls").fill("2")
    dlg.locator(".kind-grid").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "policy-editor-light.png"))
    dialog_button(work_tab, "Create policy")
    page.get_by_role("dialog").wait_for(state="detached")

    def policy() -> dict:
        with work.server.admin() as c:
            return next(p for p in c.get("/v1/admin/policies", params={"tenant_id": tid}).json()["policies"] if p["name"] == "rules")

    p = eventually(policy)
    assert sorted(p["denied_action_kinds"]) == ["code.deploy", "code.exec"] and p["allowed_action_kinds"] == []
    assert p["action_quotas"] == [{"action_kind": "message.email.send", "max_calls": 5, "window": "per_run"}]
    assert p["risk_class_quotas"] == [{"risk_class": "high_risk", "max_calls": 2, "window": "per_hour_tumbling"}]
    # the server enforces what the page set
    with t.client() as c:
        r = c.post("/v1/reservations", json=reserve_body(t, 10, subject=t.subject(agent="a1"), action={"kind": "code.exec", "name": "sh"}))
        assert r.status_code == 409 and r.json()["error"] == "ACTION_KIND_DENIED", r.text
    # edit: an allow-list instead, the kind quota removed, the class quota raised
    page.get_by_text("deny code.deploy, code.exec; message.email.send ≤ 5 per_run; high_risk ≤ 2 per_hour_tumbling").wait_for()
    page.get_by_role("button", name="Edit policy rules").click()
    dlg = page.get_by_role("dialog")
    dlg.get_by_label("Action kind access list").select_option("allowed")
    for kind in ("code.exec", "code.deploy"):
        dlg.locator(f"label[data-kind='{kind}'] input").uncheck()
    dlg.locator("label[data-kind='llm.completion'] input").check()
    dlg.locator(".quota-row").nth(0).get_by_role("button", name="Remove this quota").click()
    dlg.locator(".quota-row").nth(0).get_by_label("Max calls").fill("7")
    dialog_button(work_tab, "Save policy")
    page.get_by_role("dialog").wait_for(state="detached")
    p = eventually(lambda: (x := policy())["allowed_action_kinds"] and x)
    assert p["allowed_action_kinds"] == ["llm.completion"] and p["denied_action_kinds"] == []
    assert p["action_quotas"] == [] and p["risk_class_quotas"][0]["max_calls"] == 7



def test_policy_editor_edits_quota_allowlists_threshold_and_run_ttl(work_tab: Tab, work: Work, shots: Path) -> None:
    t = new_tenant(work.server)
    with work.server.admin() as c:
        r = c.post("/v1/admin/policies", json={
            "tenant_id": t.tenant_id, "name": "extras", "scope_pattern": f"tenant:{t.tenant_id}/agent:*",
            "action_quotas": [{"action_kind": "http.post", "max_calls": 30, "window": "per_hour_tumbling",
                               "host_allowlist": ["api.openai.com"], "threshold_pct": 0.8}],
            "risk_class_quotas": [{"risk_class": "high_risk", "max_calls": 3, "window": "per_run", "per_run_counter_ttl_ms": 3_600_000}]})
        assert r.status_code == 201, r.text
        pid = r.json()["policy_id"]

    def policy() -> dict:
        with work.server.admin() as c:
            return next(p for p in c.get("/v1/admin/policies", params={"tenant_id": t.tenant_id}).json()["policies"] if p["policy_id"] == pid)

    page = work_tab.page
    work_tab.go(f"tenant/{t.tenant_id}?tab=policies")
    page.get_by_text("http.post ≤ 30 per_hour_tumbling (host api.openai.com, alert 80%)").wait_for()
    page.get_by_role("button", name="Edit policy extras").click()
    dlg = page.get_by_role("dialog")
    kind_row, risk_row = dlg.locator(".quota-row").nth(0), dlg.locator(".quota-row").nth(1)
    # the rules' values are shown (their details open), and edited
    assert kind_row.get_by_label("Host allowlist").input_value() == "api.openai.com"
    assert risk_row.get_by_label("Per-run counter TTL (ms)").input_value() == "3600000"
    kind_row.get_by_label("Host allowlist").fill("api.openai.com, api.anthropic.com")
    kind_row.get_by_label("Recipient domain allowlist").fill("example.com")
    kind_row.get_by_label("Resource type allowlist").fill("invoice ,  receipt")
    kind_row.get_by_label("Alert threshold").fill("0.95")
    assert kind_row.get_by_label("Per-run counter TTL (ms)").is_disabled()  # not a per_run window
    risk_row.get_by_label("Per-run counter TTL (ms)").fill("604800000")
    risk_row.get_by_label("Alert threshold").fill("0.5")
    dlg.locator(".action-rules").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "policy-quota-extras-light.png"))
    # out of range: refused in the dialog, nothing sent
    risk_row.get_by_label("Per-run counter TTL (ms)").fill("59999")
    dialog_button(work_tab, "Save policy")
    dlg.get_by_text("Per-run counter TTL must be a whole number").wait_for()
    risk_row.get_by_label("Per-run counter TTL (ms)").fill("604800000")
    dialog_button(work_tab, "Save policy")
    page.get_by_role("dialog").wait_for(state="detached")
    p = eventually(lambda: (x := policy())["action_quotas"][0].get("recipient_domain_allowlist") and x)
    assert p["action_quotas"] == [{"action_kind": "http.post", "max_calls": 30, "window": "per_hour_tumbling",
                                   "host_allowlist": ["api.openai.com", "api.anthropic.com"],
                                   "recipient_domain_allowlist": ["example.com"], "resource_type_allowlist": ["invoice", "receipt"],
                                   "threshold_pct": 0.95}]
    assert p["risk_class_quotas"] == [{"risk_class": "high_risk", "max_calls": 3, "window": "per_run",
                                       "per_run_counter_ttl_ms": 604_800_000, "threshold_pct": 0.5}]
    # clearing: blank fields go back to the server's defaults; leaving per_run drops the run TTL
    page.get_by_role("button", name="Edit policy extras").click()
    dlg = page.get_by_role("dialog")
    kind_row, risk_row = dlg.locator(".quota-row").nth(0), dlg.locator(".quota-row").nth(1)
    for label in ("Host allowlist", "Recipient domain allowlist", "Alert threshold"):
        kind_row.get_by_label(label).fill("")
    risk_row.get_by_label("Window").select_option("per_day_tumbling")
    assert risk_row.get_by_label("Per-run counter TTL (ms)").is_disabled()
    dialog_button(work_tab, "Save policy")
    page.get_by_role("dialog").wait_for(state="detached")
    p = eventually(lambda: (x := policy())["risk_class_quotas"][0]["window"] == "per_day_tumbling" and x)
    assert p["action_quotas"] == [{"action_kind": "http.post", "max_calls": 30, "window": "per_hour_tumbling",
                                   "resource_type_allowlist": ["invoice", "receipt"]}]
    assert p["risk_class_quotas"] == [{"risk_class": "high_risk", "max_calls": 3, "window": "per_day_tumbling", "threshold_pct": 0.5}]


# ---- evidence ----

def _envelope(server_url: str, evidence_id: str) -> str:
    r = httpx.get(f"{server_url}/v1/evidence/{evidence_id}")
    assert r.status_code == 200, r.text
    return r.text


def _verdict(tab: Tab) -> tuple[str, dict[str, str]]:
    page = tab.page
    page.locator("#verdict").wait_for()
    states = dict(page.locator("#checks li").evaluate_all("els => els.map(e => [e.dataset.check, e.dataset.state])"))
    return page.locator("#verdict").get_attribute("data-disposition"), states


def _paste(tab: Tab, doc: dict) -> tuple[str, dict[str, str]]:
    page = tab.page
    page.evaluate("() => document.getElementById('verdict').remove()")
    page.locator("details:has(#evidence-paste)").evaluate("d => { d.open = true }")
    page.get_by_label("Envelope JSON").fill(json.dumps(doc))
    page.locator("#verify-pasted").click()
    return _verdict(tab)


def _engine(tab: Tab) -> str:
    return tab.page.locator("#crypto-engine").get_attribute("data-engine")


def test_evidence_viewer_verifies_a_real_envelope_and_fails_tampered_ones(admin_tab: Tab, dash: Data) -> None:
    page = admin_tab.page
    admin_tab.go(f"evidence/{dash.evidence_id}")
    disposition, states = _verdict(admin_tab)
    assert disposition == "authentic" and set(states.values()) == {"pass"} and len(states) == 5, states
    assert _engine(admin_tab) == "webcrypto"  # 127.0.0.1 is a secure context
    assert "commit" in page.locator("dl.facts").inner_text()
    assert "null" not in page.evaluate("() => [...document.getElementById('evidence-box').childNodes].filter(n => n.nodeType === 3).map(n => n.data).join('')")
    text = _envelope(dash.server.base_url, dash.evidence_id)
    env = json.loads(text)

    def paste(doc: dict) -> tuple[str, dict[str, str]]:
        return _paste(admin_tab, doc)

    assert paste(env)[0] == "authentic"  # the saved copy verifies offline too (re-serialized, not canonical)
    # an edited amount: the content no longer hashes to its id
    tampered = json.loads(text)
    tampered["payload"]["commit"]["request"]["actual"]["amount"] += 1
    disposition, states = paste(tampered)
    assert disposition == "malformed" and states["Content id (sha256)"] == "fail" and states["Ed25519 signature"] == "skip"
    assert "tampered" in page.locator("#checks").inner_text()
    # the same edit with a recomputed content id: only the signature can tell
    tampered["evidence_id"] = hashlib.sha256(jcs.dumps({**tampered, "evidence_id": "", "signature": ""})).hexdigest()
    disposition, states = paste(tampered)
    assert disposition == "signature_invalid" and states["Content id (sha256)"] == "pass" and states["Ed25519 signature"] == "fail"
    # a signer the key set does not name
    other = json.loads(text)
    other["signer_did"] = other["signer_did"].rsplit("#", 1)[0] + "#not-a-kid"
    other["evidence_id"] = hashlib.sha256(jcs.dumps({**other, "evidence_id": "", "signature": ""})).hexdigest()
    disposition, states = paste(other)
    assert disposition == "signer_authority_failed" and states["Signer authority (JWK Set)"] == "fail"


def test_evidence_viewer_without_webcrypto_uses_the_vendored_ed25519(tab: Tab, dash: Data, shots: Path) -> None:
    """Plain HTTP from another host is no secure context: the browser has no crypto.subtle (nor
    randomUUID). Removed here before any page script runs, the page verifies with the vendored pure-JS
    SHA-2 and Ed25519, says so, and still tells a genuine envelope from tampered ones."""
    tab.ctx.add_init_script("delete Crypto.prototype.subtle; delete Crypto.prototype.randomUUID;")
    tab.login(ADMIN_KEY)
    page = tab.page
    assert page.evaluate("() => [typeof crypto.subtle, typeof crypto.randomUUID]") == ["undefined", "undefined"]
    # the actions' idempotency keys do without randomUUID too
    key = page.evaluate("async () => (await import('/dashboard/static/js/api.js')).uuid()")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", key), key
    tab.go(f"evidence/{dash.evidence_id}")
    disposition, states = _verdict(tab)
    assert disposition == "authentic" and set(states.values()) == {"pass"} and len(states) == 5, states
    assert _engine(tab) == "noble"
    assert "@noble/ed25519" in page.locator("#crypto-engine").inner_text()
    assert "not a secure context" in page.locator("#crypto-engine").inner_text()
    assert "(@noble/ed25519)" in page.locator("li[data-check='Ed25519 signature']").inner_text()
    page.screenshot(path=str(shots / "evidence-fallback-light.png"))
    env = json.loads(_envelope(dash.server.base_url, dash.evidence_id))
    # one bit of the signature flipped (the content id leaves the signature out, so it still matches)
    sig = bytearray(bytes.fromhex(env["signature"]))
    sig[10] ^= 1
    disposition, states = _paste(tab, {**env, "signature": sig.hex()})
    assert disposition == "signature_invalid" and states["Content id (sha256)"] == "pass", states
    assert _engine(tab) == "noble"
    # an edited amount with a recomputed content id: only the signature can tell
    tampered = json.loads(json.dumps(env))
    tampered["payload"]["commit"]["request"]["actual"]["amount"] += 1
    disposition, states = _paste(tab, tampered)
    assert disposition == "malformed" and states["Content id (sha256)"] == "fail"  # the vendored sha256
    tampered["evidence_id"] = hashlib.sha256(jcs.dumps({**tampered, "evidence_id": "", "signature": ""})).hexdigest()
    disposition, states = _paste(tab, tampered)
    assert disposition == "signature_invalid" and states["Content id (sha256)"] == "pass" and states["Ed25519 signature"] == "fail"
    assert _paste(tab, env)[0] == "authentic"


def test_evidence_from_a_reservation_and_an_envelope_tampered_in_the_store(work_tab: Tab, work: Work) -> None:
    t = new_tenant(work.server)
    t.budget("", 100_000)
    with t.client() as c:
        r = c.post("/v1/reservations", json=reserve_body(t, 1234, ttl_ms=600_000))
        rid, evid = r.json()["reservation_id"], r.json()["cycles_evidence"]["evidence_id"]
    page = work_tab.page
    work_tab.go(f"reservations?tenant={t.tenant_id}")
    page.get_by_role("link", name=f"Evidence of {rid}").click()
    page.locator("#reservation-evidence").get_by_role("link", name=f"reserve: {evid}").click()
    assert _verdict(work_tab)[0] == "authentic"
    # someone with write access to the database changes the stored receipt: the page says so
    db = sqlite3.connect(work.server.store_url.removeprefix("sqlite:///"), timeout=30)
    with db:
        n = db.execute("UPDATE evidence SET body = replace(body, '\"amount\":1234', '\"amount\":1') WHERE evidence_id = ?",
                       (evid,)).rowcount
    db.close()
    assert n == 1
    page.reload()
    disposition, states = _verdict(work_tab)
    assert disposition == "malformed" and states["Content id (sha256)"] == "fail"


def test_the_page_canonicalizes_as_rfc_8785_does(admin_tab: Tab) -> None:
    """The page's JCS against the server's (cycles.core.jcs) on the values where writers differ."""
    docs = [{"b": 1, "a": [1.5, 1e21, 1e-7, -0.0, 0.1 + 0.2, 2 ** 53, 123456789012345678]},
            {"\u20ac": "x", "\U0001f600": "astral", "\ufb33": "bmp", "ctl": "\u0001\n\t\"\\/<>\u2028"},
            {"nested": {"z": None, "y": True, "x": {"": []}}, "n": -1.0e-5, "big": 1.7976931348623157e308}]
    for doc in docs:
        got = admin_tab.page.evaluate("""async (doc) => {
            const { canonical } = await import('/dashboard/static/js/pages/evidence.js');
            return canonical(doc); }""", doc)
        assert got.encode() == jcs.dumps(doc), (got, jcs.dumps(doc))
