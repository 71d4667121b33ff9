"""The fixtures and hooks of the test suite are pytest plugins in tests/support/, registered here, once:

- ``tests.support.fixtures``: the real services (PostgreSQL, NATS, Tansu, the Pub/Sub emulator, RabbitMQ),
  per-test databases, factories for private servers, and the ``CI=true`` rule (a missing service or a
  skipped test fails the run);
- ``tests.support.kube``: the operator running in-process against kmock (``cluster``, ``clean_listeners``).

Test modules import helpers from ``tests.support.*``, never fixtures and never other test modules.
"""

import pytest

# the helpers' asserts report their operands like the tests' own (the plugins get this anyway)
pytest.register_assert_rewrite("tests.support")

pytest_plugins = ["tests.support.fixtures", "tests.support.kube"]
