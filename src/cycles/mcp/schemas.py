"""JSON schemas of the MCP tools, and the wire ⇄ tool (snake_case ⇄ camelCase) mapping.

Output schemas are *derived* from the wire models in `cycles.protocol.models` (the one definition of
the wire format), camelCased, with `additionalProperties: false` on every object the protocol
defines. Tool results are produced from the same models by `to_tool`, so every field we return is
declared by construction (the published TypeScript server declared a narrower schema than it
returned and broke strict clients on `remainingTtlMs`). Free-form maps (`metadata`,
`committedMetadata`, `metrics.custom`, `subject.dimensions`) keep their keys untouched.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from msgspec import inspect as mi

from ..protocol import models as m

LEVELS = ("tenant", "workspace", "app", "workflow", "agent", "toolset")
UNITS = list(m.UNITS)
OVERAGE_POLICIES = ["REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT"]
STATUSES = ["ACTIVE", "COMMITTED", "RELEASED", "EXPIRED"]
INT64_MAX = m.INT64_MAX


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# ---------------------------------------------------------------- output: derived from the wire models


def _schema(info: Any) -> dict[str, Any]:
    if isinstance(info, mi.StructType):
        props: dict[str, Any] = {}
        required: list[str] = []
        for f in info.fields:
            key = camel(f.encode_name)
            props[key] = _schema(f.type)
            if f.required:
                required.append(key)
        out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
        if required:
            out["required"] = required
        return out
    if isinstance(info, mi.UnionType):
        # Absent optional fields are omitted, never sent as null, so None is not part of the schema.
        options = [_schema(t) for t in info.types if not isinstance(t, mi.NoneType)]
        return options[0] if len(options) == 1 else {"anyOf": options}
    if isinstance(info, mi.LiteralType):
        return {"type": "string", "enum": list(info.values)}
    if isinstance(info, mi.IntType):
        out = {"type": "integer"}
        if info.ge is not None:
            out["minimum"] = info.ge
        return out
    if isinstance(info, mi.StrType):
        return {"type": "string"}
    if isinstance(info, mi.BoolType):
        return {"type": "boolean"}
    if isinstance(info, mi.ListType):
        return {"type": "array", "items": _schema(info.item_type)}
    if isinstance(info, mi.DictType):
        value = _schema(info.value_type)
        return {"type": "object", **({"additionalProperties": value} if value else {})}
    if isinstance(info, mi.AnyType):
        return {}
    raise TypeError(f"no JSON schema mapping for {info!r}")


def output_schema(model: type) -> dict[str, Any]:
    return _schema(mi.type_info(model))


def _camel_value(value: Any, info: Any) -> Any:
    if isinstance(info, mi.StructType) and isinstance(value, dict):
        fields = {f.encode_name: f for f in info.fields}
        return {camel(k): _camel_value(v, fields[k].type) if k in fields else v for k, v in value.items()}
    if isinstance(info, mi.UnionType):
        for t in info.types:
            if isinstance(t, mi.StructType) and isinstance(value, dict):
                return _camel_value(value, t)
            if isinstance(t, mi.ListType) and isinstance(value, list):
                return _camel_value(value, t)
        return value
    if isinstance(info, mi.ListType) and isinstance(value, list):
        return [_camel_value(v, info.item_type) for v in value]
    return value  # scalars and free-form maps are kept as they are


def to_tool(obj: msgspec.Struct) -> dict[str, Any]:
    """A wire response as the tool's structuredContent (camelCase, absent fields omitted)."""
    return _camel_value(msgspec.to_builtins(obj), mi.type_info(type(obj)))


# ---------------------------------------------------------------- input: what the agent sends (camelCase)

SUBJECT_VALUE = {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[a-zA-Z0-9_.-]+$"}
KEY = {"type": "string", "minLength": 1, "maxLength": 256,
       "description": "Caller-chosen idempotency key. Reuse the SAME key when retrying the same operation; "
                      "a new key means a new operation."}
RESERVATION_ID = {"type": "string", "minLength": 1, "maxLength": 128}
METADATA = {"type": "object", "description": "Free-form metadata stored with the operation."}


def _obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = required
    out.update(extra)
    return out


def _int(lo: int = 0, hi: int = INT64_MAX, **extra: Any) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi, **extra}


SUBJECT = _obj({
    **{level: SUBJECT_VALUE for level in LEVELS},
    "dimensions": {"type": "object", "maxProperties": 16, "propertyNames": {"minLength": 1, "maxLength": 64},
                   "additionalProperties": {"type": "string", "maxLength": 256}},
}, description="Who is spending: at least one of tenant, workspace, app, workflow, agent, toolset "
               "(missing levels are filled from CYCLES_TENANT … CYCLES_TOOLSET).")
