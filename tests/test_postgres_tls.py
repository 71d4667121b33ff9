"""TLS to PostgreSQL: verify-full against a CA made here, clear errors for a wrong CA or host name, and
client-certificate authentication (``hostssl ... cert``), on a server that accepts TLS connections only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import ListenerProcess, http_get, nats_config, read_stream, sql, unique, wait_until
from tests.support.services import NatsServer, PostgresServer, free_port
from tests.support.tls import Certificates, enable_postgres_tls

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
def tls_pg(make_pg: Callable[..., PostgresServer], tmp_path: Path) -> tuple[PostgresServer, Certificates]:
    """A PostgreSQL that takes TLS connections only (a server certificate for 127.0.0.1 only), where the
    user ``client`` logs in with a client certificate."""
    server = make_pg()
    (tmp_path / "pki").mkdir()
    certs = Certificates(tmp_path / "pki", server_names=("127.0.0.1",))
    enable_postgres_tls(server, certs, client_cert_users=("client",))
    server.create_database("app")
    server.execute("CREATE ROLE client LOGIN REPLICATION")
    server.execute("CREATE TABLE t (id int PRIMARY KEY)", dbname="app")
    server.execute("GRANT SELECT ON t TO client", dbname="app")
    server.execute("CREATE PUBLICATION p FOR ALL TABLES", dbname="app")
    return server, certs


def _config(server: PostgresServer, nats: NatsServer, topic: str, **database: Any) -> dict[str, Any]:
    cfg = nats_config(server.port, "app", nats.url, topic, publicationName="p", serverPort=free_port())
    cfg["database"].update(database)
    return cfg


async def test_verify_full_with_the_ca_streams(
    tls_pg: tuple[PostgresServer, Certificates], nats_server: NatsServer, tmp_path: Path,
    procs: list[ListenerProcess],
) -> None:
    server, certs = tls_pg
    topic = unique("tls")
    cfg = _config(server, nats_server, topic, sslMode="verify-full", sslRootCert=str(certs.ca))
    proc = ListenerProcess(cfg, tmp_path).start()
    procs.append(proc)
    port = cfg["listener"]["serverPort"]
    await wait_until(lambda: _ready(port), 30, "the listener ready over TLS")
    await sql(server.dsn("app"), "INSERT INTO t VALUES (1), (2)")
    events = await read_stream(nats_server.url, topic, 2, timeout=30)
    assert [e.event["data"]["id"] for e in events] == [1, 2]
    assert server.execute("SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                          "WHERE s.ssl AND a.application_name LIKE 'wal-listener%'")[0][0] >= 2


async def _ready(port: int) -> bool:
    try:
        return (await http_get(port, "/ready"))[0] == 200
    except OSError:
        return False


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong-ca", "certificate verify failed"),
        ("wrong-host", "does not match host name"),
    ],
)
async def test_a_wrong_ca_or_host_name_is_one_clear_line_and_retried(
    tls_pg: tuple[PostgresServer, Certificates], nats_server: NatsServer, tmp_path: Path,
    procs: list[ListenerProcess], case: str, expected: str,
) -> None:
    server, certs = tls_pg
    (tmp_path / "other").mkdir()
    other = Certificates(tmp_path / "other")
    if case == "wrong-ca":
        cfg = _config(server, nats_server, unique("tls"), sslMode="verify-full", sslRootCert=str(other.ca))
    else:  # the certificate names 127.0.0.1 only
        cfg = _config(server, nats_server, unique("tls"), sslMode="verify-full", sslRootCert=str(certs.ca),
                      host="localhost")
    cfg["listener"]["refreshConnection"] = "1s"
    proc = ListenerProcess(cfg, tmp_path).start()
    procs.append(proc)

    def failed_twice() -> bool:
        return sum(1 for e in proc.logs() if expected in str(e.get("msg", ""))) >= 2

    await wait_until(failed_twice, 30, f"two attempts refused with '{expected}'")
    assert proc.proc is not None and proc.proc.poll() is None  # alive, retrying
    lines = [e for e in proc.logs() if expected in str(e.get("msg", ""))]
    assert all("\n" not in str(e["msg"]) and "Traceback" not in str(e) for e in lines)
    assert "traceback" not in lines[0]
    status, body = await http_get(cfg["listener"]["serverPort"], "/ready")
    assert status == 503 and expected in body


async def test_client_certificate_authentication(
    tls_pg: tuple[PostgresServer, Certificates], nats_server: NatsServer, tmp_path: Path,
    procs: list[ListenerProcess],
) -> None:
    server, certs = tls_pg
    topic = unique("tls")
    cfg = _config(server, nats_server, topic, user="client", sslMode="verify-full", sslRootCert=str(certs.ca),
                  sslCert=str(certs.client_cert), sslKey=str(certs.client_key))
    proc = ListenerProcess(cfg, tmp_path).start()
    procs.append(proc)
    await wait_until(lambda: _ready(cfg["listener"]["serverPort"]), 30, "the listener ready with its certificate")
    await sql(server.dsn("app"), "INSERT INTO t VALUES (7)")
    events = await read_stream(nats_server.url, topic, 1, timeout=30)
    assert events[0].event["data"] == {"id": 7}
    # without the certificate the same user is refused, in one line
    cfg = _config(server, nats_server, unique("tls"), user="client", sslMode="verify-full",
                  sslRootCert=str(certs.ca))
    refused = ListenerProcess(cfg, tmp_path).start()
    procs.append(refused)
    await wait_until(lambda: any("certificate" in str(e.get("msg", "")) and e.get("level") == "error"
                                 for e in refused.logs()), 30, "the refusal")
