"""The three mutual-information clustering objectives (docs/methods.md).

Each objective is a small module holding its heads (the Objective protocol).
Its constructor takes the backbone's feature size, the cluster count and its
arguments: one typed dataclass (IICArguments, ...) holding the paper's defaults,
which config composes into its sections, or keyword overrides of it; a bad one
raises ArgumentError (a ValueError) naming it. `loss(features, step, epoch)` takes backbone
features of every crop and returns an ObjectiveResult; the batch statistics
inside are global under a process group. `cluster_probs` maps features of
whole images to (S, B, K) probabilities of its S sub-heads.
"""

from distcluster.core.objectives.base import ArgumentError, Objective, ObjectiveModule, ObjectiveResult
from distcluster.core.objectives.crlc import CRLC, CRLCArguments, crlc_cluster_nce, nt_xent
from distcluster.core.objectives.iic import IIC, IICArguments, iic_loss
from distcluster.core.objectives.imc_swav import IMCSwAV, IMCSwAVArguments, imc_mi_loss, swav_loss
from distcluster.core.objectives.sinkhorn import sinkhorn

__all__ = [
    "ArgumentError",
    "Objective",
    "ObjectiveModule",
    "CRLC",
    "CRLCArguments",
    "IIC",
    "IICArguments",
    "IMCSwAV",
    "IMCSwAVArguments",
    "ObjectiveResult",
    "crlc_cluster_nce",
    "iic_loss",
    "imc_mi_loss",
    "nt_xent",
    "sinkhorn",
    "swav_loss",
]
