"""The event as it travels from the event stage through delivery to a publisher (no broker code here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Message:
    """One event ready for the wire."""

    id: str
    subject: str  # the topic name: NATS subject, Kafka topic, RabbitMQ routing key, Pub/Sub topic
    body: bytes  # the event as JSON
    schema: str
    table: str  # the table; for a MESSAGE event, the logical message's prefix
    action: str  # INSERT | UPDATE | DELETE | TRUNCATE | READ | MESSAGE
    key: bytes | None = None  # the row's replica-identity key (Kafka key, Pub/Sub ordering key)
    headers: dict[str, str] | None = None  # more headers (CloudEvents binary mode attributes)
    #: the body's media type when a format sets one: a ``content-type`` header, or RabbitMQ's content-type
    #: property (which is application/json when this is empty)
    content_type: str = ""
    #: Kafka (publisher.tombstones): the record is followed by a tombstone, its key with a null value; the
    #: message counts as acknowledged once both are
    tombstone: bool = False
    #: NATS: more header lines ("name: value\r\n" each, ASCII) written as they are after those of ``headers``:
    #: the CloudEvents attributes as the compiled path renders them for a binding that takes lines
    #: (:attr:`listener.formats.Binding.lines`), in place of ``headers``
    header_lines: bytes = b""

    def attributes(self) -> dict[str, str]:
        """Metadata every broker carries beside the body (headers / attributes / properties)."""
        found = {"id": self.id, "schema": self.schema, "table": self.table, "action": self.action}
        if self.headers:
            found.update(self.headers)
        if self.header_lines:
            found.update(parse_lines(self.header_lines))
        if self.content_type:
            found["content-type"] = self.content_type
        return found


def parse_lines(lines: bytes) -> dict[str, str]:
    """Header lines ("name: value\r\n" each, :attr:`Message.header_lines`) as a dict."""
    found = {}
    for line in lines.decode().split("\r\n"):
        if line:
            name, _, value = line.partition(": ")
            found[name] = value
    return found


def message_size(message: Message) -> int:
    """The bytes an event holds, as ``listener.maxInFlightBytes`` counts them: its body and its key."""
    key = message.key
    return len(message.body) + len(key) if key else len(message.body)
