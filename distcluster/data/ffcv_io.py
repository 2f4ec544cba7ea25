"""FFCV storage: write any image collection to a .beton, read it back sharded per rank.

A prepared data set is two files: FILE.beton (FFCV: an `image` RGB field and
an int `label` field, -1 when unlabelled) and FILE.beton.json (metadata). The
JSON is written last, so a .beton without it is an interrupted prepare and
is refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from distcluster.common.errors import CorruptImage, UserError
from distcluster.common.files import file_sha256, write_json_atomic
from distcluster.data.arrays import STATS_SAMPLE, channel_stats_of, shard_batches, subset_indices
from distcluster.data.images import BadImage, Collection, fit_image, is_grey, target_size

METADATA_VERSION = 2  # 2: the file's size and SHA-256 are recorded
FULL_CHECK_BYTES = 1 << 30  # .beton files up to 1 GiB are checksummed on every open (~2 s)
# FFCV sets torch's thread count to its loader's (to 1 when imported): remember the real one.
TORCH_THREADS = torch.get_num_threads()
RAW_MAX_PIXELS = 96 * 96  # larger images are stored as JPEG (quality 90)


def metadata_path(beton: Path) -> Path:
    return beton.with_name(beton.name + ".json")


@dataclass
class ScanResult:
    good: list[int]
    sizes: list[tuple[int, int]]
    skipped: list[dict[str, Any]]
    greyscale: bool


def scan(collection: Collection, on_error: str, progress: bool = True) -> ScanResult:
    """Decode every image once: sizes, greyscale, and the unreadable ones (fail or skip)."""
    good, sizes, skipped, greyscale = [], [], [], True
    for index in tqdm(range(len(collection)), desc="checking images", unit="img", disable=not progress):
        try:
            image = collection.read(index)
        except BadImage as exc:
            if on_error == "fail":
                raise CorruptImage(f"corrupt image {exc}") from None
            skipped.append({"index": index, "path": collection.path(index), "error": str(exc)})
            continue
        good.append(index)
        sizes.append(image.shape[:2])
        greyscale = greyscale and is_grey(image)
    if not good:
        raise UserError(f"{collection.source}: no readable images ({len(skipped)} skipped)")
    return ScanResult(good, sizes, skipped, greyscale)


class _SizedForWriter:
    """The writer's dataset: image i resized by the size rule, and its label.

    FFCV's writer processes hang if an item raises, so a failure (the file
    changed after the scan) is recorded in `failures` and a black image is
    written; `write_beton` then refuses the result.
    """

    def __init__(self, collection: Collection, indices: list[int], side: int | None,
                 shape: tuple[int, int], failures: Path) -> None:
        self.collection, self.indices, self.side, self.shape = collection, indices, side, shape
        self.failures = failures

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        index = self.indices[i]
        try:
            image = fit_image(self.collection.read(index), self.side)
            if image.shape[:2] != self.shape:
                raise BadImage(f"{self.collection.path(index)}: size changed since the scan")
        except Exception as exc:  # noqa: BLE001 - must not escape into FFCV's worker
            with open(self.failures, "a") as log:
                log.write(f"{exc}\n")
            image = np.zeros((*self.shape, 3), np.uint8)
        return image, self.collection.label(index)


def write_beton(collection: Collection, out: Path, max_resolution: int = 256, on_error: str = "fail",
                workers: int = 0, progress: bool = True, write_mode: str = "auto") -> dict[str, Any]:
    """Write `collection` to `out` (.beton) and its metadata; returns the metadata.

    write_mode `auto` stores images of at most 96x96 pixels raw and larger ones as JPEG.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    if max_resolution < 2:
        raise ValueError(f"max_resolution must be >= 2 (got {max_resolution})")
    if len(collection) == 0:
        raise UserError(f"{collection.source}: no images")
    found = scan(collection, on_error, progress)
    side = target_size(found.sizes, max_resolution)
    shape = (side, side) if side else tuple(found.sizes[0])
    if write_mode == "auto":
        write_mode = "raw" if shape[0] * shape[1] <= RAW_MAX_PIXELS else "jpg"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp, failures = Path(tmp_name), Path(tmp_name + ".failures")
    try:
        fields = {"image": RGBImageField(write_mode=write_mode, jpeg_quality=90), "label": IntField()}
        writer = DatasetWriter(str(tmp), fields, num_workers=workers or min(8, os.cpu_count() or 1))
        quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
        with quiet:  # FFCV's writer draws its own progress bar
            writer.from_indexed_dataset(_SizedForWriter(collection, found.good, side, shape, failures))
        if failures.exists():
            first = failures.read_text().splitlines()[0]
            raise UserError(f"image failed while writing: {first}")
        labels = [collection.label(i) for i in found.good]
        metadata = {
            "version": METADATA_VERSION, "count": len(found.good), "image_shape": [*shape, 3],
            "channels": 1 if found.greyscale else 3, "labelled": min(labels) >= 0,
            "label_names": collection.class_names, "num_classes": len(set(labels) - {-1}),
            "source": collection.source, "format": collection.format, "write_mode": write_mode,
            "resized_to": side, "max_resolution": max_resolution,
            "skipped_count": len(found.skipped), "skipped": found.skipped,
            "paths": [collection.path(i) for i in found.good] if collection.path(0) else None,
        }
        metadata.update(bytes=tmp.stat().st_size, sha256=file_sha256(tmp))
        metadata_path(out).unlink(missing_ok=True)  # an old JSON must not vouch for the new file
        os.replace(tmp, out)
        write_json_atomic(metadata_path(out), metadata)
        return metadata
    finally:
        tmp.unlink(missing_ok=True)
        failures.unlink(missing_ok=True)


