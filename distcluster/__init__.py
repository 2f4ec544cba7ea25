"""distcluster: deep image clustering with mutual-information objectives.

The pure core (config, objectives, models, augment, metrics, data, loop)
imports neither ray, mlflow nor ffcv; the edge (train, ray_train, tracking)
wires it to Ray Train and MLflow.
"""

__version__ = "0.1.0"
