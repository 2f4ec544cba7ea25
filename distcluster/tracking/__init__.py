"""MLflow: runs, the registry, the pyfunc model every run logs, and the plots logged with it.
"""
