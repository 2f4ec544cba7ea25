"""`python -m distcluster.train`: see distcluster.commands.train."""

import sys

from distcluster.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
