"""The WalListener CRD: generated from the spec model, structural, valid, its CEL rules, the examples."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from listener.config import env_names
from wal_operator.crd import VALIDATIONS, build_crd, crd_yaml, json_schema, to_json_schema
from wal_operator.spec import KIND, SpecError, parse_spec

REPO = Path(__file__).resolve().parent.parent
CRD_FILE = REPO / "crds" / "walListener.yaml"
CHART_CRD = REPO / "charts" / "wal-listener-operator" / "crds" / "walListener.yaml"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
K8S_VERSION = "1.30.0"


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for key, sub in node.get("properties", {}).items():
            yield from _walk(sub, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            yield from _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from _walk(node["additionalProperties"], f"{path}{{}}")


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _listeners() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p.name}:{d['metadata']['name']}", d) for p in EXAMPLES for d in _documents(p) if d["kind"] == KIND]


# -- the file, the chart's copy, validity -----------------------------------------------------------


def test_crd_file_is_generated_from_the_model() -> None:
    assert CRD_FILE.read_text() == crd_yaml(), "run: wal-operator crd > crds/walListener.yaml"


def test_chart_ships_the_same_crd() -> None:
    assert CHART_CRD.read_text() == CRD_FILE.read_text(), "copy crds/walListener.yaml into the chart's crds/"


def test_crd_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate.validate(yaml.safe_load(CRD_FILE.read_text()), K8S_VERSION, strict=True)


def test_schema_is_structural() -> None:
    for path, node in _walk(_schema()):
        assert "$ref" not in node and "anyOf" not in node and "oneOf" not in node, path
        typed = (
            "type" in node or node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        )
        assert typed, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        if "default" in node:
            jsonschema.validate(node["default"], to_json_schema({k: v for k, v in node.items() if k != "default"}))


def test_crd_has_what_kubectl_shows() -> None:
    crd = build_crd()
    names = crd["spec"]["names"]
    assert names["kind"] == "WalListener" and "wl" in names["shortNames"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert {"Broker", "Slot", "Ready", "Lag", "Age"} <= set(columns)
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'


def test_no_secret_can_be_written_inline() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    assert "password" not in spec["database"]["properties"]
    assert "passwordSecretRef" in spec["database"]["properties"]
    assert "sentryDSN" not in spec["monitoring"]["properties"]
    assert "transformsHashKey" not in spec["listener"]["properties"]
    for broker in ("nats", "kafka", "rabbitmq"):
        assert "password" not in spec["publisher"]["properties"][broker]["properties"]


def test_listener_settings_come_from_the_listener_model() -> None:
    """spec.listener has every key of the listener's config section, with the listener's defaults; the one
    secret (the transforms' hash key) as a Secret reference."""
    from listener.config import ListenerConfig

    props = _schema()["properties"]["spec"]["properties"]["listener"]["properties"]
    aliases = {f.alias or n for n, f in ListenerConfig.model_fields.items()}
    assert set(props) == aliases - {"transformsHashKey"} | {"transformsHashKeySecretRef"}
    assert props["serverPort"]["default"] == ListenerConfig.model_fields["server_port"].default


# -- examples ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("label", "resource"), _listeners(), ids=[label for label, _ in _listeners()])
def test_examples_are_valid(label: str, resource: dict[str, Any]) -> None:
    jsonschema.validate(resource, json_schema())
    parse_spec(resource["spec"])
    for rule_path, rules in VALIDATIONS.items():
        node = _at(resource, rule_path)
        if node is None:
            continue
        for rule in rules:
            assert _cel(rule["rule"], node, node), f"{label}: {rule_path}: {rule['message']}"


def test_every_example_file_is_covered() -> None:
    assert len(EXAMPLES) >= 3
    assert {d["spec"]["publisher"]["type"] for _, d in _listeners()} == {"nats", "kafka", "rabbitmq", "google_pubsub"}


def test_schema_rejects_bad_resources() -> None:
    schema = json_schema()
    good = _listeners()[0][1]
    for mutate in (
        lambda r: r["spec"]["database"].update(password="inline"),
        lambda r: r["spec"]["publisher"].update(type="redis"),
        lambda r: r["spec"].update(reclaimPolicy="Keep"),
        lambda r: r["spec"]["listener"].update(filter={"tables": {"users": ["upsert"]}}),
        lambda r: r["spec"]["listener"].update(serverPort=70000),
        lambda r: r["spec"].pop("database"),
    ):
        bad = copy.deepcopy(good)
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


# -- CEL --------------------------------------------------------------------------------------------


def _at(resource: dict[str, Any], path: str) -> Any:
    node: Any = resource
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _cel(rule: str, value: Any, old: Any) -> bool:
    env = celpy.Environment()
    program = env.program(env.compile(rule))
    activation = {"self": celpy.json_to_cel(value), "oldSelf": celpy.json_to_cel(old)}
    return bool(program.evaluate(activation))


def _rule(path: str) -> str:
    return VALIDATIONS[path][0]["rule"]


@pytest.mark.parametrize("field", ["slotName", "publicationName"])
def test_cel_names_are_immutable(field: str) -> None:
    rule = _rule(f"spec.listener.{field}")
    assert _cel(rule, "orders", "orders")
    assert not _cel(rule, "orders_v2", "orders")


@pytest.mark.parametrize(
    ("publisher", "ok"),
    [
        ({"type": "nats", "nats": {"address": "n:4222"}}, True),
        ({"type": "kafka", "kafka": {"address": "k:9092"}}, True),
        ({"type": "rabbitmq", "rabbitmq": {"address": "amqp://r"}}, True),
        ({"type": "google_pubsub", "googlePubSub": {"pubSubProjectID": "p"}}, True),
        ({"type": "kafka", "nats": {"address": "n:4222"}}, False),  # block does not match the type
        ({"type": "nats"}, False),  # no block
        ({"type": "nats", "nats": {"address": "n"}, "kafka": {"address": "k"}}, False),  # two blocks
        ({"type": "google_pubsub", "nats": {"address": "n"}}, False),
    ],
)
def test_cel_exactly_one_broker_block(publisher: dict[str, Any], ok: bool) -> None:
    value = {"topic": "t", **publisher}
    assert _cel(_rule("spec.publisher"), value, value) is ok
    # the operator's model agrees with the CEL rule
    spec = {
        "listener": {"slotName": "s"},
        "database": {"name": "d", "user": "u"},
        "publisher": value,
    }
    if ok:
        parse_spec(spec)
    else:
        with pytest.raises(SpecError):
            parse_spec(spec)


@pytest.mark.parametrize(
    ("database", "ok"),
    [
        ({"user": "u"}, True),
        ({"userSecretRef": {"name": "s", "key": "k"}}, True),
        ({"user": "", "userSecretRef": {"name": "s", "key": "k"}}, True),
        ({"user": "u", "userSecretRef": {"name": "s", "key": "k"}}, False),
        ({}, False),
    ],
)
def test_cel_user_or_user_secret(database: dict[str, Any], ok: bool) -> None:
    value = {"name": "d", **database}
    assert _cel(_rule("spec.database"), value, value) is ok


# -- spec model details -----------------------------------------------------------------------------


def test_secrets_become_wal_env_from_secret_refs() -> None:
    resource = dict(_listeners())["nats.yaml:shop-orders"]
    spec = parse_spec(resource["spec"])
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in spec.env()}
    assert env == {
        env_names(("database", "password"))[0]: {"name": "shop-db", "key": "password"},
        env_names(("database", "user"))[0]: {"name": "shop-db", "key": "username"},
    }
    file = spec.config_file()
    assert "user" not in file["database"] and "password" not in file["database"]


