"""The event as it travels from the event stage through delivery to a publisher (no broker code here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING


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
    #: the bytes the event starts with, before what the body slot holds (:attr:`rest`): None but in a
    #: :class:`HeadedMessage` (only its ``body`` joins them), where ``head + rest`` is the event
    head: bytes | None = field(default=None, init=False, repr=False)

    if TYPE_CHECKING:  # the body slot under a second name, set below the class

        @property
        def rest(self) -> bytes:
            """The body slot as it is: the event after :attr:`head` (the whole event when that is None), never
            joined."""
            return b""

        @rest.setter
        def rest(self, value: bytes) -> None: ...

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


Message.rest = Message.__dict__["body"]  # type: ignore[method-assign]  # read by delivery's count and the NATS frames


class HeadedMessage(Message):
    """An event whose body is ``head``, bytes many events share (Debezium's schema block, rendered once per
    table), followed by ``rest``, its own bytes. ``body`` joins them when read and keeps the join (every broker
    that needs one buffer reads it); the NATS frames write the two parts one after the other and never join
    them, so the event's bytes are written once, into the frames, instead of into a body and again into them
    (and a head of 1 KiB or more not even there: the frames are cut around it and it goes to the socket as is)."""

    __slots__ = ()

    def __init__(self, head: bytes, id: str, subject: str, rest: bytes, schema: str, table: str,
                 action: str, key: bytes | None = None) -> None:
        self.id = id
        self.subject = subject
        self.rest = rest
        self.schema = schema
        self.table = table
        self.action = action
        self.key = key
        self.headers = None
        self.content_type = ""
        self.tombstone = False
        self.header_lines = b""
        self.head = head

    @property
    def body(self) -> bytes:
        """The whole event: ``head + rest``, joined once."""
        head = self.head
        if head is None:
            return self.rest
        whole = head + self.rest
        self.rest = whole
        self.head = None
        return whole

    @body.setter
    def body(self, value: bytes) -> None:
        self.rest = value
        self.head = None


def parse_lines(lines: bytes) -> dict[str, str]:
    """Header lines ("name: value\r\n" each, :attr:`Message.header_lines`) as a dict."""
    found = {}
    for line in lines.decode().split("\r\n"):
        if line:
            name, _, value = line.partition(": ")
            found[name] = value
    return found


def message_size(message: Message) -> int:
    """The bytes an event holds, as ``listener.maxInFlightBytes`` counts them: its body and its key (a
    :class:`HeadedMessage`'s head counted as part of its body, though many events share it)."""
    size = len(message.rest)
    key, head = message.key, message.head
    if key:
        size += len(key)
    if head is not None:
        size += len(head)
    return size
