import sys

from grow.cli import main

sys.exit(main())
