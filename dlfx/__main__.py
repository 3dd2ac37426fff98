"""`python -m dlfx` runs the dlfx command."""

import sys

from dlfx.cli import main

sys.exit(main())
