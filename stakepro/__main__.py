"""``python -m stakepro [serve]``: see :mod:`stakepro.run`."""

import sys

from stakepro.run import main

sys.exit(main())
