"""`python -m distcluster.tune`: see distcluster.commands.tune."""

import sys

from distcluster.commands.tune import main

if __name__ == "__main__":
    sys.exit(main())
