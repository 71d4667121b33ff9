"""The event as it travels from the event stage through delivery to a publisher (no broker code here)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Message:
    """One event ready for the wire."""

    id: str
    subject: str  # the topic name: NATS subject, Kafka topic, RabbitMQ routing key, Pub/Sub topic
    body: bytes  # the event as JSON
    schema: str
    table: str
    action: str  # INSERT | UPDATE | DELETE | TRUNCATE
    key: bytes | None = None  # the row's replica-identity key (Kafka key, Pub/Sub ordering key)
    headers: dict[str, str] = field(default_factory=dict)

    def attributes(self) -> dict[str, str]:
        """Metadata every broker carries beside the body (headers / attributes / properties)."""
        return {"id": self.id, "schema": self.schema, "table": self.table, "action": self.action, **self.headers}
