"""distcluster: deep image clustering with mutual-information objectives.

Each sub-package is a room of the architecture (docs/architecture.md), importing only the
rooms below it: commands -> inference -> cluster -> tracking -> engine -> config -> data ->
core -> common. The pure core, config and engine import neither Ray, MLflow nor FFCV. The
modules at this level are the `python -m distcluster.X` entry points and stable import paths.
"""

__version__ = "0.1.0"
