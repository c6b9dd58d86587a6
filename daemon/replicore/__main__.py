"""`python -m replicore`: the same as the `replicore` command."""

import sys

from replicore.cli import main

sys.exit(main())
