"""`python -m trawl ...` is the `trawl` command (how `trawl up` starts its services)."""

import sys

from trawl.cli import main

sys.exit(main())
