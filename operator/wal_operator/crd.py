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

from listener.catalog import PUBLICATION_NAME_PATTERN
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
        },
        {
            "rule": f"self.matches('{PUBLICATION_NAME_PATTERN}')",
            "message": "listener.publicationName: 1-63 letters, digits, '_' and '-' (not starting with '-')",
        },
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
    "spec.publication.tables[].where": [
        {
            "rule": "!self.contains('--') && !self.contains('/*')",
            "message": "a row filter must not contain SQL comments (-- or /*)",
        }
    ],
    "spec.backfills[].where": [
        {
            "rule": "!self.contains('--') && !self.contains('/*')",
            "message": "a backfill filter must not contain SQL comments (-- or /*)",
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


def _field(kind: str, description: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "description": description, **extra}


def _condition_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "One step of the reconcile (see docs/operator.md for each type and reason).",
        "required": ["type", "status"],
        "properties": {
            "type": _field("string", "SpecValid, Conflict, DatabaseReachable, PublicationReady, SlotReady, "
                           "DeploymentReady, or Ready (all steps True)."),
            "status": _field("string", "True, False or Unknown.", enum=["True", "False", "Unknown"]),
            "reason": _field("string", "Why, in one CamelCase word (e.g. InvalidSpec, PodNotReady)."),
            "message": _field("string", "What happened and what to do, for people."),
            "lastTransitionTime": _field("string", "When status last changed.", format="date-time"),
            "observedGeneration": _field("integer", "The metadata.generation this condition was computed for."),
        },
    }


def status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "What the operator found and did; see docs/operator.md.",
        "properties": {
            "observedGeneration": _field("integer", "The metadata.generation the operator last reconciled."),
            "phase": _field("string", "Short summary: Ready, or the reason of the first step that is not ready."),
            "configHash": _field("string", "Hash of the rendered config.yml (also on the pod template)."),
            "conditions": {
                "type": "array",
                "description": "One condition per reconcile step, plus Ready.",
                "items": _condition_schema(),
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "slot": {
                "type": "object",
                "description": "The replication slot as PostgreSQL reports it, refreshed every status interval.",
                "properties": {
                    "name": _field("string", "Slot name (spec.listener.slotName)."),
                    "exists": _field("boolean", "Whether the slot exists in the database."),
                    "active": _field("boolean", "Whether a listener is reading the slot right now."),
                    "confirmedLSN": _field("string", "The position the listener confirmed (published and acked)."),
                    "restartLSN": _field("string", "The oldest WAL position the slot still needs."),
                    "walStatus": _field("string", "reserved, extended, unreserved or lost"),
                    "retainedWALBytes": _field(
                        "integer", "WAL the slot keeps on the server's disk (current LSN - restartLSN).", format="int64"
                    ),
                    "lagBytes": _field(
                        "integer", "WAL not yet confirmed by the listener (current LSN - confirmedLSN).", format="int64"
                    ),
                    "lag": _field("string", "lagBytes for humans"),
                    "lagSeconds": _field(
                        "number",
                        "How far behind the listener is in time (pg_stat_replication flush_lag); absent while "
                        "nobody reads the slot.",
                    ),
                    "failover": _field(
                        "boolean",
                        "PostgreSQL 17+: the slot has FAILOVER on, so standbys with sync_replication_slots keep "
                        "a copy that a promoted standby resumes from.",
                    ),
                    "checkedAt": _field("string", "When the slot was last read.", format="date-time"),
                },
            },
            "backfill": _field("string", "The latest backfill: name, state and progress (printer column)."),
            "backfills": {
                "type": "array",
                "description": "The backfills of the slot (spec.backfills, the initial snapshot, resnapshots).",
                "items": {
                    "type": "object",
                    "description": "One backfill as the listener reports it in wal_listener.backfills.",
                    "properties": {
                        "name": _field("string", "The backfill's name."),
                        "state": _field("string", "requested, running, done or failed."),
                        "tables": {"type": "array", "description": "The tables asked for.",
                                   "items": {"type": "string"}},
                        "rowsDone": _field("integer", "Rows published and acknowledged.", format="int64"),
                        "rowsEstimated": _field("integer", "The planner's estimate of the rows.", format="int64"),
                        "startedAt": _field("string", "When the listener started it.", format="date-time"),
                        "finishedAt": _field("string", "When it ended.", format="date-time"),
                        "error": _field("string", "Why it failed."),
                    },
                },
            },
            "publication": {
                "type": "object",
                "description": "The publication the listener streams.",
                "properties": {
                    "name": _field("string", "Publication name (spec.listener.publicationName)."),
                    "allTables": _field("boolean", "FOR ALL TABLES."),
                    "tables": {
                        "type": "array",
                        "description": "The schema-qualified tables of the publication.",
                        "items": {"type": "string"},
                    },
                    "createdByOperator": _field(
                        "boolean", "Created by this resource (then altered and dropped by it only)."
                    ),
                    "tablesWithoutIdentity": {
                        "type": "array",
                        "description": "Tables the publication publishes updates or deletes of that have no replica "
                        "identity: the application's UPDATE and DELETE on them fail (checked by the status timer).",
                        "items": {"type": "string"},
                    },
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
                        {
                            "name": "Lag-Seconds",
                            "type": "number",
                            "jsonPath": ".status.slot.lagSeconds",
                            "priority": 1,
                        },
                        {"name": "WAL", "type": "string", "jsonPath": ".status.slot.walStatus", "priority": 1},
                        {"name": "Backfill", "type": "string", "jsonPath": ".status.backfill", "priority": 1},
                        {"name": "Reason", "type": "string", "jsonPath": f"{ready}.reason", "priority": 1},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A PostgreSQL logical-replication slot streamed to a message broker.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": _field("string", "wal-listener.io/v1alpha1"),
                                "kind": _field("string", "WalListener"),
                                "metadata": _field("object", "Standard object metadata."),
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


#: where kubeconform (``-schema-location '{{.Group}}/{{.ResourceKind}}_{{.ResourceAPIVersion}}.json'``) and the
#: CRDs-catalog layout look for the resource's JSON Schema, relative to a schema folder
JSON_SCHEMA_PATH = f"{API_GROUP}/{KIND.lower()}_{API_VERSION}.json"


def to_json_schema(node: Any) -> Any:
    """A structural OpenAPI schema (node) as JSON Schema: unknown fields refused (the API server prunes
    them), int-or-string as both types, the ``x-kubernetes-*`` extensions (CEL rules among them) left out."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if out.get("type") == "object" and "properties" in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def json_schema() -> dict[str, Any]:
    """The resource's schema as JSON Schema (draft-07), for kubeconform and the YAML language server."""
    schema: dict[str, Any] = to_json_schema(build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"]["enum"] = [f"{API_GROUP}/{API_VERSION}"]
    schema["properties"]["kind"]["enum"] = [KIND]
    return {"$schema": "http://json-schema.org/draft-07/schema#", "title": KIND, **schema}


def json_schema_text() -> str:
    import json

    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


HEADER = "# Generated by `wal-operator crd` from wal_operator.spec; do not edit by hand.\n"


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, allow_unicode=True, width=100)
