"""FFCV storage read back: a prepared .beton, checked at every open, read sharded per rank
(beton_writer writes it).

A prepared data set is FILE.beton (FFCV: an `image` RGB field and an int
`label` field, -1 when unlabelled), the per-image lists beside it (SIDECARS:
labels, and source paths) and FILE.beton.json (metadata). The JSON is written
last, so a .beton without it is an interrupted prepare and is refused.

The JSON records the .beton's size, its SHA-256 and a digest of each 4 MiB
chunk of it. Every open checks the size, FFCV's header and SAMPLED_CHUNKS
chunks spread over the file, the first and the last among them: a cost that
does not grow with the file. So an open always finds a truncated, extended or
swapped file, and a change inside the file only when it lies in a sampled
chunk; `verify_beton` (`python -m distcluster.prepare --verify FILE.beton`)
checks every chunk.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import mmap
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from distcluster.common.errors import UserError
from distcluster.common.files import file_sha256, read_chunk_digests, spread_sample
from distcluster.data.arrays import STATS_SAMPLE, channel_stats_of, shard_batches, subset_indices

# Scattered images (a sample, a gallery, the prior's sample) are read this many at a time: a
# page fault in a file the page cache holds in large folios (a file just written, on Linux 6)
# maps up to a whole folio, so 10,000 images of a fresh 3 GB file mapped 2.4 GB when read 1,024
# at a time and released every 4 batches; 16 at a time, released after each: 0.09 GB.
SCATTERED_BATCH = 16
SAMPLED_CHUNKS = 16  # chunks hashed on every open: at most 64 MiB, whatever the file's size
# Files written before chunk digests (version 2) are hashed whole on every open up to this size
# (0.55 s per GiB on the 2-core machine from the page cache, more from disk), above it checked
# by size and header only.
FULL_CHECK_BYTES = 1 << 30
# FFCV sets torch's thread count to its loader's (to 1 when imported): remember the real one.
TORCH_THREADS = torch.get_num_threads()


def metadata_path(beton: Path) -> Path:
    return beton.with_name(beton.name + ".json")


# Per-image lists beside FILE.beton, each checked by the SHA-256 its metadata records: the
# source file of every image (FILE.beton.paths: each path in UTF-8, ended by a NUL byte; tens
# of bytes an image, read only by what needs it: predict's rows) and every label
# (FILE.beton.labels.npy, int32, read at an open instead of a pass over the label field).
SIDECARS = {"paths": (".paths", "image list"), "labels": (".labels.npy", "label list")}
PATHS_JSON_BEFORE = 4  # metadata versions before it wrote the image list as JSON (.paths.json)


def sidecar_path(beton: Path, kind: str) -> Path:
    return beton.with_name(beton.name + SIDECARS[kind][0])


def _read_sidecar(beton: Path, metadata: dict[str, Any], kind: str, path: Path | None = None) -> bytes:
    """FILE.beton.KIND's bytes, refused (UserError) unless their SHA-256 is the one recorded."""
    path = path or sidecar_path(beton, kind)
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: unreadable ({exc.strerror or exc}); prepare the data again") from None
    if hashlib.sha256(content).hexdigest() != metadata.get(f"{kind}_sha256"):
        raise _not_written(path, kind)
    return content


def _mapped_sidecar(beton: Path, metadata: dict[str, Any], kind: str) -> mmap.mmap:
    """FILE.beton.KIND mapped read-only (its pages stay the page cache's, not this process's
    memory), refused unless its SHA-256 is the one recorded."""
    path = sidecar_path(beton, kind)
    try:
        with open(path, "rb") as file:
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
        raise UserError(f"{path}: unreadable ({getattr(exc, 'strerror', None) or exc}); "
                        "prepare the data again") from None
    if hashlib.sha256(mapped).hexdigest() != metadata.get(f"{kind}_sha256"):
        raise _not_written(path, kind)
    return mapped


class PathTable(Sequence):
    """Every image's source path, from FILE.beton.paths mapped in memory: 8 bytes an image in
    this process (where each path ends), not a Python string each. A sequence of str."""

    SCAN_BYTES = 1 << 24  # the file is searched for its NUL bytes this much at a time

    def __init__(self, mapped: mmap.mmap, count: int) -> None:
        self.mapped, self.rows = mapped, None  # rows: a subset's positions in the file
        self.ends = np.concatenate([np.flatnonzero(np.frombuffer(mapped, np.uint8, min(
            self.SCAN_BYTES, len(mapped) - start), start) == 0) + start
            for start in range(0, len(mapped), self.SCAN_BYTES)])
        mapped.madvise(mmap.MADV_DONTNEED)  # read again, a page at a time, as paths are asked for
        if len(self.ends) != count:
            raise ValueError(f"{len(self.ends)} paths for {count} images")

    def subset(self, rows: np.ndarray) -> PathTable:
        """The paths of the images at `rows` of the file, without scanning it again."""
        table = PathTable.__new__(PathTable)
        table.mapped, table.ends, table.rows = self.mapped, self.ends, rows
        return table

    def __len__(self) -> int:
        return len(self.ends) if self.rows is None else len(self.rows)

    def __getitem__(self, item: int | slice) -> str | list[str]:
        if isinstance(item, slice):
            return [self[i] for i in range(*item.indices(len(self)))]
        if not -len(self) <= item < len(self):
            raise IndexError(f"path {item} of {len(self)}")
        item %= len(self)
        row = int(item if self.rows is None else self.rows[item])
        start = int(self.ends[row - 1]) + 1 if row else 0
        return self.mapped[start:int(self.ends[row])].decode("utf-8", "surrogateescape")


