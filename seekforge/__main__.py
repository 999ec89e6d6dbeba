"""`python -m seekforge ...`: the same command line as the `seekforge` console script."""

import sys

from seekforge.cli import main

sys.exit(main())
