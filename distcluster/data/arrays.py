"""Image sources and per-rank sharding.

A source yields uint8 image batches (B, C, H, W) and may carry labels (used
only for evaluation). Training batches come from `epoch_batches`: one seeded
permutation per epoch, cut into global batches, each rank taking its own
rows (see `shard_batches`). The in-memory ArraySource lives here; the FFCV
source (distcluster.data.ffcv_io) follows the same protocol and the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from distcluster.common.errors import UserError
from distcluster.data.images import digits_arrays, is_grey, read_npz, to_rgb_array


class ImageSource(Protocol):
    name: str
    class_names: list[str] | None
    labels: torch.Tensor | None  # (N,) int64, evaluation only

    @property
    def channels(self) -> int: ...

    @property
    def image_shape(self) -> tuple[int, int]: ...

    def __len__(self) -> int: ...

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std in [0, 1] units, for input normalisation."""

    def epoch_batches(self, epoch: int, global_batch: int, world_size: int, rank: int,
                      seed: int) -> Iterator[torch.Tensor]:
        """This rank's uint8 batches for one epoch, in the order of `shard_batches`."""

    def batches(self, size: int) -> Iterator[torch.Tensor]:
        """Every image once, in index order."""

    def range_batches(self, start: int, stop: int, size: int) -> Iterator[torch.Tensor]:
        """Images start ... stop - 1, in index order, `size` at a time."""

    def paths(self) -> Sequence[str] | None:
        """The file each image came from, when known."""

    def take(self, indices: np.ndarray) -> torch.Tensor:
        """The images at these positions, in sorted order, reading only them."""


def gather_images(source: ImageSource, indices: np.ndarray) -> dict[int, np.ndarray]:
    """{index: (H, W, C) uint8} for the wanted indices, reading only those images."""
    wanted = np.unique(np.asarray(indices, dtype=np.int64))
    if len(wanted) == 0:
        return {}
    images = source.take(wanted).permute(0, 2, 3, 1).numpy()
    return {int(i): images[row].copy() for row, i in enumerate(wanted)}


def image_size(source: ImageSource) -> int:
    return min(source.image_shape)


def channel_stats_of(batches: Iterator[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units over uint8 batches."""
    total = total_sq = count = 0
    for batch in batches:
        x = batch.double().div(255)
        total = total + x.sum(dim=(0, 2, 3))
        total_sq = total_sq + x.square().sum(dim=(0, 2, 3))
        count += x.numel() // x.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
    return mean.tolist(), std.tolist()


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
    def image_shape(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])

    def __len__(self) -> int:
        return self.images.shape[0]

    @classmethod
    def from_hwc(cls, images: np.ndarray, labels: np.ndarray | None, name: str,
                 class_names: list[str] | None = None) -> ArraySource:
        """From (N, H, W, C) uint8; RGBA is composited on white, and grey images (one channel, or
        R = G = B) are one channel, as prepare makes them (images.is_grey)."""
        if images.shape[-1] == 4:
            images = to_rgb_array(images)
        if images.shape[-1] == 3 and is_grey(images):
            images = images[..., :1]
        chw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        if not chw.flags.writeable:  # one channel, read-only (Ray's object store): no copy was made
            chw = chw.copy()
        tensor = torch.from_numpy(chw)
        return cls(tensor, None if labels is None else torch.from_numpy(labels).long(), name, class_names)

    def channel_stats(self) -> tuple[list[float], list[float]]:
        rows = torch.from_numpy(subset_indices(len(self), STATS_SAMPLE))
        return channel_stats_of(self.images[rows].split(1024))

    def paths(self) -> Sequence[str] | None:
        return None

    def epoch_batches(self, epoch: int, global_batch: int, world_size: int, rank: int,
                      seed: int) -> Iterator[torch.Tensor]:
        for indices in shard_batches(len(self), global_batch, world_size, rank, epoch, seed):
            yield self.images[indices]

    def batches(self, size: int) -> Iterator[torch.Tensor]:
        yield from self.range_batches(0, len(self), size)

    def range_batches(self, start: int, stop: int, size: int) -> Iterator[torch.Tensor]:
        yield from self.images[start:stop].split(size)

    def take(self, indices: np.ndarray) -> torch.Tensor:
        return self.images[torch.from_numpy(np.sort(np.asarray(indices, dtype=np.int64)))]

    def subset(self, count: int) -> ArraySource:
        """`count` images drawn as by `subset_indices`."""
        rows = torch.from_numpy(subset_indices(len(self), count))
        labels = None if self.labels is None else self.labels[rows]
        return ArraySource(self.images[rows], labels, self.name, self.class_names)


SUBSET_SEED = 0  # the same subset for every run and training seed
STATS_SAMPLE = 10_000  # images behind the normalisation statistics, drawn by subset_indices


def subset_indices(total: int, count: int) -> np.ndarray:
    """Sorted indices of `count` of `total` images (all when count is 0 or >= total), drawn
    at random with a fixed seed: the same images on every run, spread over the whole
    collection, so that the first classes of a folder sorted by class are not all one gets."""
    if not count or count >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(SUBSET_SEED).choice(total, count, replace=False))


def load_digits_source() -> ArraySource:
    images, labels = digits_arrays()
    return ArraySource.from_hwc(images, labels, "digits", [str(d) for d in range(10)])


def load_source(spec: str, max_samples: int = 0) -> ArraySource:
    """An in-memory source for `digits` or a `.npz` file (other SPECs go through FFCV)."""
    if spec == "digits":
        source = load_digits_source()
    elif spec.lower().endswith(".npz"):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"data file not found: {spec}")
        source = ArraySource.from_hwc(*read_npz(path), str(path))
    else:
        raise UserError(f"'{spec}' is not an in-memory source (digits or .npz)")
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
