"""Records the real output of Debezium's PostgreSQL connector for the workload of
:mod:`tests.support.debezium` into ``tests/data/debezium/recorded.json``
(and, with the JSON converters' schemas enabled, ``recorded-schemas.json``).

``Record.java`` runs Debezium's embedded engine and prints each record as a JSON line; ``__main__`` gets
the Debezium jars, starts a throwaway PostgreSQL 15, drives the workload and writes the file. Re-record
with ``.venv/bin/python -m tests.support.debezium_record [--schemas]`` (needs Java 17+ and PostgreSQL 15).
"""
