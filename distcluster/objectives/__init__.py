"""The three mutual-information clustering objectives (methods.md).

Each objective is a small module holding its heads (the Objective protocol).
Its constructor takes the backbone's feature size, the cluster count and
typed keyword arguments with the paper's defaults, and raises ArgumentError
(a ValueError) naming a bad one. `loss(features, step, epoch)` takes backbone
features of every crop and returns an ObjectiveResult; the batch statistics
inside are global under a process group. `cluster_probs` maps features of
whole images to (S, B, K) probabilities of its S sub-heads.
"""

from distcluster.objectives.base import ArgumentError, Objective, ObjectiveModule, ObjectiveResult
from distcluster.objectives.crlc import CRLC, crlc_cluster_nce, nt_xent
from distcluster.objectives.iic import IIC, iic_loss
from distcluster.objectives.imc_swav import IMCSwAV, imc_mi_loss, swav_loss
from distcluster.objectives.sinkhorn import sinkhorn

__all__ = [
    "ArgumentError",
    "Objective",
    "ObjectiveModule",
    "CRLC",
    "IIC",
    "IMCSwAV",
    "ObjectiveResult",
    "crlc_cluster_nce",
    "iic_loss",
    "imc_mi_loss",
    "nt_xent",
    "sinkhorn",
    "swav_loss",
]
