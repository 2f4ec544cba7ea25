"""FFCV storage: write any image collection to a .beton, read it back sharded per rank.

A prepared data set is two files: FILE.beton (FFCV: an `image` RGB field and
an int `label` field, -1 when unlabelled) and FILE.beton.json (metadata). The
JSON is written last, so a .beton without it is an interrupted prepare and
is refused.

The JSON records the .beton's size, its SHA-256 and a digest of each 4 MiB
chunk of it. Every open checks the size, FFCV's header and SAMPLED_CHUNKS
chunks spread over the file, the first and the last among them: a cost that
does not grow with the file. So an open always finds a truncated, extended or
swapped file, and a change inside the file only when it lies in a sampled
chunk; `verify_beton` (`python -m distcluster.prepare --verify FILE.beton`)
checks every chunk.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from distcluster.common.errors import CorruptImage, UserError, one_line
from distcluster.common.files import (
    file_digests,
    file_sha256,
    read_chunk_digests,
    spread_sample,
    write_json_atomic,
    write_text_atomic,
)
from distcluster.data.arrays import STATS_SAMPLE, channel_stats_of, shard_batches, subset_indices
from distcluster.data.images import BadImage, Collection, fit_image, is_grey, target_size

METADATA_VERSION = 3  # 2: the file's size and SHA-256 are recorded; 3: and its chunks' digests
CHUNK_BYTES = 4 << 20  # a .beton's digests are kept per 4 MiB chunk (~600 KB of JSON per 100 GB)
SAMPLED_CHUNKS = 16  # chunks hashed on every open: at most 64 MiB, whatever the file's size
# Files written before chunk digests (version 2) are hashed whole on every open up to this size
# (0.55 s per GiB on the 2-core machine from the page cache, more from disk), above it checked
# by size and header only.
FULL_CHECK_BYTES = 1 << 30
# FFCV sets torch's thread count to its loader's (to 1 when imported): remember the real one.
TORCH_THREADS = torch.get_num_threads()
RAW_MAX_PIXELS = 96 * 96  # larger images are stored as JPEG (quality 90)


def metadata_path(beton: Path) -> Path:
    return beton.with_name(beton.name + ".json")


def paths_path(beton: Path) -> Path:
    """FILE.beton.paths.json: every image's source file, read only by what needs it (predict's
    rows), not at every open (tens of bytes an image: 40 MB for a million)."""
    return beton.with_name(beton.name + ".paths.json")


@dataclass
class ScanResult:
    good: list[int]
    sizes: list[tuple[int, int]]
    skipped: list[dict[str, Any]]

    def without(self, failed: dict[int, str], collection: Collection) -> ScanResult:
        """The images left after `failed` (index -> error) joined the skipped ones; UserError when
        none is left."""
        kept = [(i, size) for i, size in zip(self.good, self.sizes, strict=True) if i not in failed]
        skipped = self.skipped + [_skipped(collection, i, error) for i, error in failed.items()]
        if not kept:
            raise UserError(f"{collection.source}: no readable images ({len(skipped)} skipped)")
        return ScanResult([i for i, _ in kept], [size for _, size in kept],
                          sorted(skipped, key=lambda entry: entry["index"]))


def _skipped(collection: Collection, index: int, error: object) -> dict[str, Any]:
    return {"index": index, "path": collection.path(index), "error": str(error)}


def scan(collection: Collection, on_error: str, progress: bool = True) -> ScanResult:
    """Every image's size, from its header (no pixels decoded: the writer decodes each image
    once), and the images whose header is unreadable (fail or skip)."""
    good, sizes, skipped = [], [], []
    for index in tqdm(range(len(collection)), desc="reading image sizes", unit="img", disable=not progress):
        try:
            size = collection.size(index)
        except BadImage as exc:
            if on_error == "fail":
                raise CorruptImage(f"corrupt image {exc}") from None
            skipped.append(_skipped(collection, index, exc))
            continue
        good.append(index)
        sizes.append(size)
    if not good:
        raise UserError(f"{collection.source}: no readable images ({len(skipped)} skipped)")
    return ScanResult(good, sizes, skipped)


@dataclass
class _Layout:
    """How the scanned images are stored: the resize side (None: as they are), the stored
    (H, W), and raw or JPEG."""

    side: int | None
    shape: tuple[int, int]
    write_mode: str

    @classmethod
    def of(cls, sizes: list[tuple[int, int]], max_resolution: int, write_mode: str) -> _Layout:
        side = target_size(sizes, max_resolution)
        shape = (side, side) if side else tuple(sizes[0])
        if write_mode == "auto":
            write_mode = "raw" if shape[0] * shape[1] <= RAW_MAX_PIXELS else "jpg"
        return cls(side, shape, write_mode)


@dataclass
class _Written:
    """What the writer's processes found: images that failed to decode (index -> error), other
    failures, and whether every image written is grey."""

    corrupt: dict[int, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    greyscale: bool = True


class _SizedForWriter:
    """The writer's dataset: image i decoded, resized by the size rule, and its label.

    FFCV's writer runs this in several processes and hangs if an item raises, so each one
    records in files beside the output what only decoding shows: an image that fails (a black
    image is written in its place, and with `stop_at_failure` no image after it is read) and
    whether any image has colour (images.is_grey, the collection's channel rule).
    """

    def __init__(self, collection: Collection, indices: list[int], layout: _Layout, log: Path,
                 stop_at_failure: bool) -> None:
        self.collection, self.indices, self.layout = collection, indices, layout
        self.failures, self.colour = log.with_suffix(".failures"), log.with_suffix(".colour")
        self.stop_at_failure, self.colour_seen = stop_at_failure, False

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        index = self.indices[i]
        image = None
        if not (self.stop_at_failure and self.failures.exists()):
            image = self._fitted(index)
        if image is None:
            image = np.zeros((*self.layout.shape, 3), np.uint8)
        return image, self.collection.label(index)

    def _fitted(self, index: int) -> np.ndarray | None:
        """Image `index` as stored, or None when it fails (recorded)."""
        try:
            decoded = self.collection.read(index)
            image = fit_image(decoded, self.layout.side)
            if image.shape[:2] != self.layout.shape:
                raise BadImage(f"{self.collection.path(index)}: {image.shape[0]}x{image.shape[1]} "
                               f"when decoded, {self.layout.shape[0]}x{self.layout.shape[1]} by "
                               "its header (changed while preparing?)")
            if not self.colour_seen and not is_grey(decoded):
                self.colour.touch()
                self.colour_seen = True
            return image
        except BadImage as exc:
            self._record(index, "corrupt", str(exc))
        except Exception as exc:  # noqa: BLE001 - must not escape into FFCV's worker
            where = self.collection.path(index) or f"image {index}"
            self._record(index, "error", f"{where}: {type(exc).__name__}: {exc}")
        return None

    def _record(self, index: int, kind: str, message: str) -> None:
        with open(self.failures, "a") as log:
            log.write(f"{index}\t{kind}\t{one_line(message)}\n")

    def written(self) -> _Written:
        found = _Written(greyscale=not self.colour.exists())
        lines = self.failures.read_text().splitlines() if self.failures.exists() else []
        for index, kind, message in (line.split("\t", 2) for line in lines):
            if kind == "corrupt":
                found.corrupt[int(index)] = message
            else:
                found.errors.append(message)
        return found


def _write_images(collection: Collection, found: ScanResult, layout: _Layout, tmp: Path, workers: int,
                  progress: bool, stop_at_failure: bool) -> _Written:
    """The images `found.good` written to `tmp` by FFCV's writer: each one read and decoded once."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    dataset = _SizedForWriter(collection, found.good, layout, tmp, stop_at_failure)
    try:
        fields = {"image": RGBImageField(write_mode=layout.write_mode, jpeg_quality=90), "label": IntField()}
        writer = DatasetWriter(str(tmp), fields, num_workers=workers or min(8, os.cpu_count() or 1))
        quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
        with quiet:  # FFCV's writer draws its own progress bar
            writer.from_indexed_dataset(dataset)
        return dataset.written()
    finally:
        dataset.failures.unlink(missing_ok=True)
        dataset.colour.unlink(missing_ok=True)


def write_beton(collection: Collection, out: Path, max_resolution: int = 256, on_error: str = "fail",
                workers: int = 0, progress: bool = True, write_mode: str = "auto") -> dict[str, Any]:
    """Write `collection` to `out` (.beton) and its metadata; returns the metadata.

    Each image is read for its size from its header, then read and decoded once by the writer.
    Images that only decoding shows to be corrupt stop it (on_error `fail`) or, with `skip`,
    are left out by writing the file a second time without them.
    write_mode `auto` stores images of at most 96x96 pixels raw and larger ones as JPEG.
    """
    if max_resolution < 2:
        raise ValueError(f"max_resolution must be >= 2 (got {max_resolution})")
    if len(collection) == 0:
        raise UserError(f"{collection.source}: no images")
    found = scan(collection, on_error, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        layout = _Layout.of(found.sizes, max_resolution, write_mode)
        written = _write_images(collection, found, layout, tmp, workers, progress, on_error == "fail")
        if written.corrupt and on_error == "skip" and not written.errors:
            found = found.without(written.corrupt, collection)
            layout = _Layout.of(found.sizes, max_resolution, write_mode)
            written = _write_images(collection, found, layout, tmp, workers, progress, True)
            written.errors += written.corrupt.values()  # read well the first time: not to be skipped
        _refuse_failures(written)
        metadata = _metadata(collection, found, layout, written.greyscale, max_resolution)
        metadata.update(_digests(tmp))
        metadata_path(out).unlink(missing_ok=True)  # an old JSON must not vouch for the new file
        os.replace(tmp, out)
        paths = metadata.pop("paths")
        if paths is not None:  # written before the JSON that vouches for it
            text = json.dumps(paths)
            write_text_atomic(paths_path(out), text)
            metadata.update(paths_file=paths_path(out).name,
                            paths_sha256=hashlib.sha256(text.encode()).hexdigest())
        write_json_atomic(metadata_path(out), metadata)
        return metadata
    finally:
        tmp.unlink(missing_ok=True)


def _refuse_failures(written: _Written) -> None:
    if written.errors:
        raise UserError(f"image failed while writing: {written.errors[0]}")
    if written.corrupt:
        raise CorruptImage(f"corrupt image {next(iter(written.corrupt.values()))}")


def _metadata(collection: Collection, found: ScanResult, layout: _Layout, greyscale: bool,
              max_resolution: int) -> dict[str, Any]:
    labels = [collection.label(i) for i in found.good]
    return {
        "version": METADATA_VERSION, "count": len(found.good), "image_shape": [*layout.shape, 3],
        "channels": 1 if greyscale else 3, "labelled": min(labels) >= 0,
        "label_names": collection.class_names, "num_classes": len(set(labels) - {-1}),
        "source": collection.source, "format": collection.format, "write_mode": layout.write_mode,
        "resized_to": layout.side, "max_resolution": max_resolution,
        "skipped_count": len(found.skipped), "skipped": found.skipped,
        "paths": [collection.path(i) for i in found.good] if collection.path(0) else None,
    }


def _digests(beton: Path) -> dict[str, Any]:
    """The file's size, SHA-256 and chunk digests, as the metadata records them (one read)."""
    digests = file_digests(beton, CHUNK_BYTES)
    return {"bytes": digests.bytes, "sha256": digests.sha256, "chunk_bytes": digests.chunk_bytes,
            "chunk_sha256": digests.chunk_sha256}


def read_metadata(beton: Path) -> dict[str, Any]:
    """The metadata of a .beton, after the checks every open runs (module docstring)."""
    metadata = _load_metadata(beton)
    _check_beton(beton, metadata)
    return metadata


def _load_metadata(beton: Path) -> dict[str, Any]:
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
    return metadata


_METADATA_TYPES = {"count": int, "image_shape": list, "channels": int, "labelled": bool}


def _check_metadata(metadata: Any, meta: Path) -> None:
    """The fields every reader relies on, with their types and sane values."""
    ok = isinstance(metadata, dict) and all(
        isinstance(metadata.get(key), kind) for key, kind in _METADATA_TYPES.items())
    if ok:
        shape = metadata["image_shape"]
        ok = (metadata["count"] > 0 and metadata["channels"] in (1, 3) and len(shape) == 3
              and all(isinstance(v, int) and v > 0 for v in shape) and _chunks_are_whole(metadata))
    if not ok:
        raise UserError(f"{meta}: not the metadata distcluster.prepare writes (edited or damaged?); "
                        "prepare the data again")


def _chunks_are_whole(metadata: dict[str, Any]) -> bool:
    """No chunk digests (written before them), or one string per chunk of the recorded size."""
    if "chunk_sha256" not in metadata:
        return True
    size, chunk, digests = metadata.get("bytes"), metadata.get("chunk_bytes"), metadata["chunk_sha256"]
    return (isinstance(size, int) and isinstance(chunk, int) and chunk > 0 and isinstance(digests, list)
            and len(digests) == -(-size // chunk) and all(isinstance(d, str) for d in digests))


def _check_beton(beton: Path, metadata: dict[str, Any]) -> None:
    """Before FFCV opens it (a damaged file can crash the interpreter): FFCV's header and the
    size against the metadata, then SAMPLED_CHUNKS chunk digests (files written before chunk
    digests: the whole file's SHA-256, up to FULL_CHECK_BYTES)."""
    size = _check_header_and_size(beton, metadata)
    if "chunk_sha256" in metadata:
        _check_chunks(beton, metadata, spread_sample(len(metadata["chunk_sha256"]), SAMPLED_CHUNKS))
    elif "sha256" in metadata and size <= FULL_CHECK_BYTES and file_sha256(beton) != metadata["sha256"]:
        raise UserError(f"{_damaged(beton)} (its SHA-256 changed); prepare it again")


def _damaged(beton: Path) -> str:
    return f"{beton}: damaged or not the file its metadata describes"


def _check_header_and_size(beton: Path, metadata: dict[str, Any]) -> int:
    """FFCV's header against the metadata, and the recorded size; returns the size."""
    from ffcv.types import CURRENT_VERSION, HeaderType

    size = beton.stat().st_size
    if size < HeaderType.itemsize:
        raise UserError(f"{_damaged(beton)} (only {size} bytes); prepare it again")
    header = np.fromfile(beton, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION or header["num_samples"] != metadata["count"] \
            or header["num_fields"] != 2:
        raise UserError(f"{_damaged(beton)} (its header says {int(header['num_samples'])} images, "
                        f"version {int(header['version'])}); prepare it again")
    if "bytes" in metadata and size != metadata["bytes"]:
        raise UserError(f"{_damaged(beton)} ({size} bytes, {metadata['bytes']} written); prepare it again")
    return size


def _check_chunks(beton: Path, metadata: dict[str, Any], chunks: Iterable[int],
                  done: tqdm | None = None) -> None:
    """The digests of `chunks` (indices) against the metadata; UserError naming the first one
    that differs and how many do. `done` counts the bytes read."""
    expected, chunk = metadata["chunk_sha256"], metadata["chunk_bytes"]
    changed = []
    for index, digest in read_chunk_digests(beton, chunk, chunks):
        if digest != expected[index]:
            changed.append(index)
        if done is not None:
            done.update(min(chunk, metadata["bytes"] - index * chunk))
    if changed:
        first, more = changed[0], f", {len(changed) - 1} more after it" if len(changed) > 1 else ""
        end = min((first + 1) * chunk, metadata["bytes"]) - 1
        raise UserError(f"{_damaged(beton)} (the SHA-256 of chunk {first} of {len(expected)}, bytes "
                        f"{first * chunk}-{end}, changed{more}); prepare it again")


def verify_beton(beton: Path, progress: bool = True) -> str:
    """Every byte of a .beton against its metadata (an open checks a sample); one line saying
    what was checked, or UserError naming the first chunk that changed."""
    metadata = _load_metadata(beton)
    size = _check_header_and_size(beton, metadata)
    if "chunk_sha256" in metadata:
        count = len(metadata["chunk_sha256"])
        with tqdm(total=size, desc="verifying", unit="B", unit_scale=True, disable=not progress) as done:
            _check_chunks(beton, metadata, range(count), done)
        return f"{beton}: intact ({size} bytes, all {count} chunks' SHA-256 as written)"
    if "sha256" not in metadata:
        raise UserError(f"{beton}: its metadata records no digest to verify (written by an older "
                        "distcluster); prepare it again")
    if file_sha256(beton) != metadata["sha256"]:
        raise UserError(f"{_damaged(beton)} (its SHA-256 changed; written before chunk digests, so "
                        "the changed part cannot be named); prepare it again")
    return f"{beton}: intact ({size} bytes, its SHA-256 as written)"


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
        self._range_loaders: dict[tuple[int, int, int], Any] = {}
        self.labels = self._read_labels() if self.metadata["labelled"] else None

    @property
    def channels(self) -> int:
        return self.metadata["channels"]

    def paths(self) -> list[str] | None:
        """Source file of each image (folders and zips), else None; read when first asked for."""
        paths = self.metadata.get("paths") or (self._read_paths() if "paths_file" in self.metadata else None)
        return [paths[i] for i in self.indices] if paths else None

    def _read_paths(self) -> list[str]:
        """FILE.beton.paths.json, checked against the SHA-256 its metadata records."""
        path = paths_path(self.path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise UserError(f"{path}: unreadable ({exc.strerror or exc}); prepare the data again") from None
        intact = hashlib.sha256(text.encode()).hexdigest() == self.metadata["paths_sha256"]
        paths = json.loads(text) if intact else None
        if not isinstance(paths, list) or len(paths) != self.metadata["count"]:
            raise UserError(f"{path}: not the image list prepare wrote (edited or damaged?); "
                            "prepare the data again")
        return paths

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
        batches = iter(self._train_loader)
        try:
            for batch in batches:
                yield self._images(batch[0])
        finally:  # an epoch cut short (steps_per_epoch) stops FFCV's reading thread too
            batches.close()

    def batches(self, size: int) -> Iterator[torch.Tensor]:
        yield from self.range_batches(0, len(self), size)

    def take(self, indices: np.ndarray) -> torch.Tensor:
        wanted = self.indices[np.sort(np.asarray(indices, dtype=np.int64))]
        return torch.cat([self._images(batch[0]).clone()
                          for batch in self._loader(1024, ("image",), indices=wanted)])

    def range_batches(self, start: int, stop: int, size: int) -> Iterator[torch.Tensor]:
        # FFCV refills the same memory for the next batches: a copy may be kept by the caller
        # (training batches in epoch_batches are used up at once and are not copied).
        key = (start, stop, size)  # evaluations read the same range every time: one loader for it
        if key not in self._range_loaders:
            self._range_loaders[key] = self._loader(size, ("image",), indices=self.indices[start:stop])
        for batch in self._range_loaders[key]:
            yield self._images(batch[0]).clone()
