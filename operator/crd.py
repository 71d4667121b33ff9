"""The WalListener CustomResourceDefinition, generated from the spec model.

``crds/walListener.yaml`` and the chart's copy are this module's output (``wal-operator crd``); a
test keeps them equal, so the schema the API server enforces can never drift from the model the
operator (and through it, the listener) validates with.

The pydantic JSON schema is turned into a *structural* OpenAPI v3 schema: references inlined,
``Optional`` as ``nullable``, secrets (``SecretStr``) left out, free-form maps as
``x-kubernetes-preserve-unknown-fields``, ``int | str`` as ``x-kubernetes-int-or-string``.
"""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import yaml
from pydantic import TypeAdapter

from listener.config import format_duration
from wal_operator.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    WalListenerSpec,
)

_DROP_KEYS = {"title", "additionalProperties", "writeOnly", "format", "examples"}

#: CEL rules, by the dotted path of the schema node they sit on.
VALIDATIONS: dict[str, list[dict[str, str]]] = {
    "spec.listener.slotName": [
        {"rule": "self == oldSelf", "message": "listener.slotName is immutable; create a new WalListener instead"}
    ],
    "spec.listener.publicationName": [
        {
            "rule": "self == oldSelf",
            "message": "listener.publicationName is immutable; create a new WalListener instead",
        }
    ],
    "spec.publisher": [
        {
            "rule": "(self.type == 'nats') == has(self.nats)"
            " && (self.type == 'kafka') == has(self.kafka)"
            " && (self.type == 'rabbitmq') == has(self.rabbitmq)"
            " && (self.type == 'google_pubsub') == has(self.googlePubSub)",
            "message": "set exactly one broker block and it must match publisher.type "
            "(nats: nats, kafka: kafka, rabbitmq: rabbitmq, google_pubsub: googlePubSub)",
        }
    ],
    "spec.database": [
        {
            "rule": "(has(self.user) && self.user != '') != has(self.userSecretRef)",
            "message": "set exactly one of database.user and database.userSecretRef",
        }
    ],
}

#: fields the CRD marks x-kubernetes-preserve-unknown-fields (pod settings passed through as-is)
_FREE_FORM_OBJECTS = {"spec.pod.affinity", "spec.pod.tolerations[]"}

_DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$|^[0-9]+(\.[0-9]+)?$"


def _structural(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[1]]
        merged = {**copy.deepcopy(target), **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs, path)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(options) == 1:
            # null is pruned by the API server (no ``nullable``), which the model reads as "not set"
            return _structural({**options[0], **rest}, defs, path)
        types = {o.get("type") for o in options}
        if types == {"string", "integer"}:
            either: dict[str, Any] = {k: v for k, v in rest.items() if k == "description"}
            either["x-kubernetes-int-or-string"] = True
            return either
        raise ValueError(f"{path}: cannot express {node} in a structural schema")

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS or key == "$defs":
            continue
        out[key] = value
    kind = node.get("type")
    if node.get("format") == "duration":
        out["type"] = "string"
        out["pattern"] = _DURATION_PATTERN
        if isinstance(out.get("default"), str):
            out["default"] = format_duration(TypeAdapter(timedelta).validate_python(out["default"]))
    if isinstance(out.get("description"), str):
        out["description"] = out["description"].replace("``", "`")
    if kind == "object" or "properties" in node:
        out["type"] = "object"
        props = node.get("properties")
        if props is not None:
            out["properties"] = {}
            for name, sub in props.items():
                if sub.get("format") == "password":
                    continue  # a secret: the spec takes a reference instead
                out["properties"][name] = _structural(sub, defs, f"{path}.{name}")
            if node.get("required"):
                out["required"] = [r for r in node["required"] if r in out["properties"]]
        elif path in _FREE_FORM_OBJECTS:
            out["x-kubernetes-preserve-unknown-fields"] = True
        else:
            extra = node.get("additionalProperties")
            if isinstance(extra, dict) and extra:
                out["additionalProperties"] = _structural(extra, defs, f"{path}{{}}")
            else:
                out["x-kubernetes-preserve-unknown-fields"] = True
    if kind == "array":
        out["items"] = _structural(node.get("items", {}), defs, f"{path}[]")
    if "default" in out and isinstance(out["default"], dict | list):
        del out["default"]
    if "default" in out and out["default"] is None:
        del out["default"]
    if path in VALIDATIONS:
        out["x-kubernetes-validations"] = VALIDATIONS[path]
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def spec_schema() -> dict[str, Any]:
    raw = WalListenerSpec.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema = _structural(raw, defs, "spec")
    schema["description"] = "What to stream, from which database, to which broker; see docs/operator.md."
    return schema


def _condition_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string"},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": {"type": "integer"},
        },
    }


def status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "What the operator found and did; see docs/operator.md.",
        "properties": {
            "observedGeneration": {"type": "integer"},
            "phase": {"type": "string", "description": "Short summary: Ready, Progressing, Failed, Conflict, ..."},
            "configHash": {"type": "string"},
            "conditions": {
                "type": "array",
                "items": _condition_schema(),
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "slot": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "exists": {"type": "boolean"},
                    "active": {"type": "boolean"},
                    "confirmedLSN": {"type": "string"},
                    "restartLSN": {"type": "string"},
                    "walStatus": {"type": "string", "description": "reserved, extended, unreserved or lost"},
                    "retainedWALBytes": {"type": "integer", "format": "int64"},
                    "lagBytes": {"type": "integer", "format": "int64"},
                    "lag": {"type": "string", "description": "lagBytes for humans"},
                    "checkedAt": {"type": "string", "format": "date-time"},
                },
            },
            "publication": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "allTables": {"type": "boolean"},
                    "tables": {"type": "array", "items": {"type": "string"}},
                    "createdByOperator": {"type": "boolean"},
                },
            },
        },
    }


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict."""
    ready = '.status.conditions[?(@.type=="Ready")]'
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["cdc"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Broker", "type": "string", "jsonPath": ".spec.publisher.type"},
                        {"name": "Slot", "type": "string", "jsonPath": ".spec.listener.slotName"},
                        {"name": "Ready", "type": "string", "jsonPath": f"{ready}.status"},
                        {"name": "Lag", "type": "string", "jsonPath": ".status.slot.lag"},
                        {"name": "WAL", "type": "string", "jsonPath": ".status.slot.walStatus", "priority": 1},
                        {"name": "Reason", "type": "string", "jsonPath": f"{ready}.reason", "priority": 1},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A PostgreSQL logical-replication slot streamed to a message broker.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = "# Generated by `wal-operator crd` from wal_operator.spec; do not edit by hand.\n"


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, allow_unicode=True, width=100)
