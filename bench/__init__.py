"""wal-listener benchmark: ``python -m bench.run`` (see bench/README.md).

Starts its own throwaway PostgreSQL and brokers, writes the reference workloads into the WAL, measures
``pg_recvlogical`` over the same WAL range as the machine's ceiling, then the listener end to end
(commit -> broker ack -> LSN confirmed), latency at a steady rate, memory on one huge transaction and
the idle cost; prints one table and writes JSON and a PNG chart.
"""
