"""Prometheus metrics of the listener (names of the Go original plus what operators need)."""

from __future__ import annotations

from listener.prom import Counter, Gauge, Registry, Tally

REGISTRY = Registry()

PUBLISHED = Counter(
    "published_events", "Events acknowledged by the broker.", ["subject", "table"], registry=REGISTRY
)
FILTER_SKIPPED = Counter(
    "filter_skipped_events",
    "Changes decoded but not published because of listener.filter (an action not asked for a table of the "
    "publication; tables outside the filter are not in the listener's own publication and never decoded).",
    ["table"],
    registry=REGISTRY,
)
MESSAGES_SKIPPED = Counter(
    "messages_skipped", "Logical decoding messages not published: their prefix is not in listener.messages.prefixes.",
    ["prefix"], registry=REGISTRY,
)
PUBLISH_ERRORS = Counter(
    "publish_errors", "Publish attempts that were not acknowledged (each is retried).", ["reason"],
    registry=REGISTRY,
)
DEAD_LETTERED = Counter(
    "dead_lettered_events", "Events that could not be published and went to the dead-letter topic.", ["table"],
    registry=REGISTRY,
)
CONVERSION_ERRORS = Counter(
    "conversion_errors", "Column values published as text because they could not be converted.",
    ["table", "column"], registry=REGISTRY,
)


TRANSFORM_FALLBACKS = Tally(
    "transform_fallbacks",
    "Events of a table with a topic transform that went to the table's own topic instead: reason null (the "
    "column is NULL), missing (the event does not carry it: unchanged TOAST, a DELETE's old key without it), "
    "empty, too_long (the topic would exceed 249 bytes).",
    ["table", "reason"], registry=REGISTRY,
)
OVERSIZED = Counter(
    "oversized_events", "Events larger than the broker accepts.", ["table"], registry=REGISTRY
)
RECONNECTS = Counter(
    "reconnects", "Reconnections after a lost connection (target: postgres or broker).", ["target"], registry=REGISTRY
)
PUBLICATION_TABLES_WITHOUT_IDENTITY = Gauge(
    "publication_tables_without_identity",
    "Tables the streamed publications publish updates or deletes of that have no replica identity: the "
    "application's UPDATE and DELETE on them fail until each gets a primary key or a replica identity.",
    registry=REGISTRY,
)
IN_FLIGHT = Gauge("in_flight_events", "Events read from PostgreSQL and not yet acknowledged.", registry=REGISTRY)
IN_FLIGHT_BYTES = Gauge(
    "in_flight_bytes",
    "Bytes of the events read from PostgreSQL and not yet acknowledged (each event's body and key); "
    "listener.maxInFlightBytes bounds it. 0 when idle.",
    registry=REGISTRY,
)
CONFIRMED_LSN = Gauge("confirmed_lsn", "The LSN last confirmed to PostgreSQL (flush position).", registry=REGISTRY)
RECEIVED_LSN = Gauge("received_lsn", "The highest WAL position received from PostgreSQL.", registry=REGISTRY)
SERVER_WAL_END = Gauge("server_wal_end_lsn", "The server's WAL end as last reported.", registry=REGISTRY)
LAG_BYTES = Gauge(
    "replication_lag_bytes", "Server WAL end minus the confirmed LSN: WAL the slot retains.", registry=REGISTRY
)
LAG_SECONDS = Gauge(
    "replication_lag_seconds",
    "Now minus the commit time of the last acknowledged transaction (0 while nothing is in flight).",
    registry=REGISTRY,
)
SLOT_RETAINED_BYTES = Gauge(
    "slot_retained_wal_bytes", "WAL retained by the slot (pg_current_wal_lsn - restart_lsn).", registry=REGISTRY
)
SLOT_SAFE_WAL_BYTES = Gauge(
    "slot_safe_wal_size_bytes", "Bytes left before max_slot_wal_keep_size invalidates the slot (-1: no limit).",
    registry=REGISTRY,
)
UP = Gauge("up", "1 while the named connection is up (target: postgres or broker).", ["target"], registry=REGISTRY)
SLOT_PROBLEM = Gauge(
    "slot_problem",
    "1 while the slot cannot be streamed for the named reason (slot_dropped, slot_invalidated, slot_in_use, "
    "publication_missing, wal_level, setup); 0 once streaming again.",
    ["reason"],
    registry=REGISTRY,
)
SLOT_WAL_KEEP_BYTES = Gauge(
    "slot_wal_keep_size_bytes", "The server's max_slot_wal_keep_size in bytes (-1: no limit).", registry=REGISTRY
)
SLOT_WAL_STATUS = Gauge(
    "slot_wal_status",
    "1 for the slot's current wal_status (reserved, extended, unreserved, lost), 0 for the others.",
    ["status"],
    registry=REGISTRY,
)
READY = Gauge("listener_ready", "1 while /ready answers 200 (PostgreSQL stream and broker both up).", registry=REGISTRY)
# backfills and snapshots (listener.snapshot, `wal-listener backfill`)
SNAPSHOT_ROWS = Counter("snapshot_rows", "Rows published by snapshots and backfills.", ["table"], registry=REGISTRY)
SNAPSHOT_CHUNKS = Counter(
    "snapshot_chunks", "Chunks of rows read and published by snapshots and backfills.", ["table"], registry=REGISTRY
)
BACKFILL_RUNNING = Gauge("backfill_running", "1 while a backfill of the table runs.", ["table"], registry=REGISTRY)
SLOT_RESNAPSHOTS = Counter(
    "slot_resnapshots", "Lost slots created again and followed by a backfill of every published table "
    "(listener.onSlotLost: resnapshot).", registry=REGISTRY,
)

#: every wal_status PostgreSQL reports for a slot
WAL_STATUSES = ("reserved", "extended", "unreserved", "lost")
SLOT_FAILOVER = Gauge(
    "slot_failover", "1 when the slot has FAILOVER on (PostgreSQL 17+: standbys keep a synchronized copy).",
    registry=REGISTRY,
)
SLOT_SYNCED_STANDBYS = Gauge(
    "slot_synced_standbys",
    "Standbys named in the primary's synchronized_standby_slots that are connected (0: a failover may lose "
    "changes the listener already published).",
    registry=REGISTRY,
)
# schema evolution (listener.schemaEvents)
SCHEMA_CHANGES = Counter(
    "schema_changes",
    "SCHEMA events published (listener.schemaEvents): the table's shape (columns, types, key, replica identity) "
    "changed, or its first change on this slot.",
    ["table"],
    registry=REGISTRY,
)
