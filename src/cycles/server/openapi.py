"""OpenAPI 3.1 document built from the route table and the wire models, so it cannot drift."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from .. import __version__
from ..protocol import models as m
from .routes import OPS


def build() -> dict[str, Any]:
    types: list[type] = [m.ErrorResponse, m.HealthResponse]
    for op in OPS:
        if op.request is not None:
            types.append(op.request)
        types += [t for t in op.responses.values() if t is not None]
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    refs = dict(zip(types, schemas))
    error = {"description": "Error", "content": {"application/json": {"schema": refs[m.ErrorResponse]}}}
    paths: dict[str, Any] = {}
    for op in OPS:
        item: dict[str, Any] = {
            "operationId": op.operation_id, "summary": op.summary, "tags": [op.tag],
            "security": [{name: []} for name in op.security],
            "responses": {str(code): {"description": "OK", "content": {"application/json": {"schema": refs[t]}}}
                          for code, t in op.responses.items() if t is not None},
        }
        for code in ("400", "401", "403", "404", "409", "410", "500", "503"):
            item["responses"].setdefault(code, error)
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string", "maxLength": 128}}
                  for n in re.findall(r"{(\w+)}", op.path)]
        for name, typ, desc in op.query:
            schema = {"type": "string", "format": "date-time"} if typ == "date-time" else {"type": typ}
            params.append({"name": name, "in": "query", "required": False, "schema": schema, "description": desc})
        if op.request is not None and op.method in ("POST", "PATCH", "PUT"):
            params.append({"name": "X-Idempotency-Key", "in": "header", "required": False,
                           "schema": {"type": "string", "maxLength": 256}})
            item["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[op.request]}}}
        if params:
            item["parameters"] = params
        paths.setdefault(op.path, {})[op.method.lower()] = item
    paths["/actuator/health"] = {"get": {
        "operationId": "health", "summary": "Liveness and store reachability", "tags": ["Operations"], "security": [],
        "responses": {"200": {"description": "UP", "content": {"application/json": {"schema": refs[m.HealthResponse]}}},
                      "503": {"description": "DOWN", "content": {"application/json": {"schema": refs[m.HealthResponse]}}}}}}
    paths["/actuator/health/readiness"] = {"get": {**paths["/actuator/health"]["get"], "operationId": "readiness"}}
    paths["/actuator/health/liveness"] = {"get": {
        "operationId": "liveness", "summary": "The process answers (the store is not consulted)",
        "tags": ["Operations"], "security": [],
        "responses": {"200": {"description": "UP", "content": {"application/json": {"schema": refs[m.HealthResponse]}}}}}}
    paths["/metrics"] = {"get": {"operationId": "metrics", "summary": "Prometheus metrics", "tags": ["Operations"],
                                 "security": [], "responses": {"200": {"description": "text exposition format"}}}}
    paths["/openapi.json"] = {"get": {"operationId": "openapi", "summary": "This document", "tags": ["Operations"],
                                      "security": [], "responses": {"200": {"description": "OpenAPI 3.1"}}}}
    paths["/docs"] = {"get": {"operationId": "docs", "summary": "Interactive API documentation",
                              "tags": ["Operations"], "security": [], "responses": {"200": {"description": "HTML"}}}}
    paths["/dashboard"] = {"get": {"operationId": "dashboard",
                                   "summary": "The operator dashboard (HTML; its assets under /dashboard/static/; "
                                              "absent with `cycles serve --no-dashboard`)",
                                   "tags": ["Dashboard"], "security": [], "responses": {"200": {"description": "HTML"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Cycles runtime budget authority", "version": __version__,
                 "description": "Implements cycles-protocol-v0 (runtime) and the provisioning part of the "
                                "governance admin API."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-Cycles-API-Key"},
                "AdminKeyAuth": {"type": "apiKey", "in": "header", "name": "X-Admin-API-Key"},
            },
        },
    }
