"""A Sentry ingestion endpoint for tests: a local HTTP server that keeps every envelope the SDK sends
(``monitoring.sentryDSN: http://<key>@127.0.0.1:<port>/1``), gzip undone."""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

__all__ = ["SentryInbox"]


class _Handler(BaseHTTPRequestHandler):
    bodies: list[bytes]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.bodies.append(body)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


class SentryInbox:
    """``port`` to put into a DSN, ``bodies`` received so far; :meth:`close` stops the server."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        handler = type("SentryInbox", (_Handler,), {"bodies": self.bodies})
        self._server = HTTPServer(("127.0.0.1", 0), handler)
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def dsn(self, key: str) -> str:
        return f"http://{key}@127.0.0.1:{self.port}/1"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
