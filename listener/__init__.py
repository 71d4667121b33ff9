"""wal-listener: PostgreSQL changes (logical replication, pgoutput) published at least once to brokers."""

__version__ = "0.1.0"