def read_metadata(beton: Path) -> dict[str, Any]:
    if not beton.is_file():
        raise UserError(f"data file not found: {beton}")
    meta = metadata_path(beton)
    if not meta.is_file():
        raise UserError(f"{beton}: no {meta.name} beside it (interrupted prepare?); run "
                        "python -m distcluster.prepare again")
    try:
        metadata = json.loads(meta.read_text())
    except (ValueError, OSError) as exc:
        raise UserError(f"{meta}: unreadable metadata ({exc})") from None
    _check_metadata(metadata, meta)
    _check_beton(beton, metadata)
    return metadata


_METADATA_TYPES = {"count": int, "image_shape": list, "channels": int, "labelled": bool}


def _check_metadata(metadata: Any, meta: Path) -> None:
    """The fields every reader relies on, with their types and sane values."""
    ok = isinstance(metadata, dict) and all(
        isinstance(metadata.get(key), kind) for key, kind in _METADATA_TYPES.items())
    if ok:
        shape = metadata["image_shape"]
        ok = (metadata["count"] > 0 and metadata["channels"] in (1, 3) and len(shape) == 3
              and all(isinstance(v, int) and v > 0 for v in shape))
    if not ok:
        raise UserError(f"{meta}: not the metadata distcluster.prepare writes (edited or damaged?); "
                        "prepare the data again")