def test_google_credentials_are_mounted() -> None:
    from wal_operator.render import Owner, deployment

    spec = parse_spec(dict(_listeners())["google-pubsub.yaml:events-to-pubsub"]["spec"])
    dep = deployment(spec, Owner("events", "ns", "uid-1"), "img")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["GOOGLE_APPLICATION_CREDENTIALS"]["value"].endswith("/key.json")
    assert env["WAL_MONITORING_SENTRYDSN"]["valueFrom"]["secretKeyRef"] == {"name": "sentry", "key": "dsn"}
    assert any(v.get("secret", {}).get("secretName") == "pubsub-sa" for v in dep["spec"]["template"]["spec"]["volumes"])


def test_event_format_and_messages_reach_the_listener_config() -> None:
    """publisher.format, publisher.cloudEvents and listener.messages of a resource are the listener's own."""
    listeners = dict(_listeners())
    debezium = parse_spec(listeners["kafka-debezium-outbox.yaml:shop-debezium"]["spec"]).config_file()
    assert debezium["publisher"]["format"] == "debezium" and debezium["publisher"]["messageKeyFrom"] == "orderId"
    assert debezium["publisher"]["debezium"] == {"schemas": True} and debezium["publisher"]["tombstones"] is True
    assert debezium["listener"]["messages"] == {"prefixes": ["orders.events"]}
    cloudevents = parse_spec(listeners["kafka-debezium-outbox.yaml:shop-cloudevents"]["spec"]).config_file()
    assert cloudevents["publisher"]["format"] == "cloudevents"
    assert cloudevents["publisher"]["cloudEvents"] == {"mode": "binary", "source": "//shop-db/shop"}
    with pytest.raises(SpecError, match=r"spec\.listener\.messages\.prefixes"):
        parse_spec({**listeners["kafka-debezium-outbox.yaml:shop-debezium"]["spec"],
                    "listener": {"slotName": "s", "messages": {"prefixes": ["a b"]}}})


