"""``python -m listener``: the same as the ``wal-listener`` command."""

import sys

from listener.cli import main

sys.exit(main())