def _not_written(path: Path, kind: str) -> UserError:
    return UserError(f"{path}: not the {SIDECARS[kind][1]} prepare wrote (edited or damaged?); "
                     "prepare the data again")


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


def _lean_os_cache_manager_class():
    from ffcv.memory_managers import MemoryManager, OSCacheManager
    from ffcv.memory_managers.os_cache import OSCacheContext

    class LeanOSCacheManager(OSCacheManager):
        """FFCV's page-cache memory manager without its per-image Python tables.

        FFCV 1.0.2 builds, for every Loader, a dict and two dicts of sets with an entry per
        image (about 0.55 GB and 2 s per loader at a million images, measured on the 2-core
        machine); reading through the page cache uses only the sorted pointer and size arrays.
        The tables are built if something asks for them (QUASI_RANDOM order, which we do not use).
        """

        def __init__(self, reader) -> None:  # noqa: D107 - MemoryManager.__init__ is what we skip
            self.reader = reader
            order = np.argsort(reader.alloc_table["ptr"])
            self.ptrs, self.sizes = reader.alloc_table["ptr"][order], reader.alloc_table["size"][order]
            self.context = OSCacheContext(self)

        def release_pages(self) -> None:
            """Unmap the file's pages from this process (they stay in the page cache; a read
            maps them again). The read-only mapping counts every page read towards the RSS:
            an evaluation of a million images grew it by the file's 3 GB, and the kernel's OOM
            killer ranks processes by RSS."""
            mapped = getattr(self.context.mmap, "_mmap", None)  # numpy.memmap's mmap.mmap
            if mapped is not None:
                mapped.madvise(mmap.MADV_DONTNEED)

        @functools.cached_property
        def _page_tables(self) -> MemoryManager:
            return OSCacheManager(self.reader)

        @property
        def sample_to_pages(self):
            return self._page_tables.sample_to_pages

        @property
        def page_to_samples(self):
            return self._page_tables.page_to_samples

    return LeanOSCacheManager


@functools.cache
def use_lean_os_cache() -> None:
    """Make FFCV's loaders (this process) use LeanOSCacheManager; once, before a Loader is built."""
    import ffcv.loader.loader

    ffcv.loader.loader.OSCacheManager = _lean_os_cache_manager_class()