ACTION = _obj({
    "kind": {"type": "string", "maxLength": 64, "description": "e.g. llm.completion, tool.search, email.send"},
    "name": {"type": "string", "maxLength": 256, "description": "e.g. the model or tool name"},
    "tags": {"type": "array", "maxItems": 10, "items": {"type": "string", "maxLength": 64}},
}, ["kind", "name"], description="What is being paid for.")
AMOUNT = _obj({"unit": {"type": "string", "enum": UNITS}, "amount": _int()}, ["unit", "amount"],
              description="An integer amount; USD_MICROCENTS are 10^-6 cents (1 USD = 100 000 000).")
METRICS = _obj({
    "tokensInput": _int(), "tokensOutput": _int(), "latencyMs": _int(),
    "modelVersion": {"type": "string", "maxLength": 128}, "custom": {"type": "object"},
})
OVERAGE = {"type": "string", "enum": OVERAGE_POLICIES}
FILTERS = {level: {"type": "string", "minLength": 1, "maxLength": 128} for level in LEVELS}
PAGE = {"limit": _int(1, 200), "cursor": {"type": "string"}}

INPUTS: dict[str, dict[str, Any]] = {
    "cycles_reserve": _obj({
        "idempotencyKey": KEY, "subject": SUBJECT, "action": ACTION, "estimate": AMOUNT,
        "ttlMs": _int(1000, 86_400_000, description="Lease length; the server default (60 s) when omitted."),
        "gracePeriodMs": _int(0, 60_000), "overagePolicy": OVERAGE,
        "dryRun": {"type": "boolean", "description": "Evaluate only: nothing is held."}, "metadata": METADATA,
    }, ["idempotencyKey", "action", "estimate"]),
    "cycles_commit": _obj({
        "reservationId": RESERVATION_ID, "idempotencyKey": KEY, "actual": AMOUNT, "metrics": METRICS,
        "metadata": METADATA,
    }, ["reservationId", "idempotencyKey", "actual"]),
    "cycles_release": _obj({
        "reservationId": RESERVATION_ID, "idempotencyKey": KEY, "reason": {"type": "string", "maxLength": 256},
    }, ["reservationId", "idempotencyKey"]),
    "cycles_extend": _obj({
        "reservationId": RESERVATION_ID, "idempotencyKey": KEY, "extendByMs": _int(1, 86_400_000),
        "metadata": METADATA,
    }, ["reservationId", "idempotencyKey", "extendByMs"]),
    "cycles_decide": _obj({
        "idempotencyKey": KEY, "subject": SUBJECT, "action": ACTION, "estimate": AMOUNT, "metadata": METADATA,
    }, ["idempotencyKey", "action", "estimate"]),
    "cycles_check_balance": _obj({**FILTERS, "includeChildren": {"type": "boolean"}, **PAGE}),
    "cycles_list_reservations": _obj({
        "status": {"type": "string", "enum": STATUSES}, "idempotencyKey": {"type": "string", "minLength": 1,
                                                                          "maxLength": 256},
        **FILTERS, **PAGE,
    }),
    "cycles_get_reservation": _obj({"reservationId": RESERVATION_ID}, ["reservationId"]),
    "cycles_create_event": _obj({
        "idempotencyKey": KEY, "subject": SUBJECT, "action": ACTION, "actual": AMOUNT, "overagePolicy": OVERAGE,
        "metrics": METRICS, "clientTimeMs": _int(), "metadata": METADATA,
    }, ["idempotencyKey", "action", "actual"]),
}

OUTPUT_MODELS: dict[str, type] = {
    "cycles_reserve": m.ReservationCreateResponse,
    "cycles_commit": m.CommitResponse,
    "cycles_release": m.ReleaseResponse,
    "cycles_extend": m.ReservationExtendResponse,
    "cycles_decide": m.DecisionResponse,
    "cycles_check_balance": m.BalanceResponse,
    "cycles_list_reservations": m.ReservationListResponse,
    "cycles_get_reservation": m.ReservationDetail,
    "cycles_create_event": m.EventCreateResponse,
}
OUTPUTS: dict[str, dict[str, Any]] = {name: output_schema(model) for name, model in OUTPUT_MODELS.items()}


# ---------------------------------------------------------------- tool arguments → wire bodies

_FREE_FORM = ("metadata", "custom", "dimensions")


def wire_args(value: Any) -> Any:
    """camelCase argument keys → snake_case wire keys, recursively, except inside free-form maps."""
    if isinstance(value, dict):
        return {snake(k): (v if k in _FREE_FORM else wire_args(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [wire_args(v) for v in value]
    return value
