"""``python -m ossfs``: the same as the ``ossfs`` command."""

import sys

from ossfs.cli import main

sys.exit(main())
