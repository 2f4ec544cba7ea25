"""`python -m distcluster.evaluate`: see distcluster.commands.evaluate."""

import sys

from distcluster.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
