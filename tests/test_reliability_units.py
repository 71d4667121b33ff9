"""Fast checks of the pieces the reliability suite relies on: the checker itself (a checker that cannot
fail proves nothing), and the small rules behind the fixes it led to."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import orjson
import pytest

from listener.app import wal_at_risk
from listener.config import Config, parse_publisher, redact_url, url_passwords
from listener.errors import (
    AckTimeout,
    BrokerUnavailable,
    ConfigError,
    DatabaseError,
    DatabaseSetupError,
    MessageRejected,
    MessageTooLarge,
    PublishError,
    SlotLostError,
)
from listener.event import event_id, slot_hash
from listener.observability import JsonFormatter, Redactor
from listener.publishers.base import Readiness
from listener.replication import ReplicationStream, one_line
from tests.support.checker import check, id_lsn
from tests.support.harness import nats_config


def _event(k: int, seq: int, ident: str | None = None) -> dict[str, object]:
    return {"id": ident or f"id-{k}-{seq}", "data": {"k": k, "seq": seq}}


# -- the checker -------------------------------------------------------------------------------------


def test_checker_accepts_a_complete_stream_with_a_replayed_tail() -> None:
    events = [_event(1, 1), _event(2, 1), _event(1, 2), _event(2, 1), _event(1, 2)]  # replay of the last two
    report = check({1: 2, 2: 1}, events)
    report.assert_ok()
    assert report.duplicated == {(2, 1): 2, (1, 2): 2}
    assert [c.position for c in report.copies] == [3, 4]
    with pytest.raises(AssertionError, match="duplicates where none may be"):
        report.assert_ok(duplicates=False)


@pytest.mark.parametrize(
    ("truth", "events", "problem"),
    [
        ({1: 3}, [_event(1, 1), _event(1, 3)], "missing 1 [(1, 2)]"),
        ({1: 2}, [_event(1, 2), _event(1, 1)], "out of order 1 [(1, 2, 1)]"),
        ({1: 1}, [_event(1, 1), _event(1, 1, "other-id")], "changed ids 1"),
        ({1: 1}, [_event(1, 1), _event(1, 2), _event(9, 1)], "unexpected 2 [(1, 2), (9, 1)]"),
        ({1: 1, 2: 1}, [], "missing 2"),
    ],
    ids=["missing", "out-of-order", "changed-id", "phantom", "nothing"],
)
def test_checker_reports_what_is_wrong(truth: dict[int, int], events: list[dict[str, object]], problem: str) -> None:
    report = check(truth, events)
    assert not report.ok
    assert problem in report.summary()


def test_event_ids_carry_the_commit_lsn_the_checker_reads_back() -> None:
    for lsn, ordinal in [(0, 1), (0x16B3748, 7), (0x1_2345_6789_ABCD, 0x3FFFFFF), (2**64 - 1, 0)]:
        assert id_lsn(event_id(slot_hash("s"), lsn, ordinal)) == (lsn, ordinal)


def test_duplicates_outside_the_unconfirmed_tail_are_found() -> None:
    old, new = event_id(1, 100, 1), event_id(1, 200, 1)
    events = [_event(1, 1, old), _event(2, 1, new), _event(1, 1, old), _event(2, 1, new)]
    report = check({1: 1, 2: 1}, events)
    # killed after 2 events with LSN 150 confirmed: re-sending the change of LSN 100 was wrong
    assert [c.change for c in report.duplicates_outside_tail([(2, 150)])] == [(1, 1)]
    assert report.duplicates_outside_tail([(2, 100)]) == []
    assert len(report.duplicates_outside_tail([])) == 2  # a copy without any crash before it


# -- rules behind the fixes ----------------------------------------------------------------------------


MB = 1024 * 1024


@pytest.mark.parametrize(
    ("status", "safe", "keep", "risk"),
    [
        ("reserved", 100 * MB, 128 * MB, False),
        ("reserved", 25 * MB, 128 * MB, True),  # less than 20 % of max_slot_wal_keep_size left
        ("extended", 900 * MB, 1024 * MB, False),  # a fixed 256 MB threshold warned all the time here
        ("reserved", 300 * MB, 100 * 1024 * MB, True),  # ... and too late here
        ("unreserved", -5 * MB, 128 * MB, True),
        ("lost", None, 128 * MB, True),
        ("reserved", None, -1, False),  # no limit
    ],
)
def test_retained_wal_warning_is_relative_to_max_slot_wal_keep_size(
    status: str, safe: int | None, keep: int, risk: bool
) -> None:
    assert wal_at_risk(status, safe, keep) is risk


def test_server_errors_become_one_line() -> None:
    text = (
        'ERROR:  publication "wal-listener" does not exist\n'
        'CONTEXT:  slot "s", output plugin "pgoutput", in the change callback, associated LSN 0/1945118\n'
    )
    assert one_line(text) == 'publication "wal-listener" does not exist'
    assert one_line("ERROR:  x\nDETAIL:  y\nHINT:  z\n") == "x; DETAIL:  y; HINT:  z"
    assert one_line("") == ""


@pytest.mark.parametrize(
    ("text", "shown", "secrets"),
    [
        ("nats://bob:pw-123@h:4222", "nats://bob:***@h:4222", ["pw-123"]),
        ("nats://a:b1@h1:1,nats://c:d2@h2:2", "nats://a:***@h1:1,nats://c:***@h2:2", ["b1", "d2"]),
        ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/", ["guest"]),
        ("nats://s3cr3t-token@h:4222", "nats://***@h:4222", ["s3cr3t-token"]),
        ("cannot connect to nats://u:p%40ss@h", "cannot connect to nats://u:***@h", ["p%40ss", "p@ss"]),
        ("h:4222,kafka:9092", "h:4222,kafka:9092", []),
    ],
)
def test_credentials_inside_urls_are_masked(text: str, shown: str, secrets: list[str]) -> None:
    assert redact_url(text) == shown
    assert url_passwords(text) == sorted(secrets)


def test_redactor_masks_secrets_in_json_log_lines() -> None:
    redact = Redactor()
    redact.add('pa"ss\\word', "abc")  # too short to mask safely: ignored
    record = logging.LogRecord("x", logging.ERROR, "", 0, "failed", (), None)
    record.fields = {"error": 'login with pa"ss\\word failed (abc)'}
    line = JsonFormatter().format(record)  # the secret JSON-escaped inside the line
    assert 'pa\\"ss\\\\word' in line
    assert orjson.loads(redact(line))["error"] == "login with *** failed (abc)"


async def test_status_wait_never_swallows_a_cancellation() -> None:
    """The feedback task is cancelled at the end of every session; with asyncio.wait_for (Python 3.11)
    a cancellation arriving together with a status request was lost and the session never ended."""
    stream = ReplicationStream(Config.model_validate(nats_config(1, "db", "h:1")))
    task = asyncio.create_task(stream.status_wanted(30))
    await asyncio.sleep(0)
    stream.wake_status()  # the event and the cancellation in the same loop iteration
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


# -- errors and the broker registry ------------------------------------------------------------------------


def test_publish_errors_carry_broker_retryable_and_a_public_reason() -> None:
    kinds = (PublishError, BrokerUnavailable, AckTimeout, MessageTooLarge, MessageRejected)
    assert all(issubclass(kind, PublishError) for kind in kinds)
    # the values of the publish_errors_total{reason} label, documented in docs/observability.md
    assert [kind.reason for kind in kinds] == [
        "publish_failed", "broker_unavailable", "ack_timeout", "message_too_large", "message_rejected"
    ]
    too_large = MessageTooLarge("kafka: event x is too large", broker="kafka")
    assert (too_large.broker, too_large.retryable, too_large.reason) == ("kafka", False, "message_too_large")
    assert MessageRejected("nack").retryable and not MessageRejected("bad", retryable=False).retryable
    assert AckTimeout("late").retryable and str(AckTimeout("nats: late")) == "nats: late"
    # a database that is set up wrong is retried (slowly) like any database error
    assert issubclass(DatabaseSetupError, DatabaseError) and issubclass(SlotLostError, DatabaseSetupError)


def test_broker_library_not_installed_is_one_line_naming_the_pip_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from listener.publishers import REGISTRY, make_publisher

    assert sorted(broker.extra for broker in REGISTRY.values()) == ["kafka", "nats", "pubsub", "rabbitmq"]
    monkeypatch.delitem(sys.modules, "listener.publishers.kafka", raising=False)
    monkeypatch.setitem(sys.modules, "aiokafka", None)  # as if it were not installed
    cfg = parse_publisher({"type": "kafka", "address": "h:9092", "topic": "t"})
    with pytest.raises(ConfigError) as info:
        make_publisher(cfg)
    text = str(info.value)
    assert "'aiokafka'" in text and "pip install 'wal-listener[kafka]'" in text and "\n" not in text


def test_only_the_configured_brokers_library_is_imported() -> None:
    code = (
        "import sys\n"
        "import listener.event, listener.delivery\n"
        "stages = sorted(m for m in sys.modules if m.startswith('listener.publishers'))\n"
        "import listener.app\n"
        "from listener.config import parse_publisher\n"
        "from listener.publishers import make_publisher\n"
        "before = sorted(m for m in sys.modules if m.startswith('listener.publishers.'))\n"
        "make_publisher(parse_publisher({'type': 'nats', 'address': 'h:4222', 'topic': 't'}))\n"
        "sdks = ('nats', 'aiokafka', 'aio_pika', 'aiormq', 'google.cloud', 'grpc')\n"
        "print(stages, before, sorted(m for m in sdks if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # the event and delivery stages do not import the broker package; the app imports the interface only
    assert run.stdout.strip() == "[] ['listener.publishers.base'] ['nats']", run.stdout + run.stderr


async def test_a_broker_back_is_announced_once_whether_an_ack_or_the_probe_notices_it() -> None:
    # Kafka's client sends records again by itself: one acknowledged after an outage can mark the broker up
    # before the probe does, and the publisher must still re-check its topics (a broker back may be a wiped one)
    back: list[str] = []
    readiness = Readiness("kafka", "broker x", logging.getLogger("test"))

    async def unanswered() -> None:
        await asyncio.Event().wait()

    readiness.start(unanswered, 3600, lambda: back.append("back"))
    try:
        readiness.up()
        assert back == []  # up from the start: nothing came back
        readiness.down("connection refused")
        assert not readiness.is_up
        readiness.up()
        readiness.up()
        assert readiness.is_up and back == ["back"]
    finally:
        await readiness.stop()