def test_rendered_children_are_valid_kubernetes_objects() -> None:
    from wal_operator.render import Owner, configmap, deployment, service

    for _label, resource in _listeners():
        spec = parse_spec(resource["spec"])
        owner = Owner(resource["metadata"]["name"], "ns", "0b5e-uid")
        for obj in (configmap(spec, owner), deployment(spec, owner, "img:1"), service(spec, owner)):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_spec_errors_name_the_key() -> None:
    with pytest.raises(SpecError, match=r"spec\.listener\.slotName"):
        parse_spec(
            {
                "listener": {"slotName": "Bad-Name"},
                "database": {"name": "d", "user": "u"},
                "publisher": {"type": "nats", "topic": "t", "nats": {"address": "n"}},
            }
        )
    with pytest.raises(SpecError, match="passwordSecretRef"):
        parse_spec(
            {
                "listener": {"slotName": "s"},
                "database": {"name": "d", "user": "u", "password": "x"},
                "publisher": {"type": "nats", "topic": "t", "nats": {"address": "n"}},
            }
        )
    with pytest.raises(SpecError, match="pubSubProjectID"):  # the listener's own rule, via Config
        parse_spec(
            {
                "listener": {"slotName": "s"},
                "database": {"name": "d", "user": "u"},
                "publisher": {"type": "google_pubsub", "topic": "t", "googlePubSub": {}},
            }
        )


def test_every_field_has_a_description() -> None:
    """`kubectl explain wallistener.spec...` has something to say about every field."""
    fields = [(path, node) for path, node in _walk(_schema()) if path and not path.endswith(("[]", "}"))]
    assert len(fields) > 100
    assert [path for path, node in fields if not node.get("description")] == []


# -- what reaches SQL -------------------------------------------------------------------------------


def _with_publication_table(table: dict[str, Any]) -> dict[str, Any]:
    resource = copy.deepcopy(dict(_listeners())["nats.yaml:shop-orders"])
    resource["spec"]["publication"] = {"tables": [table]}
    return resource


@pytest.mark.parametrize(
    ("table", "field", "crd_refuses"),
    [
        ({"name": "orders", "where": "status = 'paid'); CREATE TABLE pwned(x int); --"}, "where", True),
        ({"name": "orders", "where": "true) , TABLE secrets WHERE (true"}, "where", False),
        ({"name": "orders", "where": "status = 'paid' /* ) */"}, "where", True),
        ({"name": 'orders"; DROP TABLE orders; --'}, "name", True),
        ({"name": "orders", "columns": ["id", 'total"); DROP TABLE orders; --']}, "columns", True),
    ],
    ids=["statement", "unbalanced", "comment", "table-name", "column-name"],
)
def test_sql_injection_is_refused(table: dict[str, Any], field: str, crd_refuses: bool) -> None:
    resource = _with_publication_table(table)
    where = table.get("where", "")
    by_schema = True
    try:
        jsonschema.validate(resource, json_schema())
    except jsonschema.ValidationError:
        by_schema = False
    by_cel = not where or _cel(_rule("spec.publication.tables[].where"), where, where)
    assert (not (by_schema and by_cel)) is crd_refuses  # the API server's part, where a pattern can tell
    with pytest.raises(SpecError, match=rf"spec\.publication\.tables\.0\.{field}"):
        parse_spec(resource["spec"])  # the operator refuses every one of them


@pytest.mark.parametrize("key", ['users"; DROP TABLE users; --', "a.b.c", "users;"])
def test_filter_keys_must_be_table_names(key: str) -> None:
    resource = copy.deepcopy(dict(_listeners())["nats.yaml:shop-orders"])
    resource["spec"]["listener"]["filter"] = {"tables": {key: ["insert"]}}
    with pytest.raises(SpecError, match=r"spec\.listener\.filter\.tables"):
        parse_spec(resource["spec"])


