"""What the tests share: the pytest plugins (``fixtures``: services and the CI=true rule; ``kube``: the
operator against kmock), the servers they start (``services``, built on ``listener.throwaway``; ``proxy``;
``tls``), helpers to run and read the listener (``harness``, ``checker``), builders of pgoutput messages
and events (``pgwire``, ``events``), and pure helpers (``chart``, ``pod_security``, ``promql``, ``ci``).

``bench/`` imports ``services`` too. Nothing here is shipped: the wheel holds ``listener`` and
``wal_operator`` only.
"""
