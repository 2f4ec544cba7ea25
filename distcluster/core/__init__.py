"""The pure core: tensor math only. Objectives and their heads, Sinkhorn, information measures,
clustering metrics, backbones and the collectives that do nothing without a process group.
No I/O, no config files, no Ray, MLflow or FFCV.
"""
