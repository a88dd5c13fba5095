"""The web middlewares (ASGI/Starlette, Django, Flask): the request's subject reaches the integration calls a
view makes, and a denial becomes a 402 with the Cycles error body while the provider receives nothing."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from integ_helpers import ONE_STORE, reservations

from cycles.client import CyclesClient, CyclesConfig
from cycles.integrations.openai import instrument

pytestmark = ONE_STORE

ASK = [{"role": "user", "content": "Say hi."}]


@pytest.fixture
def untenanted(tenant, tmp_path: Path):
    """A Cycles client with no default tenant: the subject must come from the request."""
    c = CyclesClient(CyclesConfig(base_url=tenant.server.base_url, api_key=tenant.key,
                                  journal_dir=str(tmp_path / "journal")))
    yield c
    c.close()


def llm(fake, cl):
    return instrument(openai.OpenAI(base_url=fake.base_url + "/v1", api_key="sk-test", max_retries=0),
                      cycles_client=cl)


def check_denied(resp, tenant, fake) -> None:
    assert resp.status_code == 402
    body = resp.json() if callable(resp.json) else resp.json  # flask: a property
    assert body["error"] == "BUDGET_EXCEEDED" and body["reason_code"] == "BUDGET_EXCEEDED" and body["message"]
    assert fake.count() == 0 and reservations(tenant) == []


# ---------------------------------------------------------------- ASGI (Starlette)


def starlette_app(client):
    from starlette.applications import Starlette
    from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
    from starlette.middleware import Middleware
    from starlette.middleware.authentication import AuthenticationMiddleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from cycles.integrations.asgi import CyclesMiddleware

    class Bearer(AuthenticationBackend):
        async def authenticate(self, conn):
            auth = conn.headers.get("authorization", "")
            return (AuthCredentials(["user"]), SimpleUser(auth[7:])) if auth.startswith("Bearer ") else None

    def ask(request):  # a sync endpoint: Starlette runs it in a worker thread, the subject goes along
        r = client.chat.completions.create(model="gpt-4o-mini", messages=ASK, max_tokens=20)
        return JSONResponse({"text": r.choices[0].message.content})

    return Starlette(routes=[Route("/ask", ask)],
                     middleware=[Middleware(AuthenticationMiddleware, backend=Bearer()), Middleware(CyclesMiddleware)])


def test_asgi_subject_from_header_and_user(tenant, untenanted, fake):
    from starlette.testclient import TestClient

    tenant.budget(amount=10**12)
    with TestClient(starlette_app(llm(fake, untenanted))) as http:
        r = http.get("/ask", headers={"X-Cycles-Tenant": tenant.tenant_id, "Authorization": "Bearer alice"})
    assert r.status_code == 200, r.text
    [res] = reservations(tenant)
    assert res["subject"] == {"tenant": tenant.tenant_id, "workspace": "alice"} and res["status"] == "COMMITTED"


def test_asgi_denial_is_a_402_with_the_cycles_body(tenant, untenanted, fake):
    from starlette.testclient import TestClient

    tenant.budget(amount=10)
    with TestClient(starlette_app(llm(fake, untenanted))) as http:
        check_denied(http.get("/ask", headers={"X-Cycles-Tenant": tenant.tenant_id}), tenant, fake)


# ---------------------------------------------------------------- Django

_django_client = {}


def ask_view(request):
    from django.http import JsonResponse

    r = _django_client["llm"].chat.completions.create(model="gpt-4o-mini", messages=ASK, max_tokens=20)
    return JsonResponse({"text": r.choices[0].message.content})


def django_subject(request):
    return {"tenant": request.headers.get("X-Tenant"), "app": "support-desk"}


urlpatterns: list = []


def django_client():
    import django
    from django.conf import settings

    if not settings.configured:
        from django.urls import path

        urlpatterns.append(path("ask", ask_view))
        settings.configure(DEBUG=False, SECRET_KEY="test", ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__,
                           MIDDLEWARE=["cycles.integrations.django.CyclesMiddleware"],
                           CYCLES_MIDDLEWARE={"subject": f"{__name__}.django_subject"})
        django.setup()
    from django.test import Client

    return Client()


def test_django_subject_and_denial(tenant, untenanted, fake):
    _django_client["llm"] = llm(fake, untenanted)
    http = django_client()
    tenant.budget(amount=10)
    check_denied(http.get("/ask", headers={"X-Tenant": tenant.tenant_id}), tenant, fake)
    assert tenant.fund("", "CREDIT", 10**12).status_code == 200
    r = http.get("/ask", headers={"X-Tenant": tenant.tenant_id})
    assert r.status_code == 200, r.content
    [res] = reservations(tenant)
    assert res["subject"] == {"tenant": tenant.tenant_id, "app": "support-desk"}


# ---------------------------------------------------------------- Flask


def test_flask_subject_and_denial(tenant, untenanted, fake):
    from flask import Flask, g, jsonify, request

    from cycles.integrations.flask import CyclesFlask

    app = Flask(__name__)
    client = llm(fake, untenanted)

    @app.before_request
    def load_user():
        g.user = request.headers.get("X-User")

    CyclesFlask(app)

    @app.get("/ask")
    def ask():
        r = client.chat.completions.create(model="gpt-4o-mini", messages=ASK, max_tokens=20)
        return jsonify(text=r.choices[0].message.content)

    http = app.test_client()
    tenant.budget(amount=10)
    check_denied(http.get("/ask", headers={"X-Cycles-Tenant": tenant.tenant_id}), tenant, fake)
    assert tenant.fund("", "CREDIT", 10**12).status_code == 200
    r = http.get("/ask", headers={"X-Cycles-Tenant": tenant.tenant_id, "X-User": "bob"})
    assert r.status_code == 200
    [res] = reservations(tenant)
    assert res["subject"] == {"tenant": tenant.tenant_id, "workspace": "bob"}