def test_tls_secrets_are_mounted_read_only_and_named_in_the_config() -> None:
    from wal_operator.render import Owner, configmap, deployment

    resource = copy.deepcopy(dict(_listeners())["nats.yaml:shop-orders"])
    ref = {"name": "pg-tls", "key": "ca.crt"}
    resource["spec"]["database"].update(
        sslMode="verify-full",
        tls={"caSecretRef": ref, "certSecretRef": {"name": "pg-client", "key": "tls.crt"},
             "keySecretRef": {"name": "pg-client", "key": "tls.key"}},
    )
    resource["spec"]["publisher"]["nats"]["tls"] = {"caSecretRef": {"name": "nats-ca", "key": "ca.pem"}}
    spec = parse_spec(resource["spec"])
    owner = Owner("shop", "ns", "uid-1")
    pod = deployment(spec, owner, "img")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    db_sources = volumes["database-tls"]["projected"]["sources"]
    items = {(s["secret"]["name"], s["secret"]["items"][0]["key"], s["secret"]["items"][0]["path"]) for s in db_sources}
    assert items == {
        ("pg-tls", "ca.crt", "ca.crt"),
        ("pg-client", "tls.crt", "tls.crt"),
        ("pg-client", "tls.key", "tls.key"),
    }
    assert volumes["database-tls"]["projected"]["defaultMode"] == 0o440
    assert mounts["database-tls"] == {
        "name": "database-tls", "mountPath": "/var/run/secrets/wal-listener/tls/database", "readOnly": True,
    }
    assert mounts["publisher-tls"]["readOnly"] is True
    config = yaml.safe_load(configmap(spec, owner)["data"]["config.yml"])
    assert config["database"]["sslRootCert"] == "/var/run/secrets/wal-listener/tls/database/ca.crt"
    assert config["database"]["sslKey"] == "/var/run/secrets/wal-listener/tls/database/tls.key"
    assert config["publisher"]["caCert"] == "/var/run/secrets/wal-listener/tls/publisher/ca.crt"
    assert config["publisher"]["enableTLS"] is True
    assert "tls" not in config["database"] and "tls" not in config["publisher"]


@pytest.mark.parametrize(
    "tls",
    [{"certSecretRef": {"name": "c", "key": "tls.crt"}}, {}],
    ids=["cert-without-key", "empty"],
)
def test_tls_needs_a_ca_or_a_key_pair(tls: dict[str, Any]) -> None:
    resource = copy.deepcopy(dict(_listeners())["nats.yaml:shop-orders"])
    resource["spec"]["database"]["tls"] = tls
    with pytest.raises(SpecError, match=r"spec\.database\.tls"):
        parse_spec(resource["spec"])


def test_a_file_path_in_the_spec_is_refused() -> None:
    resource = copy.deepcopy(dict(_listeners())["nats.yaml:shop-orders"])
    resource["spec"]["database"]["sslRootCert"] = "/etc/ssl/ca.crt"
    with pytest.raises(SpecError, match=r"database\.tls"):
        parse_spec(resource["spec"])


def test_metrics_need_a_port_of_their_own() -> None:
    resource = copy.deepcopy(dict(_listeners())["nats.yaml:shop-orders"])
    resource["spec"]["monitoring"] = {"promAddr": ":8080"}
    with pytest.raises(SpecError, match=r"spec\.monitoring\.promAddr"):
        parse_spec(resource["spec"])


@pytest.mark.parametrize(
    ("name", "ok"), [("shop_orders", True), ("wal-listener", True), ('a"b', False), ("a,b", False)]
)
def test_publication_names_are_plain(name: str, ok: bool) -> None:
    rule = VALIDATIONS["spec.listener.publicationName"][1]["rule"]
    assert _cel(rule, name, name) is ok
    resource = copy.deepcopy(dict(_listeners())["nats.yaml:shop-orders"])
    resource["spec"]["listener"]["publicationName"] = name
    if ok:
        parse_spec(resource["spec"])
    else:
        with pytest.raises(SpecError, match=r"spec\.listener\.publicationName"):
            parse_spec(resource["spec"])


def test_each_broker_block_has_every_setting_of_that_broker() -> None:
    """The blocks are the listener's own broker settings (a hand-kept list had drifted: lingerMs)."""
    from listener.config import GooglePubSubSettings, KafkaSettings, NatsSettings, RabbitMQSettings

    blocks = _schema()["properties"]["spec"]["properties"]["publisher"]["properties"]
    for block, settings in (
        ("nats", NatsSettings),
        ("kafka", KafkaSettings),
        ("rabbitmq", RabbitMQSettings),
        ("googlePubSub", GooglePubSubSettings),
    ):
        aliases = {f.alias or n for n, f in settings.model_fields.items()}
        assert aliases <= set(blocks[block]["properties"]), block
    assert "lingerMs" in blocks["googlePubSub"]["properties"]
