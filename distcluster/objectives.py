"""The stable import path of the objectives' functions (docs/architecture.md); they live in
distcluster.core.objectives."""

from distcluster.core.objectives import *  # noqa: F403
from distcluster.core.objectives import __all__  # noqa: F401
