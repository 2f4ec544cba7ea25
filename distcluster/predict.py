"""`python -m distcluster.predict`: see distcluster.commands.predict."""

import sys

from distcluster.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
