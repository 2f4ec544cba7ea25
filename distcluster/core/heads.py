"""The heads objectives put on a backbone: cluster sub-heads, MLPs and SwAV prototypes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GroupedLinear(nn.Module):
    """S independent linear layers applied at once: (S, B, I) -> (S, B, O)."""

    def __init__(self, groups: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        bound = 1 / math.sqrt(in_dim)  # nn.Linear's default initialisation range
        self.weight = nn.Parameter(torch.empty(groups, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(groups, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class ClusterHead(nn.Module):
    """S sub-heads giving cluster logits: features (B, D) -> logits (S, B, K).

    With `hidden` > 0 each sub-head is an MLP D -> hidden -> ReLU -> K (CRLC),
    otherwise a single linear layer (IIC).
    """

    def __init__(self, in_dim: int, clusters: int, subheads: int = 1, hidden: int = 0) -> None:
        super().__init__()
        self.subheads = subheads
        self.hidden = nn.Linear(in_dim, subheads * hidden) if hidden else None
        self.out = GroupedLinear(subheads, hidden or in_dim, clusters)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.hidden is None:
            x = features.unsqueeze(0).expand(self.subheads, -1, -1)
        else:
            x = F.relu(self.hidden(features)).unflatten(-1, (self.subheads, -1)).transpose(0, 1)
        return self.out(x)


def mlp(dims: list[int], batch_norm: bool = True, relu: bool = True) -> nn.Sequential:
    """Linear layers with (BN +) (ReLU) between them, none after the last."""
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(cin, cout))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(cout)] if batch_norm else []
            layers += [nn.ReLU(inplace=True)] if relu else []
    return nn.Sequential(*layers)


class Prototypes(nn.Module):
    """P prototype vectors on the unit sphere; scores = normalised embeddings @ C^T."""

    def __init__(self, dim: int, count: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(F.normalize(torch.randn(count, dim), dim=1))

    @torch.no_grad()
    def normalize_(self, where: torch.Tensor | None = None) -> None:
        """Project back onto the sphere (SwAV does it before every step; distcluster after every
        update), only `where` it is 1 (a 0-d tensor) when given: a skipped update changes nothing."""
        normalised = F.normalize(self.weight, dim=1)
        self.weight.copy_(normalised if where is None else torch.where(where > 0, normalised, self.weight))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings @ self.weight.t()
