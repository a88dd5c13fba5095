"""The protocol documents packaged with the kit (spec/, Apache-2.0, see spec/LICENSE) and response
validation against the schemas they declare for each operation and status."""

from __future__ import annotations

import functools
import hashlib
import re
from importlib import resources
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

PROTOCOL = "cycles-protocol-v0.yaml"
ADMIN = "cycles-governance-admin-v0.1.25.yaml"
DOCS = (PROTOCOL, ADMIN)  # an operation the runtime spec declares wins over the admin re-declaration


def spec_text(name: str) -> str:
    return resources.files("cycles.conformance").joinpath("spec", name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def document(name: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(spec_text(name), Loader=loader)  # noqa: S506 (a safe loader)


def doc_version(name: str) -> str:
    return str(document(name)["info"]["version"])


def digest(name: str) -> str:
    return hashlib.sha256(spec_text(name).replace("\r\n", "\n").encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def _registry() -> Registry:
    resources_ = [(name, Resource.from_contents(document(name), default_specification=DRAFT202012)) for name in DOCS]
    return Registry().with_resources(resources_)


@functools.lru_cache(maxsize=None)
def _validator(ref: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": ref}, registry=_registry())


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def _template_match(template: str, path: str) -> bool:
    pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
    return re.match(pattern, path) is not None


def find_operation(method: str, template: str) -> tuple[str, dict[str, Any]] | None:
    """(document name, operation object) for `method template`, e.g. ("post", "/v1/reservations")."""
    for name in DOCS:
        op = document(name).get("paths", {}).get(template, {}).get(method.lower())
        if op is not None:
            return name, op
    return None


def response_schema_ref(method: str, template: str, status: int) -> str | None:
    """A `$ref` URI naming the JSON schema the spec declares for this response, None when it declares none."""
    found = find_operation(method, template)
    if found is None:
        return None
    name, op = found
    responses = op.get("responses", {})
    key = str(status) if str(status) in responses else f"{str(status)[0]}XX" if f"{str(status)[0]}XX" in responses \
        else "default" if "default" in responses else None
    if key is None:
        return None
    response = responses[key]
    pointer = f"/paths/{_escape(template)}/{method.lower()}/responses/{key}"
    if "$ref" in response:
        pointer = response["$ref"].lstrip("#")
        response = _resolve(document(name), pointer)
    if "application/json" not in response.get("content", {}):
        return None
    return f"{name}#{pointer}/content/application~1json/schema"


def schema_ref(name: str, schema: str) -> str:
    return f"{name}#/components/schemas/{schema}"


def _resolve(doc: dict[str, Any], pointer: str) -> Any:
    node: Any = doc
    for part in pointer.strip("/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def errors_against(ref: str, instance: Any, limit: int = 5) -> list[str]:
    """Validation errors of `instance` against the schema `ref` names, as short readable lines."""
    out = []
    for err in sorted(_validator(ref).iter_errors(instance), key=lambda e: list(e.absolute_path))[:limit]:
        where = "/".join(str(p) for p in err.absolute_path) or "(body)"
        out.append(f"{where}: {err.message[:300]}")
    return out


def schema_enum(name: str, schema: str) -> list[str]:
    return list(document(name)["components"]["schemas"][schema]["enum"])


def match_template(method: str, path: str) -> str | None:
    """The spec path template that `path` instantiates (longest literal match first)."""
    candidates = []
    for name in DOCS:
        for template, ops in document(name).get("paths", {}).items():
            if method.lower() in ops and _template_match(template, path):
                candidates.append(template)
    candidates.sort(key=lambda t: (t.count("{"), -len(t)))
    return candidates[0] if candidates else None
