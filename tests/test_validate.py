"""Offline validation for GitOps pipelines: `wal-operator validate`, and the CRD as JSON Schema in the layout
kubeconform and the YAML language server read (kubeconform itself is not installable here — not on PyPI,
Debian or npm — so its lookup of a schema file is reproduced and the file checked with jsonschema)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from wal_operator.crd import JSON_SCHEMA_PATH, json_schema_text
from wal_operator.spec import KIND

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = REPO / "schemas"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
#: kubeconform -schema-location 'schemas/{{.Group}}/{{.ResourceKind}}_{{.ResourceAPIVersion}}.json'
KUBECONFORM_LOCATION = "{Group}/{ResourceKind}_{ResourceAPIVersion}.json"


def _kubeconform_schema(doc: dict[str, Any]) -> Path | None:
    """The schema file kubeconform opens for a document with the location above (None: a core kind, which
    kubeconform takes from its default location)."""
    group, _, version = str(doc["apiVersion"]).rpartition("/")
    if not group:
        return None
    return SCHEMAS / KUBECONFORM_LOCATION.format(
        Group=group, ResourceKind=str(doc["kind"]).lower(), ResourceAPIVersion=version
    )


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _listener() -> dict[str, Any]:
    (doc,) = [d for d in _docs(REPO / "examples" / "nats.yaml") if d["kind"] == KIND]
    return doc


def test_the_json_schema_file_is_generated_from_the_crd() -> None:
    assert (SCHEMAS / JSON_SCHEMA_PATH).read_text() == json_schema_text(), (
        f"run: wal-operator crd --json-schema > schemas/{JSON_SCHEMA_PATH}"
    )


def test_kubeconform_finds_the_schema_and_every_example_passes() -> None:
    checked = 0
    for path in EXAMPLES:
        for doc in _docs(path):
            location = _kubeconform_schema(doc)
            if location is None:
                continue
            assert location.exists(), f"{path.name}: kubeconform would look for {location}"
            jsonschema.Draft7Validator(json.loads(location.read_text())).validate(doc)
            checked += 1
    assert checked >= 5


def test_the_schema_file_refuses_what_the_api_server_refuses() -> None:
    schema = json.loads((SCHEMAS / JSON_SCHEMA_PATH).read_text())
    jsonschema.Draft7Validator.check_schema(schema)  # the YAML language server reads draft-07
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    for mutate in (
        lambda r: r["spec"]["listener"].update(serverPort=70000),
        lambda r: r["spec"]["listener"].update(slotNmae="typo"),  # unknown fields: the API server prunes them
        lambda r: r["spec"]["publisher"].update(type="redis"),
        lambda r: r.update(kind="WalListner"),
    ):
        bad = copy.deepcopy(_listener())
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft7Validator(schema).validate(bad)


BAD = """\
apiVersion: wal-listener.io/v1alpha1
kind: WalListener
metadata: {name: bad}
spec:
  listener: {slotName: Bad-Slot, serverPort: 70000}
  database: {name: shop, user: u, userSecretRef: {name: s, key: k}}
  publisher: {type: kafka, topic: t, nats: {address: "n:4222"}}
  publication:
    tables:
      - {name: orders, where: "status = 'x' -- comment"}
---
apiVersion: v1
kind: Secret
metadata: {name: not-checked-here}
---
apiVersion: wal-listener.io/v1alpha1
kind: WalListener
metadata: {name: breakout}
spec:
  listener: {slotName: ok}
  database: {name: shop, user: u}
  publisher: {type: nats, topic: t, nats: {address: "n:4222"}}
  publication:
    tables:
      - {name: orders, where: "true) , TABLE secrets WHERE (true"}
"""


def _validate(*files: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wal_operator", "validate", *files], capture_output=True, text=True)


def test_validate_passes_the_examples() -> None:
    run = _validate(*map(str, EXAMPLES))
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout == "" and f"{KIND} resource(s) in {len(EXAMPLES)} file(s): valid" in run.stderr


def test_validate_names_every_problem_on_its_own_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    run = _validate(str(bad), str(tmp_path / "missing.yaml"))
    assert run.returncode == 1
    label = f"{bad}: WalListener/"
    assert run.stdout.splitlines() == [
        f"{label}bad: spec.listener.serverPort: 70000 is greater than the maximum of 65535",  # the schema
        f"{label}bad: spec.publisher: set exactly one broker block and it must match publisher.type "  # CEL
        "(nats: nats, kafka: kafka, rabbitmq: rabbitmq, google_pubsub: googlePubSub)",
        f"{label}bad: spec.publication.tables.0.where: a row filter must not contain SQL comments (-- or /*)",
        f"{label}bad: spec.database: set exactly one of database.user and database.userSecretRef",
        # the operator's own checks: what the schema cannot say, not what it already said
        f"{label}bad: spec.listener.slotName: must be 1-63 characters of lower-case letters, digits and underscores",
        f"{label}breakout: spec.publication.tables.0.where: the row filter has an unmatched ')'",
        f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory",
    ]