def _check_beton(beton: Path, metadata: dict[str, Any]) -> None:
    """Before FFCV opens it (a damaged file can crash the interpreter): FFCV's header against
    the metadata, the recorded size, and the SHA-256 for files up to FULL_CHECK_BYTES."""
    from ffcv.types import CURRENT_VERSION, HeaderType

    size = beton.stat().st_size
    damaged = f"{beton}: damaged or not the file its metadata describes"
    if size < HeaderType.itemsize:
        raise UserError(f"{damaged} (only {size} bytes); prepare it again")
    header = np.fromfile(beton, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION or header["num_samples"] != metadata["count"] \
            or header["num_fields"] != 2:
        raise UserError(f"{damaged} (its header says {int(header['num_samples'])} images, version "
                        f"{int(header['version'])}); prepare it again")
    if "bytes" in metadata and size != metadata["bytes"]:
        raise UserError(f"{damaged} ({size} bytes, {metadata['bytes']} written); prepare it again")
    if "sha256" in metadata and size <= FULL_CHECK_BYTES and file_sha256(beton) != metadata["sha256"]:
        raise UserError(f"{damaged} (its SHA-256 changed); prepare it again")


def _traversal_order_class():
    from ffcv.traversal_order.base import TraversalOrder

    class GlobalBatchOrder(TraversalOrder):
        """This rank's rows of every global batch (distcluster.data.arrays.shard_batches).

        FFCV 1.0.2 takes a custom order as an instance it calls with the loader,
        hence `__call__` binding the loader instead of `__init__`.
        """

        def __init__(self, global_batch: int, seed: int) -> None:  # noqa: D107 - no super(): no loader yet
            self.global_batch, self.order_seed = global_batch, seed

        def __call__(self, loader) -> GlobalBatchOrder:
            self.loader, self.indices, self.seed = loader, loader.indices, loader.seed
            self.distributed, self.sampler = loader.distributed, None
            if self.distributed:
                self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
            else:
                self.rank, self.world_size = 0, 1
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            rows = shard_batches(len(self.indices), self.global_batch, self.world_size, self.rank,
                                 epoch, self.order_seed)
            order = torch.cat(rows).numpy() if rows else np.zeros(0, np.int64)
            return self.indices[order]

    return GlobalBatchOrder


class BetonSource:
    """A prepared .beton read through FFCV loaders (the ImageSource protocol)."""

    def __init__(self, path: Path, max_samples: int = 0, threads: int = 0) -> None:
        """`threads`: FFCV decoding threads, which FFCV also imposes on torch (0 = torch's count
        before FFCV was imported)."""
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        self.name = str(path)
        self.class_names = self.metadata.get("label_names")
        self.indices = subset_indices(self.metadata["count"], max_samples)  # the images read
        self.threads = threads or TORCH_THREADS
        self._train_loader = None
        self.labels = self._read_labels() if self.metadata["labelled"] else None

    @property
    def channels(self) -> int:
        return self.metadata["channels"]

    def paths(self) -> list[str] | None:
        """Source file of each image (folders and zips), else None."""
        paths = self.metadata.get("paths")
        return [paths[i] for i in self.indices] if paths else None

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(self.metadata["image_shape"][:2])

    def __len__(self) -> int:
        return len(self.indices)

    def _loader(self, batch: int, fields: tuple[str, ...], order=None, distributed: bool = False,
                indices: np.ndarray | None = None):
        from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import ToTensor, ToTorchImage

        pipelines = {"image": [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage()] if "image" in fields
                     else None,
                     "label": [IntDecoder(), ToTensor()] if "label" in fields else None}
        return Loader(str(self.path), batch_size=batch, num_workers=self.threads,
                      order=order or OrderOption.SEQUENTIAL, distributed=distributed,
                      indices=self.indices if indices is None else indices, pipelines=pipelines,
                      drop_last=order is not None, seed=0)

    def _read_labels(self) -> torch.Tensor:
        loader = self._loader(4096, ("label",))
        return torch.cat([batch[0].reshape(-1).long().clone() for batch in loader])

    def _images(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[:, :1] if self.channels == 1 else batch

    def channel_stats(self) -> tuple[list[float], list[float]]:
        sample = self.indices[subset_indices(len(self), STATS_SAMPLE)]
        loader = self._loader(1024, ("image",), indices=sample)
        return channel_stats_of(self._images(batch[0]) for batch in loader)

    def epoch_batches(self, epoch: int, global_batch: int, world_size: int, rank: int,
                      seed: int) -> Iterator[torch.Tensor]:
        distributed = world_size > 1
        if distributed:
            group = (torch.distributed.get_rank(), torch.distributed.get_world_size())
            if group != (rank, world_size):
                raise RuntimeError(f"rank/world size {rank}/{world_size} disagree with the process group")
        if self._train_loader is None:
            order = _traversal_order_class()(global_batch, seed)
            self._train_loader = self._loader(global_batch // world_size, ("image",), order, distributed)
        self._train_loader.next_epoch = epoch
        for batch in self._train_loader:
            yield self._images(batch[0])

    def batches(self, size: int) -> Iterator[torch.Tensor]:
        yield from self.range_batches(0, len(self), size)

    def range_batches(self, start: int, stop: int, size: int) -> Iterator[torch.Tensor]:
        # FFCV refills the same memory for the next batches: a copy may be kept by the caller
        # (training batches in epoch_batches are used up at once and are not copied).
        for batch in self._loader(size, ("image",), indices=self.indices[start:stop]):
            yield self._images(batch[0]).clone()
