"""`python -m vitops`: the `vitops` command."""

import sys

from vitops.flows.cli import main

sys.exit(main())
