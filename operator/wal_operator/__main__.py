"""``python -m wal_operator``: the same as the ``wal-operator`` command."""

import sys

from wal_operator.main import main

sys.exit(main())
