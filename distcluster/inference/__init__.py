"""Assigning many images to clusters: predict and evaluate's model and data, in one process or on
Ray Data actors, and tables written as the rows arrive.

`load_model` and `assignment_table` are importable from here because every MLflow model logged
before distcluster's sub-packages (its own copy of pyfunc_model.py) imports them from
`distcluster.inference`; new models import them from distcluster.engine.exported.
"""

from distcluster.engine.exported import assignment_table, load_model

__all__ = ["assignment_table", "load_model"]
