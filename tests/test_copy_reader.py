"""The compiled replication reader (many CopyData messages per call through libpq) against psycopg's
per-message reader, on the same WAL of a real PostgreSQL: the same payloads, start LSNs and WAL ends."""

from __future__ import annotations

import pytest

from listener.config import Config
from listener.replication import ReplicationStream, parse_keepalive
from tests.support.events import compiled_hot_path
from tests.support.harness import nats_config
from tests.support.services import PostgresServer

pytestmark = pytest.mark.service

END = b"copy-reader-end"


async def read_stream(
    cfg: Config, compiled: bool, limit: int, max_bytes: int = 0
) -> tuple[list[bytes], list[int], int]:
    """Every pgoutput payload up to the end marker (a logical message), with its start LSN, and the last
    WAL end seen. Each call takes at most ``limit`` payloads and, with ``max_bytes``, stops at the one that
    reaches that many bytes."""
    stream = ReplicationStream(cfg)
    if compiled:
        assert stream._copy_batch is not None, "the compiled reader did not find psycopg's libpq"
    else:
        stream._copy_batch = None
    await stream.connect()
    payloads: list[bytes] = []
    starts: list[int] = []
    wal_end = 0
    try:
        await stream.start(0, [cfg.listener.publication_name])
        while not any(END in payload for payload in payloads[-limit:]):
            got, end, other, status = stream.read_batch(limit, starts, max_bytes)
            assert len(got) <= limit
            if max_bytes:
                assert sum(map(len, got[:-1])) < max_bytes, [len(p) for p in got]
            payloads += got
            wal_end = max(wal_end, end)
            if other is not None:
                assert other[:1] == b"k", other[:1]  # the only other message: a keepalive
                wal_end = max(wal_end, parse_keepalive(other)[0])
            assert status >= 0, "the stream ended or failed"
            if status == 0:
                await stream.wait_readable()
                stream.fill()
    finally:
        await stream.close()
    assert len(starts) == len(payloads)
    last = max(i for i, payload in enumerate(payloads) if END in payload) + 1
    return payloads[:last], starts[:last], wal_end


async def test_compiled_reader_reads_what_psycopg_reads(pg: PostgresServer, fresh_db: str) -> None:
    compiled_hot_path()
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, note text, blob bytea)", dbname=fresh_db)
    pg.execute("CREATE PUBLICATION p FOR ALL TABLES", dbname=fresh_db)
    slots = ["reader_py", "reader_c3", "reader_c256", "reader_c4k", "reader_py4k"]
    for slot in slots:
        pg.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,), dbname=fresh_db)
    # small and large messages (a 3 MB row is many socket reads), many transactions, keepalive gaps
    pg.execute("INSERT INTO t SELECT g, repeat('x', g % 300), NULL FROM generate_series(1, 5000) g", dbname=fresh_db)
    pg.execute("INSERT INTO t VALUES (0, repeat('é', 1500000), decode(repeat('00ff', 100000), 'hex'))",
               dbname=fresh_db)
    for n in range(20):
        pg.execute("UPDATE t SET note = %s WHERE id %% 20 = %s", (f"n{n}", n), dbname=fresh_db)
    pg.execute("DELETE FROM t WHERE id > 4000", dbname=fresh_db)
    pg.execute("SELECT pg_logical_emit_message(true, %s, 'x')", (END.decode(),), dbname=fresh_db)

    def config(slot: str) -> Config:
        return Config.model_validate(
            nats_config(pg.port, fresh_db, "nats://127.0.0.1:1", slotName=slot, publicationName="p")
        )

    python = await read_stream(config(slots[0]), compiled=False, limit=256)
    assert len(python[0]) > 5000 + 20 * 250 + 1000  # every change came through, with begins and commits
    assert max(map(len, python[0])) > 3_000_000
    for slot, limit, max_bytes in ((slots[1], 3, 0), (slots[2], 256, 0), (slots[3], 256, 4096)):
        payloads, starts, wal_end = await read_stream(config(slot), compiled=True, limit=limit, max_bytes=max_bytes)
        assert payloads == python[0]
        assert starts == python[1]
        assert wal_end >= max(starts)
    bounded = await read_stream(config(slots[4]), compiled=False, limit=256, max_bytes=4096)
    assert bounded[:2] == python[:2]
