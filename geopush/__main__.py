"""`python -m geopush` runs the `geopush` command."""

import sys

from geopush.cli import main

sys.exit(main())
