"""``python -m guard`` is ``mx-guard``."""

import sys

from guard.cli import main

sys.exit(main())
