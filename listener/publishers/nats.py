"""NATS JetStream publisher: pipelined publishes, acks gathered through one reply subscription.

Each event is published with a reply subject ``<inbox>.<seq>`` and the header ``Nats-Msg-Id`` set to
the event id; JetStream answers every publish on its reply subject, so one wildcard subscription
collects all acks and a batch resolves when its last ack arrived (or ``ackTimeout`` passed, which
fails the rest of it for a retry). Replays inside the stream's duplicate window are dropped by the
server (the ack says ``duplicate``). The stream ``publisher.topic`` with subjects ``<topic>.>`` is
created when missing. Events of one subject keep their commit order: one connection, sent in order.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from listener.config import PublisherConfig
from listener.errors import BrokerConfigError, PermanentPublishError, PublishError
from listener.publishers.base import AckResults, Message, Publisher

log = logging.getLogger("listener.publishers.nats")


class _Pending:
    """The acks one batch still waits for."""

    __slots__ = ("deadline", "future", "remaining", "results")

    def __init__(self, size: int, deadline: float) -> None:
        self.results: AckResults = [None] * size
        self.remaining = size
        self.deadline = deadline
        self.future: asyncio.Future[AckResults] = asyncio.get_running_loop().create_future()

    def resolve(self, index: int, result: BaseException | None) -> None:
        self.results[index] = result
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self.results)


class NatsPublisher(Publisher):
    """Publishes events to the JetStream stream ``publisher.topic``."""

    def __init__(self, cfg: PublisherConfig, ack_timeout: float = 10.0) -> None:
        super().__init__(cfg, ack_timeout)
        self._nc: Client | None = None
        self._inbox = ""
        self._seq = 0
        self._waiting: dict[int, tuple[_Pending, int]] = {}
        self._batches: set[_Pending] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._max_payload = 1024 * 1024

    @property
    def servers(self) -> list[str]:
        out = []
        for part in self.cfg.address.split(","):
            part = part.strip()
            out.append(part if "://" in part else f"nats://{part}")
        return out

    def _tls(self) -> ssl.SSLContext | None:
        if not (self.cfg.enable_tls or self.cfg.ca_cert):
            return None
        context = ssl.create_default_context(cafile=self.cfg.ca_cert or None)
        if self.cfg.client_cert:
            context.load_cert_chain(self.cfg.client_cert, self.cfg.client_key or None)
        return context

    async def connect(self) -> None:
        stream = self.cfg.topic
        if any(c in stream for c in ".*> \t"):
            raise BrokerConfigError(
                f"config: publisher.topic = {stream!r} is invalid for NATS: it names the JetStream stream, "
                "which may not contain '.', '*', '>' or spaces"
            )

        async def on_error(exc: Exception) -> None:
            log.warning("nats connection error", extra={"fields": {"error": str(exc) or type(exc).__name__}})

        async def on_disconnect() -> None:
            log.warning("nats disconnected; reconnecting")

        async def on_reconnect() -> None:
            from listener import metrics

            metrics.RECONNECTS.labels("broker").inc()
            log.info("nats reconnected")

        kwargs: dict[str, Any] = {}
        if self.cfg.username:
            kwargs["user"] = self.cfg.username
            kwargs["password"] = self.cfg.password.get_secret_value()
        try:
            self._nc = await nats.connect(
                servers=self.servers,
                connect_timeout=5,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                pending_size=32 * 1024 * 1024,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                tls=self._tls(),
                **kwargs,
            )
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            raise PublishError(
                f"nats: cannot connect to {self.cfg.address}: {exc or type(exc).__name__}"
            ) from None
        nc = self._nc
        self._max_payload = nc.max_payload or self._max_payload
        try:
            await self._ensure_stream()
        except BaseException:
            await nc.close()
            self._nc = None
            raise
        self._inbox = nc.new_inbox()
        await nc.subscribe(self._inbox + ".*", cb=self._on_ack, pending_msgs_limit=-1, pending_bytes_limit=-1)
        self._sweeper = asyncio.create_task(self._sweep(), name="nats-ack-timeouts")

    async def _ensure_stream(self) -> None:
        assert self._nc is not None
        js = self._nc.jetstream(timeout=10)
        name = self.cfg.topic
        subjects = [f"{name}.>"]
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            try:
                await js.add_stream(name=name, subjects=subjects,
                                    duplicate_window=self.cfg.duplicate_window.total_seconds())
            except nats.js.errors.BadRequestError as exc:
                raise BrokerConfigError(f"nats: cannot create JetStream stream {name!r}: {exc.description}") from None
            log.info("created JetStream stream", extra={"fields": {"stream": name, "subjects": subjects}})
            return
        except nats.js.errors.ServiceUnavailableError:
            raise BrokerConfigError(
                f"nats: JetStream is not enabled on {self.cfg.address}; start nats-server with -js"
            ) from None
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            raise BrokerConfigError(
                f"nats: JetStream does not answer on {self.cfg.address}; start nats-server with -js"
            ) from None
        have = list(info.config.subjects or [])
        if not any(s in (f"{name}.>", ">") for s in have):
            raise BrokerConfigError(
                f"nats: stream {name!r} exists with subjects {have}; it must include '{name}.>' "
                "(add it to the stream or choose another publisher.topic)"
            )

    async def _on_ack(self, msg: Msg) -> None:
        seq = int(msg.subject.rsplit(".", 1)[1])
        entry = self._waiting.pop(seq, None)
        if entry is None:
            return  # late ack of a publish already timed out and retried
        pending, index = entry
        result: BaseException | None = None
        if msg.headers and msg.headers.get("Status") == "503":
            result = PublishError(f"nats: no JetStream stream listens on this subject (stream {self.cfg.topic!r})")
        else:
            data = msg.data
            if data[:9] == b'{"error":' or b'"error"' in data[:20]:
                err = orjson.loads(data).get("error", {})
                text = f"nats: JetStream rejected the message: {err.get('description', err)}"
                code = err.get("err_code") or err.get("code")
                result = PermanentPublishError(text) if code in (10054, 400) else PublishError(text)
        pending.resolve(index, result)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for pending in [p for p in self._batches if p.deadline <= now]:
                self._fail(pending, PublishError(f"nats: no ack within {self.ack_timeout:g}s"))

    def _fail(self, pending: _Pending, error: BaseException) -> None:
        for seq in [s for s, (p, _) in self._waiting.items() if p is pending]:
            _, index = self._waiting.pop(seq)
            pending.resolve(index, error)
        self._batches.discard(pending)

    async def send(self, batch: Sequence[Message]) -> Awaitable[AckResults]:
        nc = self._nc
        if nc is None:
            raise PublishError("nats: not connected")
        pending = _Pending(len(batch), time.monotonic() + self.ack_timeout)
        self._batches.add(pending)
        pending.future.add_done_callback(lambda _: self._batches.discard(pending))
        inbox = self._inbox
        publish = nc.publish
        for index, message in enumerate(batch):
            if len(message.body) > self._max_payload:
                pending.resolve(index, PermanentPublishError(
                    f"nats: event of {len(message.body)} bytes exceeds the server's max_payload of "
                    f"{self._max_payload} bytes"))
                from listener import metrics

                metrics.OVERSIZED.labels(message.table).inc()
                continue
            self._seq += 1
            seq = self._seq
            self._waiting[seq] = (pending, index)
            try:
                await publish(message.subject, message.body, reply=f"{inbox}.{seq}",
                              headers={"Nats-Msg-Id": message.id})
            except Exception as exc:
                self._waiting.pop(seq, None)
                pending.resolve(index, PublishError(f"nats: publish failed: {exc or type(exc).__name__}"))
        return pending.future

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._nc is not None:
            try:
                await self._nc.drain()
            except Exception:
                await self._nc.close()
            self._nc = None

    @property
    def ready(self) -> bool:
        return self._nc is not None and self._nc.is_connected
