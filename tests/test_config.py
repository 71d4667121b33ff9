"""Loading the configuration: YAML file + WAL_ environment overrides, and one-line errors."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from listener.config import Action, Config, PublisherType, load_config
from listener.errors import ConfigError

# the shape of the Go original's config_example.yml (camelCase keys)
SEED_EXAMPLE = """\
listener:
  slotName: myslot_1
  refreshConnection: 30s
  heartbeatInterval: 10s
  filter:
    tables:
      seasons:
        - insert
        - update
  topicsMap:
    schema_table_name: "notifier"
logger:
  level: info
  fmt: json
database:
  host: localhost
  port: 5432
  name: my_db
  user: postgres
  password: postgres
  debug: false
publisher:
  type: nats
  address: localhost:4222
  topic: "wal_listener"
  topicPrefix: ""
monitoring:
  sentryDSN: "dsn string"
  promAddr: ":2112"
"""

MINIMAL = """\
listener:
  slotName: myslot_1
database:
  name: my_db
  user: postgres
publisher:
  type: nats
  address: localhost:4222
  topic: wal_listener
"""

SECRET = "hunter2-Sup3r-s3cret"


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str], Path]:
    def write_config(text: str) -> Path:
        path = tmp_path / "config.yml"
        path.write_text(text, encoding="utf-8")
        return path

    return write_config


def error_of(path: Path | None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ or {})
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


# -- loading -----------------------------------------------------------------------------------------------


def test_seed_example_loads(write: Callable[[str], Path]) -> None:
    cfg = load_config(write(SEED_EXAMPLE), {})
    assert cfg.listener.slot_name == "myslot_1"
    assert cfg.listener.refresh_connection == timedelta(seconds=30)
    assert cfg.listener.heartbeat_interval == timedelta(seconds=10)
    assert cfg.listener.filter.tables == {"seasons": [Action.INSERT, Action.UPDATE]}
    assert cfg.listener.topics_map == {"schema_table_name": "notifier"}
    assert (cfg.logger.level, cfg.logger.fmt) == ("info", "json")
    assert (cfg.database.host, cfg.database.port, cfg.database.name, cfg.database.user) == (
        "localhost",
        5432,
        "my_db",
        "postgres",
    )
    assert cfg.database.password.get_secret_value() == "postgres"
    assert cfg.database.debug is False
    assert cfg.publisher.type is PublisherType.NATS
    assert (cfg.publisher.address, cfg.publisher.topic, cfg.publisher.topic_prefix) == (
        "localhost:4222",
        "wal_listener",
        "",
    )
    assert cfg.monitoring.sentry_dsn.get_secret_value() == "dsn string"
    assert cfg.monitoring.prom_addr == ":2112"


def test_defaults_of_a_minimal_file(write: Callable[[str], Path]) -> None:
    cfg = load_config(write(MINIMAL), {})
    assert cfg.listener.filter.tables is None  # everything is published
    assert cfg.listener.server_port == 8080
    assert cfg.database.ssl_mode == "prefer"
    assert cfg.listener.on_error == "halt"


def test_no_unknown_key_warnings_for_the_seed_example(write: Callable[[str], Path]) -> None:
    warnings: list[str] = []
    load_config(write(SEED_EXAMPLE), {}, warnings)
    assert warnings == []


def test_snake_case_and_other_spellings_map_onto_keys(write: Callable[[str], Path]) -> None:
    text = """\
LISTENER:
  slot_name: myslot_1
  refresh-connection: 5s
  TopicsMap: {public_users: notifier}
database:
  name: my_db
  user: postgres
  sslmode: verify-full
  enable_tls: true
publisher:
  TYPE: kafka
  address: localhost:9092
  topic: wal
  topic_prefix: pre_
  ENABLETLS: true
monitoring:
  sentry_dsn: dsn
  prom_addr: ":9000"
