"""Importing third-party packages without the standard library's ``importlib.metadata``, at the listener's start.

psycopg, psycopg-binary and nats-py each ask ``importlib.metadata`` for their own version when imported, and
pydantic's plugin loader imports its ``entry_points`` (called only when plugins are not disabled, which the
listener's start does). Importing the real module (``email``, ``zipfile``, ``csv`` and more) and reading the
distributions' metadata was ~4% of the start-up's instructions (callgrind). Within
:func:`metadata_versions_only` a stand-in answers those questions instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import types
from collections.abc import Iterator
from typing import Any


class _VersionsOnly(types.ModuleType):
    """``importlib.metadata`` as far as those imports use it. ``version`` reads a distribution's version from the
    name of its ``.dist-info`` directory, the first on ``sys.path`` (where importlib.metadata finds it); a
    distribution not found that way, ``entry_points`` when called, and anything else asked of this module come
    from the real one."""

    def __init__(self) -> None:
        super().__init__("importlib.metadata")
        self._dists: dict[str, str] | None = None

    def version(self, name: str) -> str:
        if self._dists is None:
            self._dists = {}
            for entry in sys.path:
                try:
                    names = os.listdir(entry or ".")
                except OSError:
                    continue
                for dist in names:
                    if dist.endswith(".dist-info") and "-" in dist:
                        project, _, release = dist.removesuffix(".dist-info").partition("-")
                        self._dists.setdefault(_normalized(project), release)
        found = self._dists.get(_normalized(name))
        if found:
            return found
        return str(_real().version(name))

    def entry_points(self, **params: Any) -> Any:
        return _real().entry_points(**params)

    def __getattr__(self, name: str) -> Any:
        return getattr(_real(), name)


def _real() -> types.ModuleType:
    import importlib.metadata

    return importlib.metadata


def _normalized(project: str) -> str:
    """A distribution's name compared as packaging does (``psycopg-binary`` is ``psycopg_binary``)."""
    return re.sub(r"[-_.]+", "_", project).lower()


@contextlib.contextmanager
def metadata_versions_only() -> Iterator[None]:
    """Imports within see :class:`_VersionsOnly` as ``importlib.metadata``; afterwards the real one is imported
    as usual by whatever asks for it. Nothing changes when the real one was imported already."""
    if "importlib.metadata" in sys.modules:
        yield
        return
    import importlib

    lean = _VersionsOnly()
    sys.modules["importlib.metadata"] = lean
    try:
        yield
    finally:
        if sys.modules.get("importlib.metadata") is lean:
            del sys.modules["importlib.metadata"]
        if importlib.__dict__.get("metadata") is lean:
            del importlib.metadata
