"""In-memory image sources and per-rank sharding.

A source is uint8 images (N, C, H, W) with optional labels (used only for
evaluation). Every rank builds the same source and takes its own shard of
each global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distcluster.errors import UserError


@dataclass
class ArraySource:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor | None  # (N,) int64, evaluation only
    name: str
    class_names: list[str] | None = None

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return min(self.images.shape[2:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std in [0, 1] units, for input normalisation."""
        sample = self.images[:10_000].float().div(255)
        mean = sample.mean(dim=(0, 2, 3))
        std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return mean.tolist(), std.tolist()

    def subset(self, count: int) -> ArraySource:
        labels = None if self.labels is None else self.labels[:count]
        return ArraySource(self.images[:count], labels, self.name, self.class_names)


def load_digits_source() -> ArraySource:
    """sklearn's 1,797 8x8 digits (values 0-16) as uint8 greyscale images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.round(digits.images * (255 / 16)), 0, 255).astype(np.uint8)
    return ArraySource(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(digits.target).long(),
                       "digits", [str(d) for d in range(10)])


def load_npz_source(path: Path) -> ArraySource:
    """`.npz` with `x` (N, H, W, C) or (N, H, W) uint8 and optional integer `y`."""
    try:
        arrays = np.load(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc})") from None
    if "x" not in arrays:
        raise UserError(f"{path}: .npz has no array 'x' (found: {', '.join(arrays.files) or 'none'})")
    x = arrays["x"]
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.dtype != np.uint8 or len(x) == 0:
        raise UserError(f"{path}: 'x' must be non-empty uint8 (N, H, W, C), got {x.dtype} {x.shape}")
    labels = None
    if "y" in arrays:
        y = arrays["y"]
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"{path}: 'y' must be integers of shape ({len(x)},), got {y.shape}")
        labels = torch.from_numpy(y.astype(np.int64))
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return ArraySource(images, labels, str(path))


def load_source(spec: str, max_samples: int = 0) -> ArraySource:
    """Resolve a data SPEC (architecture.md) that fits in memory."""
    if spec == "digits":
        source = load_digits_source()
    elif spec.endswith(".npz"):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"data file not found: {spec}")
        source = load_npz_source(path)
    else:
        raise UserError(f"unsupported data spec '{spec}': this version reads 'digits' and .npz files")
    return source.subset(max_samples) if max_samples else source


def shard_batches(num_samples: int, global_batch: int, world_size: int, rank: int,
                  epoch: int, seed: int) -> list[torch.Tensor]:
    """This rank's sample indices for every step of an epoch.

    One seeded permutation per epoch (the same on every rank) is cut into full
    global batches; rank r takes rows [r * b, (r + 1) * b) of each, b =
    global_batch / world_size. Shards are disjoint and, over the ranks, cover
    every sample of the full batches once.
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_samples, generator=gen)
    local = global_batch // world_size
    steps = num_samples // global_batch
    return [order[s * global_batch + rank * local: s * global_batch + (rank + 1) * local]
            for s in range(steps)]