"""
    warnings: list[str] = []
    cfg = load_config(write(text), {}, warnings)
    assert warnings == []
    assert cfg.listener.slot_name == "myslot_1"
    assert cfg.listener.refresh_connection == timedelta(seconds=5)
    assert cfg.listener.topics_map == {"public_users": "notifier"}
    assert cfg.database.ssl_mode == "verify-full"
    assert cfg.database.enable_tls is True
    assert cfg.publisher.type is PublisherType.KAFKA
    assert cfg.publisher.topic_prefix == "pre_"
    assert cfg.publisher.enable_tls is True
    assert cfg.monitoring.sentry_dsn.get_secret_value() == "dsn"
    assert cfg.monitoring.prom_addr == ":9000"


def test_enable_tls_raises_a_weak_sslmode_to_require(write: Callable[[str], Path]) -> None:
    cfg = load_config(write(MINIMAL.replace("  user: postgres\n", "  user: postgres\n  enableTLS: true\n")), {})
    assert cfg.database.ssl_mode == "require"


def test_filter_actions_are_case_insensitive(write: Callable[[str], Path]) -> None:
    text = MINIMAL.replace("  slotName: myslot_1\n", "  slotName: myslot_1\n  filter: {tables: {users: [INSERT]}}\n")
    assert load_config(write(text), {}).listener.filter.tables == {"users": [Action.INSERT]}


# -- environment overrides --------------------------------------------------------------------------------------


def test_env_overrides_a_key_in_the_file(write: Callable[[str], Path]) -> None:
    cfg = load_config(write(SEED_EXAMPLE), {"WAL_DATABASE_PORT": "5433", "WAL_DATABASE_HOST": "db.internal"})
    assert cfg.database.port == 5433
    assert cfg.database.host == "db.internal"


def test_env_overrides_keys_absent_from_the_file(write: Callable[[str], Path]) -> None:
    env = {
        "WAL_DATABASE_PORT": "5433",
        "WAL_PUBLISHER_TOPICPREFIX": "pre_",
        "WAL_LISTENER_SERVERPORT": "0",
        "WAL_DATABASE_PASSWORD": SECRET,
    }
    cfg = load_config(write(MINIMAL), env)
    assert cfg.database.port == 5433
    assert cfg.publisher.topic_prefix == "pre_"
    assert cfg.listener.server_port == 0
    assert cfg.database.password.get_secret_value() == SECRET


@pytest.mark.parametrize("name", ["WAL_LISTENER_SLOTNAME", "WAL_LISTENER_SLOT_NAME"])
def test_env_slot_name_both_spellings(write: Callable[[str], Path], name: str) -> None:
    assert load_config(write(MINIMAL), {name: "other_slot"}).listener.slot_name == "other_slot"


def test_env_creates_a_missing_section(write: Callable[[str], Path]) -> None:
    text = MINIMAL.split("database:")[0]  # only the listener section
    env = {
        "WAL_DATABASE_NAME": "db",
        "WAL_DATABASE_USER": "u",
        "WAL_PUBLISHER_TYPE": "rabbitmq",
        "WAL_PUBLISHER_ADDRESS": "amqp://localhost",
        "WAL_PUBLISHER_TOPIC": "ex",
        "WAL_LOGGER_LEVEL": "DEBUG",
    }
    cfg = load_config(write(text), env)
    assert (cfg.database.name, cfg.database.user) == ("db", "u")
    assert cfg.publisher.type is PublisherType.RABBITMQ
    assert cfg.logger.level == "debug"


def test_env_only_config_without_a_file() -> None:
    env = {
        "WAL_LISTENER_SLOTNAME": "s1",
        "WAL_DATABASE_NAME": "db",
        "WAL_DATABASE_USER": "u",
        "WAL_PUBLISHER_TYPE": "nats",
        "WAL_PUBLISHER_ADDRESS": "h:4222",
        "WAL_PUBLISHER_TOPIC": "t",
    }
    cfg = load_config(None, env)
    assert cfg.listener.slot_name == "s1"
    assert cfg.publisher.address == "h:4222"


def test_env_filter_tables_as_yaml(write: Callable[[str], Path]) -> None:
    env = {"WAL_LISTENER_FILTER_TABLES": "{users: [insert, update], public.orders: [delete]}"}
    cfg = load_config(write(MINIMAL), env)
    assert cfg.listener.filter.tables == {
        "users": [Action.INSERT, Action.UPDATE],
        "public.orders": [Action.DELETE],
    }


def test_env_filter_tables_replaces_the_files_filter(write: Callable[[str], Path]) -> None:
    env = {"WAL_LISTENER_FILTER_TABLES": "orders: [truncate]"}
    cfg = load_config(write(SEED_EXAMPLE), env)
    assert cfg.listener.filter.tables == {"orders": [Action.TRUNCATE]}


@pytest.mark.parametrize("name", ["WAL_LISTENER_TOPICSMAP", "WAL_LISTENER_TOPICS_MAP"])
def test_env_topics_map_as_yaml(write: Callable[[str], Path], name: str) -> None:
    cfg = load_config(write(MINIMAL), {name: "{public_users: notifier, shop_orders: orders}"})
    assert cfg.listener.topics_map == {"public_users": "notifier", "shop_orders": "orders"}


def test_env_bool(write: Callable[[str], Path]) -> None:
    assert load_config(write(MINIMAL), {"WAL_DATABASE_DEBUG": "true"}).database.debug is True


def test_unrelated_env_is_ignored(write: Callable[[str], Path]) -> None:
    cfg = load_config(write(MINIMAL), {"DATABASE_PORT": "1", "WAL_NOPE": "x", "WAL_DATABASE_PORTS": "2"})
    assert cfg.database.port == 5432


# -- durations ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("1m30s", timedelta(seconds=90)),
        ("500ms", timedelta(milliseconds=500)),
        ("1h", timedelta(hours=1)),
        ("1.5s", timedelta(seconds=1.5)),
        ("45", timedelta(seconds=45)),
        ("2.5", timedelta(seconds=2.5)),
    ],
)
def test_duration_from_env(write: Callable[[str], Path], value: str, expected: timedelta) -> None:
    cfg = load_config(write(MINIMAL), {"WAL_LISTENER_REFRESHCONNECTION": value})
    assert cfg.listener.refresh_connection == expected


@pytest.mark.parametrize(("value", "expected"), [("20", timedelta(seconds=20)), ("0.25", timedelta(seconds=0.25))])
def test_duration_as_yaml_number(write: Callable[[str], Path], value: str, expected: timedelta) -> None:
    text = MINIMAL.replace("  slotName: myslot_1\n", f"  slotName: myslot_1\n  heartbeatInterval: {value}\n")
    assert load_config(write(text), {}).listener.heartbeat_interval == expected


# -- errors: one line, the dotted key, the value, what is allowed ------------------------------------------------


def test_missing_required_key(write: Callable[[str], Path]) -> None:
    message = error_of(write(MINIMAL.replace("  name: my_db\n", "")))
    assert message.startswith("config: ")
    assert "database.name" in message
    assert "missing" in message
    assert "WAL_DATABASE_NAME" in message


def test_missing_section(write: Callable[[str], Path]) -> None:
    message = error_of(write(MINIMAL.split("publisher:")[0]))
    assert "publisher" in message
    assert "missing" in message


def test_wrong_type(write: Callable[[str], Path]) -> None:
    message = error_of(write(MINIMAL.replace("  user: postgres\n", "  user: postgres\n  port: abc\n")))
    assert "database.port" in message
    assert "'abc'" in message
    assert "integer" in message


def test_wrong_type_from_env(write: Callable[[str], Path]) -> None:
    message = error_of(write(MINIMAL), {"WAL_DATABASE_PORT": "abc"})
    assert "database.port" in message
    assert "'abc'" in message


def test_port_out_of_range(write: Callable[[str], Path]) -> None:
    message = error_of(write(MINIMAL), {"WAL_DATABASE_PORT": "70000"})
    assert "database.port" in message
    assert "70000" in message
    assert "65535" in message


def test_unknown_publisher_type(write: Callable[[str], Path]) -> None:
    message = error_of(write(MINIMAL.replace("type: nats", "type: redis")))
    assert "publisher.type" in message
    assert "'redis'" in message
    for allowed in ("nats", "kafka", "rabbitmq", "google_pubsub"):
        assert allowed in message


@pytest.mark.parametrize("slot", ["MySlot", "my-slot", "a" * 64, "slot name", ""])
def test_bad_slot_name(write: Callable[[str], Path], slot: str) -> None:
    message = error_of(write(MINIMAL), {"WAL_LISTENER_SLOTNAME": slot})
    assert "listener.slotName" in message
    assert repr(slot) in message
    assert "lower-case letters, digits and underscores" in message


def test_slot_name_of_63_characters_is_fine(write: Callable[[str], Path]) -> None:
    assert load_config(write(MINIMAL), {"WAL_LISTENER_SLOTNAME": "a" * 63}).listener.slot_name == "a" * 63


def test_malformed_yaml_says_line_and_column(write: Callable[[str], Path]) -> None:
    path = write("listener:\n  slotName: [unclosed\ndatabase: {name: x\n")
    message = error_of(path)
    assert str(path) in message
    assert "not valid YAML" in message
    assert "line " in message
    assert "column " in message


def test_malformed_yaml_line_number_is_the_right_one(write: Callable[[str], Path]) -> None:
    message = error_of(write("listener:\n  slotName: a\n  bad: : :\n"))
    assert "line 3" in message


def test_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yml"
    message = error_of(missing)
    assert str(missing) in message
    assert "not found" in message
    assert "--config" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(write: Callable[[str], Path], text: str) -> None:
    message = error_of(write(text))
    assert "mapping" in message


@pytest.mark.parametrize("section", ["listener: [1, 2]\n", "listener: text\n"])
def test_section_must_be_a_mapping(write: Callable[[str], Path], section: str) -> None:
    message = error_of(write(section + MINIMAL.split("\n", 2)[2]))
    assert "listener" in message
    assert "mapping" in message


def test_bad_filter_action(write: Callable[[str], Path]) -> None:
    message = error_of(write(MINIMAL), {"WAL_LISTENER_FILTER_TABLES": "{users: [insert, upsert]}"})
    assert "listener.filter.tables.users" in message
    assert "'upsert'" in message
    for allowed in ("insert", "update", "delete", "truncate"):
        assert allowed in message


@pytest.mark.parametrize("key", ["a.b.c", ".users", "public."])
def test_bad_filter_table_key(write: Callable[[str], Path], key: str) -> None:
    message = error_of(write(MINIMAL), {"WAL_LISTENER_FILTER_TABLES": f"{{'{key}': [insert]}}"})
    assert "listener.filter.tables" in message
    assert key in message


@pytest.mark.parametrize("value", ["30x", "abc", "-5s", "s", "10 seconds"])
def test_bad_duration(write: Callable[[str], Path], value: str) -> None:
    message = error_of(write(MINIMAL), {"WAL_LISTENER_REFRESHCONNECTION": value})
    assert "listener.refreshConnection" in message
    assert repr(value) in message
    assert "30s" in message and "1m30s" in message and "500ms" in message


def test_zero_duration_is_refused(write: Callable[[str], Path]) -> None:
    message = error_of(write(MINIMAL), {"WAL_LISTENER_HEARTBEATINTERVAL": "0s"})
    assert "listener.heartbeatInterval" in message
    assert "positive" in message


def test_bad_ssl_mode_lists_allowed_values(write: Callable[[str], Path]) -> None:
    message = error_of(write(MINIMAL), {"WAL_DATABASE_SSLMODE": "sometimes"})
    assert "database.sslMode" in message
    assert "'sometimes'" in message
    assert "verify-full" in message


def test_google_pubsub_needs_a_project(write: Callable[[str], Path]) -> None:
    message = error_of(write(MINIMAL.replace("type: nats", "type: google_pubsub")))
    assert "pubSubProjectID" in message


def test_bad_yaml_in_an_env_override_is_one_line_and_names_the_variable(write: Callable[[str], Path]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(MINIMAL), {"WAL_LISTENER_FILTER_TABLES": "{users: ["})
    assert "WAL_LISTENER_FILTER_TABLES" in str(info.value)
    assert "YAML" in str(info.value)


@pytest.mark.parametrize("name", ["WAL_LISTENER_FILTER_TABLES", "WAL_LISTENER_TOPICSMAP"])
def test_bad_yaml_in_an_env_override_is_one_line(write: Callable[[str], Path], name: str) -> None:
    error_of(write(MINIMAL), {name: "{users: ["})


# -- secrets never appear in errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["[1, 2]", "{a: 1}"])
def test_database_password_of_wrong_type_is_masked(write: Callable[[str], Path], bad: str) -> None:
    text = MINIMAL.replace("  user: postgres\n", f"  user: postgres\n  password: {bad}\n")
    message = error_of(write(text.replace("[1, 2]", f"[{SECRET}, 2]").replace("{a: 1}", f"{{a: {SECRET}}}")))
    assert "database.password" in message
    assert SECRET not in message


def test_password_not_shown_when_another_database_key_is_wrong(write: Callable[[str], Path]) -> None:
    text = MINIMAL.replace("  user: postgres\n", f"  password: {SECRET}\n  user: postgres\n  port: abc\n")
    message = error_of(write(text))
    assert "database.port" in message
    assert SECRET not in message


def test_sentry_dsn_of_wrong_type_is_masked(write: Callable[[str], Path]) -> None:
    message = error_of(write(MINIMAL + f"monitoring:\n  sentryDSN: [{SECRET}]\n"))
    assert "monitoring.sentryDSN" in message
    assert SECRET not in message


def test_publisher_password_not_shown_in_a_section_level_error(write: Callable[[str], Path]) -> None:
    text = MINIMAL.replace("publisher:\n", f"publisher:\n  password: {SECRET}\n").replace(
        "type: nats", "type: google_pubsub"
    )
    message = error_of(write(text))
    assert "pubSubProjectID" in message
    assert SECRET not in message


# -- unknown keys ---------------------------------------------------------------------------------------------------


def test_unknown_key_warns_with_did_you_mean(write: Callable[[str], Path]) -> None:
    warnings: list[str] = []
    text = MINIMAL.replace("  slotName: myslot_1\n", "  slotName: myslot_1\n  refreshConection: 5s\n")
    cfg = load_config(write(text), {}, warnings)
    assert cfg.listener.refresh_connection == timedelta(seconds=30)  # the typo is not applied
    assert len(warnings) == 1
    assert "listener.refreshConection" in warnings[0]
    assert "did you mean listener.refreshConnection?" in warnings[0]


def test_slot_name_typo_warns_even_when_the_load_then_fails(write: Callable[[str], Path]) -> None:
    warnings: list[str] = []
    with pytest.raises(ConfigError, match=r"listener\.slotName"):
        load_config(write(MINIMAL.replace("slotName", "slotNme")), {}, warnings)
    assert any("listener.slotNme" in w and "did you mean listener.slotName?" in w for w in warnings)


def test_slot_name_typo_with_env_supplying_the_slot(write: Callable[[str], Path]) -> None:
    warnings: list[str] = []
    cfg = load_config(write(MINIMAL.replace("slotName", "slotNme")), {"WAL_LISTENER_SLOTNAME": "s2"}, warnings)
    assert cfg.listener.slot_name == "s2"
    assert warnings == ["config: unknown key listener.slotNme is ignored; did you mean listener.slotName?"]


def test_unknown_section_warns(write: Callable[[str], Path]) -> None:
    warnings: list[str] = []
    load_config(write(MINIMAL + "publsher:\n  topic: x\n"), {}, warnings)
    assert any("publsher" in w and "did you mean publisher?" in w for w in warnings)


def test_unknown_key_without_a_close_match_warns_without_suggestion(write: Callable[[str], Path]) -> None:
    warnings: list[str] = []
    load_config(write(MINIMAL + "zzz: 1\n"), {}, warnings)
    assert warnings == ["config: unknown key zzz is ignored"]


# -- rendering back -----------------------------------------------------------------------------------------------


def test_to_yaml_dict_omits_secrets_by_default(write: Callable[[str], Path]) -> None:
    cfg = load_config(write(SEED_EXAMPLE), {"WAL_PUBLISHER_PASSWORD": SECRET})
    data = cfg.to_yaml_dict()
    assert "password" not in data["database"]
    assert "password" not in data["publisher"]
    assert "sentryDSN" not in data["monitoring"]
    dumped = yaml.safe_dump(data)
    assert SECRET not in dumped
    assert "dsn string" not in dumped
    assert "password" not in dumped


def test_to_yaml_dict_uses_camel_case_and_go_durations(write: Callable[[str], Path]) -> None:
    data = load_config(write(SEED_EXAMPLE), {"WAL_LISTENER_HEARTBEATINTERVAL": "1m30s"}).to_yaml_dict()
    assert data["listener"]["slotName"] == "myslot_1"
    assert data["listener"]["refreshConnection"] == "30s"
    assert data["listener"]["heartbeatInterval"] == "90s"
    assert data["listener"]["topicsMap"] == {"schema_table_name": "notifier"}
    assert data["listener"]["filter"] == {"tables": {"seasons": ["insert", "update"]}}
    assert data["publisher"]["topicPrefix"] == ""
    assert "enableTLS" in data["database"]


def test_to_yaml_dict_round_trips_without_secrets(write: Callable[[str], Path], tmp_path: Path) -> None:
    original = load_config(write(SEED_EXAMPLE), {"WAL_LISTENER_REFRESHCONNECTION": "1m30.5s"})
    rendered = tmp_path / "rendered.yml"
    rendered.write_text(yaml.safe_dump(original.to_yaml_dict()))
    warnings: list[str] = []
    again = load_config(rendered, {}, warnings)
    assert warnings == []
    assert again.to_yaml_dict() == original.to_yaml_dict()
    assert again.database.password.get_secret_value() == ""
    assert again.listener.refresh_connection == timedelta(seconds=90.5)


def test_to_yaml_dict_with_secrets_round_trips_exactly(write: Callable[[str], Path], tmp_path: Path) -> None:
    original = load_config(
        write(SEED_EXAMPLE.replace("type: nats", "type: kafka")),
        {"WAL_PUBLISHER_PASSWORD": SECRET, "WAL_DATABASE_ENABLE_TLS": "true"},
    )
    rendered = tmp_path / "rendered.yml"
    rendered.write_text(yaml.safe_dump(original.to_yaml_dict(include_secrets=True)))
    again = load_config(rendered, {})
    assert again == original
    assert again.publisher.password.get_secret_value() == SECRET
    assert again.database.ssl_mode == "require"


def test_config_model_validate_accepts_the_rendered_dict(write: Callable[[str], Path]) -> None:
    original = load_config(write(SEED_EXAMPLE), {})
    assert Config.model_validate(original.to_yaml_dict(include_secrets=True)) == original


def test_on_error_skip_requires_a_dead_letter_topic(write: Callable[[str], Path]) -> None:
    message = error_of(write(MINIMAL), {"WAL_LISTENER_ONERROR": "skip"})
    assert "deadLetterTopic" in message


def test_on_error_skip_with_dead_letter_topic_loads(write: Callable[[str], Path]) -> None:
    cfg = load_config(write(MINIMAL), {"WAL_LISTENER_ONERROR": "skip", "WAL_LISTENER_DEADLETTERTOPIC": "dlq"})
    assert (cfg.listener.on_error, cfg.listener.dead_letter_topic) == ("skip", "dlq")


def test_bad_on_error_lists_allowed_values(write: Callable[[str], Path]) -> None:
    message = error_of(write(MINIMAL), {"WAL_LISTENER_ON_ERROR": "ignore"})
    assert "listener.onError" in message
    assert "'halt'" in message and "'skip'" in message


# -- several hosts, TLS files, failover ----------------------------------------------------------------


def test_several_hosts_become_a_libpq_multi_host_string_that_finds_the_primary() -> None:
    from psycopg.conninfo import conninfo_to_dict

    cfg = load_config(None, {**_ENV_MIN, "WAL_DATABASE_HOST": "pg-a,pg-b:5433,[::1]:6000", "WAL_DATABASE_PORT": "5444"})
    params = conninfo_to_dict(cfg.database.conninfo())
    assert (params["host"], params["port"]) == ("pg-a,pg-b,::1", "5444,5433,6000")
    assert params["target_session_attrs"] == "read-write"
    assert cfg.database.where == "pg-a:5444,pg-b:5433,::1:6000"
    one = conninfo_to_dict(load_config(None, _ENV_MIN).database.conninfo())
    assert "target_session_attrs" not in one
    chosen = load_config(None, {**_ENV_MIN, "WAL_DATABASE_HOST": "a,b", "WAL_DATABASE_TARGETSESSIONATTRS": "primary"})
    assert conninfo_to_dict(chosen.database.conninfo())["target_session_attrs"] == "primary"


@pytest.mark.parametrize("hosts", ["a,,b", "a:99999", "a:b", "a b", "[::1"])
def test_a_bad_host_entry_is_named(hosts: str) -> None:
    with pytest.raises(ConfigError, match=r"database\.host") as caught:
        load_config(None, {**_ENV_MIN, "WAL_DATABASE_HOST": hosts})
    assert "host:port" in str(caught.value)


def test_tls_files_reach_libpq() -> None:
    from psycopg.conninfo import conninfo_to_dict

    env = {**_ENV_MIN, "WAL_DATABASE_SSLMODE": "verify-full", "WAL_DATABASE_SSLROOTCERT": "/ca.crt",
           "WAL_DATABASE_SSLCERT": "/c.crt", "WAL_DATABASE_SSLKEY": "/c.key"}
    params = conninfo_to_dict(load_config(None, env).database.conninfo())
    assert (params["sslrootcert"], params["sslcert"], params["sslkey"]) == ("/ca.crt", "/c.crt", "/c.key")


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("true", "true"), ("False", "false"), ("1", None)])
def test_failover_is_auto_true_or_false(value: str, expected: str | None) -> None:
    env = {**_ENV_MIN, "WAL_LISTENER_FAILOVER": value}
    if expected is None:
        with pytest.raises(ConfigError, match=r"listener\.failover"):
            load_config(None, env)
    else:
        assert load_config(None, env).listener.failover == expected


def test_failover_auto_is_on_from_postgresql_17() -> None:
    from listener.catalog import failover_wanted

    assert not failover_wanted("auto", 150007) and failover_wanted("auto", 170000)
    assert not failover_wanted("false", 180000)
    with pytest.raises(ValueError, match="failover slots need 17"):
        failover_wanted("true", 160000)


_ENV_MIN = {
    "WAL_LISTENER_SLOTNAME": "s1",
    "WAL_DATABASE_NAME": "db",
    "WAL_DATABASE_USER": "u",
    "WAL_PUBLISHER_TYPE": "nats",
    "WAL_PUBLISHER_ADDRESS": "nats://n:4222",
    "WAL_PUBLISHER_TOPIC": "t",
}



@pytest.mark.parametrize(("text", "size"), [("67108864", 67108864), ("64Mi", 64 << 20), ("64MiB", 64 << 20),
                                            ("2048k", 2048000), ("1GB", 10**9), ("1.5Gi", 3 << 29)])
def test_max_in_flight_bytes_takes_sizes_with_units(write: Callable[[str], Path], text: str, size: int) -> None:
    text = MINIMAL.replace("slotName: myslot_1", f"slotName: myslot_1\n  maxInFlightBytes: {text}")
    cfg = load_config(write(text), {})
    assert cfg.listener.max_in_flight_bytes == size
    assert load_config(write(MINIMAL), {}).listener.max_in_flight_bytes == 64 << 20


@pytest.mark.parametrize("text", ["64Xi", "lots", "true", "1Ki"])
def test_max_in_flight_bytes_refuses_what_is_no_size_or_too_small(write: Callable[[str], Path], text: str) -> None:
    message = error_of(write(MINIMAL.replace("slotName: myslot_1", f"slotName: myslot_1\n  maxInFlightBytes: {text}")))
    assert "listener.maxInFlightBytes" in message