@functools.cache
def _aimed_order_class():
    from ffcv.traversal_order.base import TraversalOrder

    class AimedOrder(TraversalOrder):
        """Whatever images the loader's next pass is aimed at (`target`, set by
        BetonSource._pass with the loader's `first_traversal_order`, from which FFCV counts
        the batches), in the order given."""

        def __init__(self) -> None:  # noqa: D107 - no super(): no loader yet (see GlobalBatchOrder)
            self.target = None

        def __call__(self, loader) -> AimedOrder:
            self.loader, self.indices, self.seed = loader, loader.indices, loader.seed
            self.distributed, self.sampler = False, None
            self.target = loader.indices
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            return self.target

    return AimedOrder


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
        self._idle_loaders: dict[int, Any] = {}  # by batch size, for _pass
        self.labels = self._read_labels() if self.metadata["labelled"] else None

    @property
    def channels(self) -> int:
        return self.metadata["channels"]

    def paths(self) -> Sequence[str] | None:
        """Source file of each image (folders and zips), else None; read when first asked for."""
        if self.metadata.get("version", 0) >= PATHS_JSON_BEFORE:
            return self._path_table() if "paths_file" in self.metadata else None
        paths = self.metadata.get("paths")  # before FILE.beton.paths.json, in the metadata itself
        if not paths and "paths_file" in self.metadata:
            paths = self._read_json_paths()
        return [paths[i] for i in self.indices] if paths else None

    def _path_table(self) -> PathTable:
        try:
            table = PathTable(_mapped_sidecar(self.path, self.metadata, "paths"), self.metadata["count"])
        except ValueError:
            raise _not_written(sidecar_path(self.path, "paths"), "paths") from None
        return table if len(self.indices) == self.metadata["count"] else table.subset(self.indices)

    def _read_json_paths(self) -> list[str]:
        """Files prepared before FILE.beton.paths: the image list as JSON."""
        path = self.path.with_name(self.path.name + ".paths.json")
        paths = json.loads(_read_sidecar(self.path, self.metadata, "paths", path))
        if not isinstance(paths, list) or len(paths) != self.metadata["count"]:
            raise _not_written(path, "paths")
        return paths

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(self.metadata["image_shape"][:2])

    def __len__(self) -> int:
        return len(self.indices)

    def _loader(self, batch: int, fields: tuple[str, ...], order=None, distributed: bool = False,
                indices: np.ndarray | None = None, drop_last: bool = False):
        from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import ToTensor, ToTorchImage

        use_lean_os_cache()
        pipelines = {"image": [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage()] if "image" in fields
                     else None,
                     "label": [IntDecoder(), ToTensor()] if "label" in fields else None}
        return Loader(str(self.path), batch_size=batch, num_workers=self.threads,
                      order=order or OrderOption.SEQUENTIAL, distributed=distributed,
                      indices=self.indices if indices is None else indices, pipelines=pipelines,
                      drop_last=drop_last, seed=0, os_cache=True)  # LeanOSCacheManager

    def _read_labels(self) -> torch.Tensor:
        """From FILE.beton.labels.npy; files prepared before it: one pass over the label field."""
        if "labels_file" not in self.metadata:
            loader = self._loader(4096, ("label",))
            return torch.cat([batch[0].reshape(-1).long().clone() for batch in loader])
        content = _read_sidecar(self.path, self.metadata, "labels")
        labels = np.load(io.BytesIO(content), allow_pickle=False)
        if labels.shape != (self.metadata["count"],) or labels.dtype != np.int32:
            raise _not_written(sidecar_path(self.path, "labels"), "labels")
        return torch.from_numpy(labels[self.indices].astype(np.int64))

    def _images(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[:, :1] if self.channels == 1 else batch

    def channel_stats(self) -> tuple[list[float], list[float]]:
        sample = self.indices[subset_indices(len(self), STATS_SAMPLE)]
        return channel_stats_of(self._pass(SCATTERED_BATCH, sample))

    def epoch_batches(self, epoch: int, global_batch: int, world_size: int, rank: int,
                      seed: int) -> Iterator[torch.Tensor]:
        distributed = world_size > 1
        if distributed:
            group = (torch.distributed.get_rank(), torch.distributed.get_world_size())
            if group != (rank, world_size):
                raise RuntimeError(f"rank/world size {rank}/{world_size} disagree with the process group")
        if self._train_loader is None:
            order = _traversal_order_class()(global_batch, seed)
            self._train_loader = self._loader(global_batch // world_size, ("image",), order, distributed,
                                              drop_last=True)
        self._train_loader.next_epoch = epoch
        batches = iter(self._train_loader)
        try:
            for batch in _released(self._train_loader, batches):
                yield self._images(batch[0])
        finally:  # an epoch cut short (steps_per_epoch) stops FFCV's reading thread too
            _stop(self._train_loader, batches)

    def batches(self, size: int) -> Iterator[torch.Tensor]:
        yield from self.range_batches(0, len(self), size)

    def take(self, indices: np.ndarray) -> torch.Tensor:
        wanted = self.indices[np.sort(np.asarray(indices, dtype=np.int64))]
        return torch.cat([images.clone() for images in self._pass(SCATTERED_BATCH, wanted)])

    def range_batches(self, start: int, stop: int, size: int) -> Iterator[torch.Tensor]:
        # FFCV refills the same memory for the next batches: a copy may be kept by the caller
        # (training batches in epoch_batches are used up at once and are not copied).
        for images in self._pass(size, self.indices[start:stop]):
            yield images.clone()

    def _pass(self, batch: int, indices: np.ndarray) -> Iterator[torch.Tensor]:
        """The images at `indices` (the file's), in that order, `batch` at a time, in FFCV's
        memory (refilled by the next batches). One loader per batch size serves every pass,
        aimed at each pass's images: each new FFCV Loader compiles its pipeline with numba, whose
        code is never freed (about 12 MB a loader; predict's actors built one for each chunk, so
        their memory grew with the data). A loader in use is not shared: a pass started during
        another gets its own."""
        loader = self._idle_loaders.pop(batch, None) or self._loader(
            batch, ("image",), _aimed_order_class()(), indices=indices)
        loader.traversal_order.target = loader.first_traversal_order = indices
        batches = iter(loader)
        try:
            for images, *_ in _released(loader, batches):
                yield self._images(images)
        finally:  # a pass left early stops FFCV's reading thread too
            _stop(loader, batches)
            self._idle_loaders[batch] = loader


STOP_WAIT_SECONDS = 30  # FFCV's reading thread sees a stop within 0.5 s (its queue's timeout)


def _stop(loader, batches) -> None:
    """End a pass's FFCV reading thread, then release the file's pages: a thread still reading
    when they were released would map one more batch's pages (a pass left early)."""
    batches.close()
    batches.join(timeout=STOP_WAIT_SECONDS)
    loader.memory_manager.release_pages()


def _released(loader, batches: Iterable) -> Iterator:
    """The loader's `batches`, its mapped pages released after each (a cost of microseconds:
    the pages stay in the page cache). A pass left early: the caller releases them."""
    for batch in batches:
        yield batch
        loader.memory_manager.release_pages()
