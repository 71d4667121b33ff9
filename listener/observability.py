"""Logs (one JSON object per line, or text), Sentry, and the small HTTP server for probes and metrics.

``/healthz`` answers while the event loop runs (a stuck loop cannot answer); ``/ready`` answers 200
only while the replication stream and the broker are both up, and says which is not otherwise.
``/metrics`` is Prometheus' text format (listener.prom). Nothing here ever prints a password or DSN.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from listener.config import Config, redact_url, url_passwords
from listener.metrics import REGISTRY
from listener.prom import CONTENT_TYPE, exposition


class Redactor:
    """Replaces known secrets (passwords, the Sentry DSN, credentials inside broker URLs) with ``***``
    in text that leaves the process: log lines, /ready, Sentry events. Errors from client libraries
    (e.g. a broker client naming the address it could not reach) may carry them."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def add(self, *secrets: str) -> None:
        for secret in secrets:
            if len(secret) >= 4 and secret != "***":  # a 1-3 character "secret" would mangle every line
                self._secrets.add(secret)

    def __call__(self, text: str) -> str:
        text = redact_url(text)
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
            escaped = orjson.dumps(secret).decode()[1:-1]  # as it appears inside a JSON string
            if escaped != secret and escaped in text:
                text = text.replace(escaped, "***")
        return text


REDACT = Redactor()


def register_secrets(cfg: Config) -> None:
    """Make :data:`REDACT` hide the secrets of ``cfg``."""
    import urllib.parse

    dsn = cfg.monitoring.sentry_dsn.get_secret_value()
    REDACT.add(*cfg.secret_values(), *url_passwords(cfg.publisher.address))
    if dsn:
        REDACT.add(urllib.parse.urlsplit(dsn).username or "")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "warning": logging.WARNING,
           "error": logging.ERROR}


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "msg", ...fields}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info and record.exc_info[1] is not None:
            entry["error"] = entry.get("error") or str(record.exc_info[1])
            entry["traceback"] = self.formatException(record.exc_info)
        return REDACT(orjson.dumps(entry, default=str).decode())


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S")
        fields = getattr(record, "fields", None) or {}
        tail = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{stamp} {record.levelname:<7} {record.getMessage()}" + (f" {tail}" if tail else "")
        if record.exc_info and record.exc_info[1] is not None:
            line += "\n" + self.formatException(record.exc_info)
        return REDACT(line)


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    for noisy in ("nats", "aiokafka", "aiormq", "aio_pika", "google", "urllib3", "grpc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def setup_sentry(cfg: Config) -> bool:
    """Send error-level logs and crashes to Sentry when ``monitoring.sentryDSN`` is set."""
    dsn = cfg.monitoring.sentry_dsn.get_secret_value()
    if not dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.logging import LoggingIntegration

    from listener import __version__

    register_secrets(cfg)

    def scrub(event: Any, _hint: Any) -> Any:
        secrets = cfg.secret_values()
        text = orjson.dumps(event, default=str).decode()
        for secret in secrets:
            text = text.replace(orjson.dumps(secret).decode()[1:-1], "[redacted]")
        return orjson.loads(REDACT(text))  # and credentials inside URLs (publisher.address)

    sentry_sdk.init(
        dsn=dsn,
        release=f"wal-listener@{__version__}",
        integrations=[LoggingIntegration(level=logging.INFO, event_level=logging.ERROR)],
        before_send=scrub,
        send_default_pii=False,
        # a frame's local variables may hold a row before its transform masked it (listener.transforms)
        include_local_variables=not cfg.listener.transforms,
        traces_sample_rate=0.0,
    )
    return True


Route = Callable[[], tuple[int, str, bytes]]


class HttpServer:
    """A minimal HTTP/1.1 server: GET-only routes, one response per connection."""

    def __init__(self, host: str, port: int, routes: dict[str, Route]) -> None:
        self.host, self.port, self.routes = host, port, routes
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host or None, self.port)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            line = request.split(b"\r\n", 1)[0].decode("latin-1").split()
            path = line[1].split("?", 1)[0] if len(line) > 1 else "/"
            route = self.routes.get(path)
            if route is None:
                status, ctype, body = 404, "text/plain", b"not found\n"
            else:
                status, ctype, body = route()
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}.get(status, "OK")
            head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode()
            writer.write(head + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def metrics_route() -> tuple[int, str, bytes]:
    return 200, CONTENT_TYPE, exposition(REGISTRY)


class Health:
    """What the probes report: /healthz answers while the event loop runs (a stuck loop cannot answer);
    /ready says whether the replication stream and the broker are both up."""

    def __init__(self) -> None:
        self.postgres = False
        self.broker: Callable[[], bool] = lambda: False
        self.problem = ""
        #: shown in /ready: the server streamed from, the slot's failover state
        self.details: dict[str, Any] = {}

    def healthz(self) -> tuple[int, str, bytes]:
        return 200, "text/plain", b"ok\n"

    def is_ready(self) -> bool:
        return self.postgres and self.broker()

    def ready(self) -> tuple[int, str, bytes]:
        broker = self.broker()
        body: dict[str, Any] = {"postgres": self.postgres, "broker": broker, **self.details}
        if self.problem:
            body["problem"] = REDACT(self.problem)
        status = 200 if self.postgres and broker else 503
        return status, "application/json", orjson.dumps(body) + b"\n"


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)
