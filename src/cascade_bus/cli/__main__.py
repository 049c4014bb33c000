"""``python -m cascade_bus.cli``: the same as the ``cascade-bus`` command."""

import sys

from . import main

sys.exit(main())
