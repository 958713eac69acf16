"""``python -m service.cli``: the ``detseg`` command (``serve`` re-executes itself this way under its allocator)."""

import sys

from service.cli import main

sys.exit(main())
