"""`python -m distcluster.prepare`: see distcluster.commands.prepare."""

import sys

from distcluster.commands.prepare import main

if __name__ == "__main__":
    sys.exit(main())
