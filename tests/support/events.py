"""Building events in-process: the config an EventBuilder takes, and the compiled fast path."""

from __future__ import annotations

from typing import Any

import pytest

from listener import hotpath
from listener.config import Config
from tests.support.ci import in_ci

__all__ = ["SLOT", "compiled_hot_path", "make_config"]

SLOT = "slot_a"


def make_config(
    *,
    tables: dict[str, list[str]] | None = None,
    topics_map: dict[str, str] | None = None,
    prefix: str = "",
    key_from: str = "",
    slot: str = SLOT,
    publisher: dict[str, Any] | None = None,
    transforms: list[dict[str, Any]] | None = None,
    hash_key: str = "",
) -> Config:
    """A config for building events without services (Kafka publisher); ``publisher``: more of its keys."""
    listener: dict[str, Any] = {"slotName": slot, "topicsMap": topics_map or {}, "transforms": transforms or [],
                                "transformsHashKey": hash_key}
    if tables is not None:
        listener["filter"] = {"tables": tables}
    return Config.model_validate(
        {
            "listener": listener,
            "database": {"name": "db", "user": "u"},
            "publisher": {
                "type": "kafka",
                "address": "localhost:9092",
                "topic": "wal_listener",
                "topicPrefix": prefix,
                "messageKeyFrom": key_from,
                **(publisher or {}),
            },
        }
    )


def compiled_hot_path() -> hotpath.Module:
    """The compiled module, for a test that needs it: skips where it was not built (no C compiler at
    install time), fails under CI=true (CI installs with one: a missing module is a broken build)."""
    module = hotpath.load()
    if module is None:
        if in_ci():
            pytest.fail("listener._hotpath was not built: pip install -e . with gcc present", pytrace=False)
        pytest.skip("the compiled fast path is not built (no C compiler at install time)")
    return module
