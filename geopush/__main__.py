"""`python -m geopush` runs the `geopush` command."""

import sys

from geopush.cli.main import main

sys.exit(main())
