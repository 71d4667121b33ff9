"""Whether the tests run in CI: ``CI=true`` (also ``1`` / ``yes``), as ``.ci/run`` sets it.

In CI a missing service, a missing compiled module or a skipped test is a failure, not a skip.
"""

from __future__ import annotations

import os

__all__ = ["in_ci"]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
