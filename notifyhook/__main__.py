"""`python -m notifyhook`: the same as the `notifyhook` command."""

import sys

from notifyhook.cli import main

sys.exit(main())
