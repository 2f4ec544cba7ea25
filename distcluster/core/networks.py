"""Backbones, and the network that joins one to an objective's heads.

Backbones map images (B, C, H, W) to features (B, D)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from distcluster.common.errors import check

if TYPE_CHECKING:
    from distcluster.core.objectives import Objective, ObjectiveResult


BACKBONES = ("small_cnn", "resnet18", "resnet34")


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    width: int = 64  # small_cnn only: channels of the first stage
    stages: int = 2  # small_cnn only: stages of two conv layers, each after the first at half size
    pool: int = 2  # small_cnn only: side of the final average-pooled grid (1: global average)
    # The backbone sees the images' edges alone (SobelEdges): no colour to cluster by, as IIC
    # feeds CIFAR. Off by default.
    sobel: bool = False
    # BatchNorm statistics over the global batch (true), per worker (false), or auto: global on
    # GPUs (SyncBatchNorm over NCCL), per worker on CPUs (two gloo collectives per layer cost more
    # than they give there). Only global statistics make N workers equal one process in training.
    sync_batchnorm: bool | str = "auto"

    def validate(self) -> None:
        check(self.backbone in BACKBONES, "model.backbone", self.backbone,
               f"must be one of {', '.join(BACKBONES)}")
        check(self.width >= 4, "model.width", self.width, "must be >= 4")
        check(type(self.stages) is int and 1 <= self.stages <= 4, "model.stages", self.stages,
               "must be an integer from 1 to 4")
        check(type(self.pool) is int and 1 <= self.pool <= 4, "model.pool", self.pool,
               "must be an integer from 1 to 4")
        check(isinstance(self.sobel, bool), "model.sobel", self.sobel, "must be true or false")
        check(isinstance(self.sync_batchnorm, bool) or self.sync_batchnorm == "auto",
               "model.sync_batchnorm", self.sync_batchnorm, "must be true, false or auto")


class SmallConvNet(nn.Module):
    """Stages of two 3x3 conv layers for tiny images (digits' 8x8, CIFAR crops of 16-24 px):
    stage s has width * 2**s channels and, after the first, half the previous side; a final
    average pool to a pool x pool grid gives D = pool**2 x the last stage's channels.

    The default 2x2 grid keeps coarse position, which tiny images need to tell shapes apart
    (a 6 and a 9 differ mainly in where the loop sits); pool 1 is the global average.
    """

    def __init__(self, in_channels: int, width: int = 32, stages: int = 2, pool: int = 2) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        layers = [*block(in_channels, width), *block(width, width)]
        for stage in range(1, stages):
            cin, cout = width * 2 ** (stage - 1), width * 2 ** stage
            layers += [nn.MaxPool2d(2), *block(cin, cout), *block(cout, cout)]
        self.layers = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(pool), nn.Flatten())
        self.feature_dim = pool * pool * width * 2 ** (stages - 1)

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


class SobelEdges(nn.Module):
    """(B, C, H, W) -> (B, 2, H, W): the horizontal and vertical Sobel gradients of the mean of
    the channels. Fixed, not trained (a buffer, kept in the state dict)."""

    def __init__(self) -> None:
        super().__init__()
        dx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.register_buffer("kernels", torch.stack([dx, dx.t()]).unsqueeze(1))  # (2, 1, 3, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grey = images.mean(dim=1, keepdim=True)
        return nn.functional.conv2d(grey, self.kernels.to(grey.dtype), padding=1)


class OnEdges(nn.Module):
    """A backbone fed SobelEdges of the images."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.edges = SobelEdges()
        self.backbone = backbone
        self.feature_dim = backbone.feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.edges(images))


def build_backbone(cfg: ModelConfig, in_channels: int) -> nn.Module:
    if cfg.sobel:
        return OnEdges(build_backbone(replace(cfg, sobel=False), 2))
    if cfg.backbone == "small_cnn":
        return SmallConvNet(in_channels, cfg.width, cfg.stages, cfg.pool)
    return cifar_resnet(int(cfg.backbone.removeprefix("resnet")), in_channels)


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
