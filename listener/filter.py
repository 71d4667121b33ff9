"""Stage 5 — filter: decide per table and action whether a change is published.

``listener.filter.tables`` keys are ``table`` (any schema) or ``schema.table``; values are actions.
No ``tables`` at all publishes everything. The decision is made once per relation (when its
Relation message arrives), so the hot path is a set lookup. The listener's own state (the
``wal_listener`` schema: backfill progress) is never published.
"""

from __future__ import annotations

from listener.catalog import STATE_SCHEMA
from listener.config import Action, FilterConfig

ALL_ACTIONS = frozenset(a.value.upper() for a in Action)


class TableFilter:
    """Which actions of which tables are published."""

    def __init__(self, cfg: FilterConfig) -> None:
        self._everything = cfg.tables is None
        self._bare: dict[str, frozenset[str]] = {}
        self._qualified: dict[tuple[str, str], frozenset[str]] = {}
        for key, actions in (cfg.tables or {}).items():
            upper = frozenset(a.value.upper() for a in actions)
            if "." in key:
                schema, table = key.split(".", 1)
                self._qualified[(schema, table)] = self._qualified.get((schema, table), frozenset()) | upper
            else:
                self._bare[key] = self._bare.get(key, frozenset()) | upper

    def actions(self, schema: str, table: str) -> frozenset[str]:
        """The upper-case actions published for ``schema.table`` (empty: none)."""
        if schema == STATE_SCHEMA:
            return frozenset()
        if self._everything:
            return ALL_ACTIONS
        return self._bare.get(table, frozenset()) | self._qualified.get((schema, table), frozenset())

    def covers(self, schema: str, table: str) -> bool:
        """Whether any change of ``schema.table`` is published (the tables an initial snapshot reads)."""
        return bool(self.actions(schema, table))
