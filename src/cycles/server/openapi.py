"""OpenAPI 3.1 document built from the route table and the wire models, so it cannot drift.

The document states what the server enforces, so a schema-driven fuzzer's valid requests are accepted:
query parameters carry their enums, ranges and lengths (`routes.py` describes them compactly, see
`param_schema`), integers are int64 literals, the subject needs one level, scopes follow the grammar,
every authenticated operation can answer 429 with `Retry-After`, and links chain an operation that
returns an id to the operations that take it in their path (reserve → get/commit/release/extend).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import msgspec

from .. import __version__
from ..core import events as E
from ..core.scopes import LEVELS
from ..protocol import models as m
from .routes import OPS, WEBHOOK_EVENT_TYPE as EVENT_TYPE, Op

_VALUE = r"[a-zA-Z0-9_.-]{1,128}"
# A budget scope: tenant:<id>, then optional levels in the order workspace → toolset, each at most once.
TENANT_SCOPE_PATTERN = f"^tenant:{_VALUE}" + "".join(f"(/{level}:{_VALUE})?" for level in LEVELS[1:]) + "$"
TENANT_SCOPE = {"type": "string", "maxLength": 1024, "pattern": TENANT_SCOPE_PATTERN,
                "description": "A scope: tenant:<tenant_id>, then level:value segments joined by '/' in the order "
                               + " → ".join(LEVELS[1:]) + ", each at most once; values match ^[a-zA-Z0-9_.-]+$."}

# ISO 8601 as the server reads it (Python's datetime.fromisoformat; UTC when no offset is given).
_TIME = r"(?:[T ]\d{2}(?::\d{2}(?::\d{2}(?:[.,]\d+)?)?)?(?:Z|[+-]\d{2}(?::?\d{2})?)?)?"
DATE_TIME = {"type": "string", "pattern": r"^\s*(?:\d{4}-\d{2}-\d{2}" + _TIME + r")?\s*$",
             "description": "ISO 8601 date or date-time such as 2026-01-01T00:00:00Z (UTC when no offset is given); "
                            "blank means unset"}
# Request bodies the server refuses unless one of these fields carries a value (None: any field).
AT_LEAST_ONE: dict[str, tuple[str, ...] | None] = {
    "ApiKeyUpdateRequest": None, "PolicyUpdateRequest": None, "BudgetUpdateRequest": None,
    "TenantBulkFilter": ("status", "parent_tenant_id", "search"),
    "WebhookBulkFilter": ("tenant_id", "status", "event_type", "search"),
}
# Fields optional in the model that the handler requires all the same.
ALSO_REQUIRED: dict[str, tuple[str, ...]] = {"BudgetBulkActionRequest": ("amount",)}

INTEGER_NOTE = ("Integers are JSON integer literals within int64 (129, never 129.0 or 1.29e2): a value with a "
                "fraction or an exponent is refused with 400 INVALID_REQUEST, whatever its numeric value.")
RETRY_AFTER = {"description": "Seconds to wait before retrying (delta-seconds form only).", "required": True,
               "schema": {"type": "integer", "format": "int64", "minimum": 0}}
ADMIN_ONLY_NOTE = " Required with the admin key (X-Admin-API-Key)."


def param_schema(typ: Any) -> dict[str, Any]:
    """The JSON schema of a query parameter declared in the route table.

    `typ` is one of: "string" (at most 256 characters, the server's default), "string:N" (at most N), "text"
    (unbounded),
    "integer", "int:LO..HI", "boolean", "date-time", "tenant-scope" (a budget scope,
    tenant:<id>/...), a tuple of allowed values (an enum), or a JSON schema dict."""
    if isinstance(typ, dict):
        return copy.deepcopy(typ)
    if isinstance(typ, (tuple, list)):
        return {"type": "string", "enum": list(typ)}
    if typ == "string":
        return {"type": "string", "maxLength": 256}
    if typ == "text":  # any length: e.g. a parameter that a tenant key's requests ignore unread
        return {"type": "string"}
    if typ.startswith("string:"):
        return {"type": "string", "maxLength": int(typ[7:])}
    if typ == "integer":
        return {"type": "integer", "format": "int64"}
    if typ.startswith("int:"):
        lo, hi = typ[4:].split("..")
        return {"type": "integer", "format": "int64", "minimum": int(lo), "maximum": int(hi)}
    if typ == "boolean":
        return {"type": "boolean"}
    if typ == "date-time":
        return copy.deepcopy(DATE_TIME)
    if typ == "tenant-scope":
        return copy.deepcopy(TENANT_SCOPE)
    raise ValueError(f"unknown query parameter type {typ!r}")


def query_parameter(spec: tuple[Any, ...]) -> dict[str, Any]:
    """(name, type, description[, need]) → an OpenAPI parameter; need is "required" or "admin"
    (required with the admin key, which OpenAPI cannot state per security scheme: said in the
    description and as x-required-with)."""
    name, typ, desc = spec[:3]
    need = spec[3] if len(spec) > 3 else None
    schema = param_schema(typ)
    if need != "required":  # the server reads an empty value as absent
        if "enum" in schema:
            schema["enum"].append("")
        elif (schema.get("type") != "string" or "format" in schema or "pattern" in schema) and schema != DATE_TIME:
            schema = {"anyOf": [schema, {"type": "string", "maxLength": 0}]}
    param: dict[str, Any] = {"name": name, "in": "query", "required": need == "required",
                             "schema": schema, "description": desc}
    if need == "admin":
        param["description"] = (desc + "." if desc and not desc.endswith(".") else desc) + ADMIN_ONLY_NOTE
        param["x-required-with"] = ["AdminKeyAuth"]
    elif need not in (None, "required"):
        raise ValueError(f"unknown need {need!r} for {name}")
    return param


def _walk(node: Any, fn: Any) -> None:
    if isinstance(node, dict):
        fn(node)
        for value in node.values():
            _walk(value, fn)
    elif isinstance(node, list):
        for value in node:
            _walk(value, fn)


def _strict_integer(node: dict[str, Any]) -> None:
    if node.get("type") == "integer" and "format" not in node:
        node["format"] = "int64"


def _refine_components(components: dict[str, Any]) -> None:
    """What msgspec's schema export cannot say but the decoders enforce."""
    _walk(components, _strict_integer)
    subject = components.get("Subject")
    if subject is not None:  # the server refuses a subject without any level (400)
        subject["anyOf"] = [{"required": [level], "properties": {level: {"type": "string"}}} for level in LEVELS]
        subject["description"] = "At least one of " + ", ".join(LEVELS) + " is required (a non-null value)."
    for name, fields in AT_LEAST_ONE.items():
        schema = components.get(name)
        if schema is None:
            continue
        branches = []
        for field in fields or tuple(schema.get("properties", {})):
            value: dict[str, Any] = {"not": {"type": "null"}}
            if field == "search":  # blank counts as absent
                value = {"type": "string", "pattern": "\\S"}
            branches.append({"required": [field], "properties": {field: value}})
        schema["anyOf"] = branches
        schema["description"] = "At least one of " + ", ".join(fields or schema["properties"]) + " must be given."
    for name, fields in ALSO_REQUIRED.items():
        if name in components:
            components[name]["required"] = sorted(set(components[name].get("required", [])) | set(fields))
    for name, schema in components.items():
        props = schema.get("properties", {})
        if name.endswith(("Request", "Filter")):
            for field, prop in props.items():
                if field == "event_type":
                    props[field] = {"anyOf": [EVENT_TYPE, {"type": "null"}]} if "anyOf" in prop else EVENT_TYPE
                elif field in ("event_types", "event_categories"):
                    item = EVENT_TYPE if field == "event_types" else {"type": "string", "enum": list(E.CATEGORIES)}
                    for branch in prop.get("anyOf", [prop]):
                        if branch.get("type") == "array":
                            branch["items"] = item
        for field in ("scope",):
            if name.endswith("Request") and props.get(field, {}).get("type") == "string":
                props[field] = {**props[field], "pattern": TENANT_SCOPE_PATTERN,
                                "description": TENANT_SCOPE["description"]}


def _success_id_fields(op: Op, refs: dict[type, Any], components: dict[str, Any]) -> dict[str, bool]:
    """Top-level `*_id` fields of an operation's 2xx response bodies (candidates for links): name →
    whether every such body carries it."""
    fields: dict[str, bool] = {}
    for code, typ in op.responses.items():
        if typ is None or not 200 <= code < 300:
            continue
        ref = refs[typ].get("$ref", "")
        schema = components.get(ref.rsplit("/", 1)[-1], {})
        for name in schema.get("properties", {}):
            if name.endswith("_id"):
                fields[name] = fields.get(name, True) and name in schema.get("required", [])
    return fields


def _links(ops: tuple[Op, ...], refs: dict[type, Any], components: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """operationId → links: an operation whose success body has an `x_id` field links to each operation
    whose path parameters are all `x_id` fields of that body, with a security scheme in common. A field
    the body may lack links only below the source's own path (a create and its resource, e.g. a
    reservation, which a dry run does not make), so links never point at ids a response left out."""
    out: dict[str, dict[str, Any]] = {}
    for source in ops:
        fields = _success_id_fields(source, refs, components)
        if not fields:
            continue
        links: dict[str, Any] = {}
        for target in ops:
            names = re.findall(r"{(\w+)}", target.path)
            if not names or not set(names) <= set(fields) or target is source:
                continue
            if not all(fields[n] for n in names) and not target.path.startswith(source.path + "/"):
                continue
            if target.security and not set(source.security) & set(target.security):
                continue
            links[target.operation_id] = {
                "operationId": target.operation_id,
                "parameters": {n: f"$response.body#/{n}" for n in names},
            }
        if links:
            out[source.operation_id] = links
    return out


def _error(refs: dict[type, Any], description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    resp: dict[str, Any] = {"description": description,
                            "content": {"application/json": {"schema": refs[m.ErrorResponse]}}}
    if headers:
        resp["headers"] = headers
    return resp


def build() -> dict[str, Any]:
    types: list[type] = [m.ErrorResponse, m.HealthResponse]
    for op in OPS:
        if op.request is not None:
            types.append(op.request)
        types += [t for t in op.responses.values() if t is not None]
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    _refine_components(components)
    refs = dict(zip(types, schemas))
    errors = {
        "400": _error(refs, "Invalid request (INVALID_REQUEST, UNIT_MISMATCH, WEBHOOK_URL_INVALID, …)"),
        "401": _error(refs, "Missing, unknown, revoked or expired key"),
        "403": _error(refs, "The key may not do this (FORBIDDEN, INSUFFICIENT_PERMISSIONS)"),
        "404": _error(refs, "Not found"),
        "409": _error(refs, "Conflict: budget, idempotency, lifecycle state"),
        "410": _error(refs, "The reservation expired"),
        "429": _error(refs, "Rate limited (LIMIT_EXCEEDED): too many failed authentication attempts from this "
                            "address or for this key prefix, or too many requests to a public operation",
                      {"Retry-After": RETRY_AFTER, "X-RateLimit-Reset": {
                          "description": "Unix time (seconds) when the limit resets", "required": False,
                          "schema": {"type": "integer", "format": "int64", "minimum": 0}}}),
        "500": _error(refs, "Internal error"),
        "503": _error(refs, "The store is unavailable, or the connection cap is reached; retry",
                      {"Retry-After": {**RETRY_AFTER, "required": False}}),
    }
    links = _links(OPS, refs, components)
    paths: dict[str, Any] = {}
    for op in OPS:
        responses: dict[str, Any] = {}
        for code, t in op.responses.items():
            resp: dict[str, Any] = {"description": "OK"}
            if t is not None:
                resp["content"] = {"application/json": {"schema": refs[t]}}
            if links.get(op.operation_id) and 200 <= code < 300:
                resp["links"] = links[op.operation_id]
            responses[str(code)] = resp
        for code, resp in errors.items():
            if code == "429" and not (op.security or op.throttled):
                continue
            responses.setdefault(code, resp)
        item: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary, "tags": [op.tag],
                                "security": [{name: []} for name in op.security], "responses": responses}
        params = [{"name": n, "in": "path", "required": True,
                   "schema": {"type": "string", "minLength": 1, "maxLength": 128}}
                  for n in re.findall(r"{(\w+)}", op.path)]
        params += [query_parameter(spec) for spec in op.query]
        if op.request is not None and op.method in ("POST", "PATCH", "PUT"):
            body_schema = components.get(refs[op.request].get("$ref", "").rsplit("/", 1)[-1], {})
            if "idempotency_key" in body_schema.get("properties", {}):
                params.append({"name": "X-Idempotency-Key", "in": "header", "required": False,
                               "description": "Optional; when sent it must equal the body's idempotency_key "
                                              "(else 400 INVALID_REQUEST).",
                               "schema": {"type": "string", "minLength": 1, "maxLength": 256}})
            item["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[op.request]}}}
        if params:
            item["parameters"] = params
        paths.setdefault(op.path, {})[op.method.lower()] = item
    health = {"content": {"application/json": {"schema": refs[m.HealthResponse]}}}
    paths["/actuator/health"] = {"get": {
        "operationId": "health", "summary": "Liveness and store reachability", "tags": ["Operations"], "security": [],
        "responses": {"200": {"description": "UP", **health}, "503": {"description": "DOWN", **health}}}}
    paths["/actuator/health/readiness"] = {"get": {**paths["/actuator/health"]["get"], "operationId": "readiness"}}
    paths["/actuator/health/liveness"] = {"get": {
        "operationId": "liveness", "summary": "The process answers (the store is not consulted)",
        "tags": ["Operations"], "security": [], "responses": {"200": {"description": "UP", **health}}}}
    paths["/metrics"] = {"get": {"operationId": "metrics", "summary": "Prometheus metrics", "tags": ["Operations"],
                                 "security": [], "responses": {"200": {"description": "text exposition format",
                                                                       "content": {"text/plain": {}}}}}}
    paths["/openapi.json"] = {"get": {"operationId": "openapi", "summary": "This document", "tags": ["Operations"],
                                      "security": [], "responses": {"200": {"description": "OpenAPI 3.1",
                                                                            "content": {"application/json": {}}}}}}
    paths["/docs"] = {"get": {"operationId": "docs", "summary": "Interactive API documentation",
                              "tags": ["Operations"], "security": [],
                              "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}}}}
    paths["/dashboard"] = {"get": {"operationId": "dashboard",
                                   "summary": "The operator dashboard (HTML; its assets under /dashboard/static/; "
                                              "absent with `cycles serve --no-dashboard`)",
                                   "tags": ["Dashboard"], "security": [],
                                   "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Cycles runtime budget authority", "version": __version__,
                 "description": "Implements cycles-protocol-v0 (runtime) and the provisioning part of the "
                                "governance admin API. " + INTEGER_NOTE + " A tenant key acts on its own tenant "
                                "only: a tenant or tenant_id it names must be its own (else 403), and creates "
                                "take the tenant from the key. Parameters marked x-required-with: [AdminKeyAuth] "
                                "are required when the admin key is used."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-Cycles-API-Key"},
                "AdminKeyAuth": {"type": "apiKey", "in": "header", "name": "X-Admin-API-Key"},
            },
        },
    }
