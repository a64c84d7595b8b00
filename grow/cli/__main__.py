"""``python -m grow.cli``: the same entry point as ``grow``."""

import sys

from grow.cli import main

sys.exit(main())
