"""Backbones and heads. Backbones map images (B, C, H, W) to features (B, D)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from distcluster.config import ModelConfig

if TYPE_CHECKING:
    from distcluster.objectives import Objective, ObjectiveResult


class SmallConvNet(nn.Module):
    """Four 3x3 conv layers for tiny images (digits' 8x8, 16 px crops); D = 8 * width.

    A final 2x2 pooling keeps coarse position, which tiny images need to tell
    shapes apart (a 6 and a 9 differ mainly in where the loop sits).
    """

    def __init__(self, in_channels: int, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        self.layers = nn.Sequential(
            *block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.feature_dim = 8 * width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def cifar_resnet(depth: int, in_channels: int) -> nn.Module:
    """torchvision ResNet-18/34 with the CIFAR stem: 3x3 stride-1 conv, no max-pool."""
    import torchvision  # here: importing it costs every process (each Ray worker) over a second

    net = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34}[depth]()
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def build_backbone(cfg: ModelConfig, in_channels: int) -> nn.Module:
    if cfg.backbone == "small_cnn":
        return SmallConvNet(in_channels, cfg.width)
    return cifar_resnet(int(cfg.backbone.removeprefix("resnet")), in_channels)


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
    def normalize_(self) -> None:
        """Project back onto the sphere (SwAV does this before every step)."""
        self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings @ self.weight.t()


class ClusterModel(nn.Module):
    """Backbone + an objective's heads. forward(crop groups) -> the objective's result.

    Crops of one size arrive as one tensor (count * B, C, s, s) and pass through
    the backbone together; the loss is computed inside forward so that DDP sees
    one forward per step whatever the number of crop sizes.
    """

    def __init__(self, backbone: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.backbone = backbone
        self.objective = objective

    def forward(self, crop_groups: list[torch.Tensor], batch: int, step: int = 0,
                epoch: int = 0) -> ObjectiveResult:
        features: list[torch.Tensor] = []
        for group in crop_groups:
            features.extend(self.backbone(group).split(batch))
        # Heads and batch statistics (exp(u / 0.05), logs of joints) need fp32 even
        # when the backbone runs under bf16 autocast.
        with torch.autocast(features[0].device.type, enabled=False):
            return self.objective.loss([f.float() for f in features], step, epoch)

    def cluster_probs(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, C, H, W) normalised -> (S, B, K) probabilities of every sub-head."""
        features = self.backbone(images)
        with torch.autocast(features.device.type, enabled=False):
            return self.objective.cluster_probs(features.float())
