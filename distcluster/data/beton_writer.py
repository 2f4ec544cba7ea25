"""Writing a prepared data set (`distcluster.prepare`): FILE.beton through FFCV's writer, the
per-image lists beside it, then FILE.beton.json (ffcv_io reads and checks them).

Each image is read for its size from its header (`scan`), then read and decoded once: by FFCV's
writer processes, or elsewhere (a `Decoder`: Ray Data tasks across a cluster, cluster.ray_data)
and streamed to them in order through a bounded ring in shared memory (`_StreamedForWriter`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import mmap
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from distcluster.common.errors import CorruptImage, UserError, one_line
from distcluster.common.files import atomic_file, file_digests, write_json_atomic
from distcluster.data.ffcv_io import metadata_path, sidecar_path
from distcluster.data.images import BadImage, Collection, fit_image, is_grey, target_size

METADATA_VERSION = 4  # 2: the file's size and SHA-256; 3: its chunks' digests; 4: FILE.beton.paths
CHUNK_BYTES = 4 << 20  # a .beton's digests are kept per 4 MiB chunk (~600 KB of JSON per 100 GB)
RAW_MAX_PIXELS = 96 * 96  # larger images are stored as JPEG (quality 90)


@dataclass
class ScanResult:
    """Arrays, not lists of Python numbers: 16 bytes an image, not about 100 (a million images)."""

    good: np.ndarray  # (G,) int64: the collection's indices of the readable images
    sizes: np.ndarray  # (G, 2) int64: their sizes as the collection gives them
    skipped: list[dict[str, Any]]

    def without(self, failed: dict[int, str], collection: Collection) -> ScanResult:
        """The images left after `failed` (index -> error) joined the skipped ones; UserError when
        none is left."""
        kept = ~np.isin(self.good, np.fromiter(failed, np.int64, len(failed)))
        skipped = self.skipped + [_skipped(collection, i, error) for i, error in failed.items()]
        if not kept.any():
            raise UserError(f"{collection.source}: no readable images ({len(skipped)} skipped)")
        skipped.sort(key=lambda entry: entry["index"])
        return ScanResult(self.good[kept], self.sizes[kept], skipped)


def _skipped(collection: Collection, index: int, error: object) -> dict[str, Any]:
    return {"index": int(index), "path": collection.path(int(index)), "error": str(error)}


def scan(collection: Collection, on_error: str, progress: bool = True) -> ScanResult:
    """Every image's size, from its header (no pixels decoded: the writer decodes each image
    once), and the images whose header is unreadable (fail or skip)."""
    good, sizes, skipped = np.empty(len(collection), np.int64), np.empty((len(collection), 2), np.int64), []
    count = 0
    for index in tqdm(range(len(collection)), desc="reading image sizes", unit="img", disable=not progress):
        try:
            sizes[count] = collection.size(index)
        except BadImage as exc:
            if on_error == "fail":
                raise CorruptImage(f"corrupt image {exc}") from None
            skipped.append(_skipped(collection, index, exc))
            continue
        good[count] = index
        count += 1
    if not count:
        raise UserError(f"{collection.source}: no readable images ({len(skipped)} skipped)")
    return ScanResult(good[:count].copy(), sizes[:count].copy(), skipped)


@dataclass
class Layout:
    """How the scanned images are stored: the resize side (None: as they are), the stored
    (H, W), and raw or JPEG."""

    side: int | None
    shape: tuple[int, int]
    write_mode: str

    @classmethod
    def of(cls, sizes: np.ndarray, max_resolution: int, write_mode: str) -> Layout:
        side = target_size(sizes, max_resolution)
        shape = (side, side) if side else (int(sizes[0][0]), int(sizes[0][1]))
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


@dataclass
class _Fitted:
    """What decoding one image showed: the image as stored (None when it failed), the failure
    ("corrupt" or "error", and the message) and whether it has colour (when looked for)."""

    image: np.ndarray | None
    failure: tuple[str, str] | None = None
    colour: bool = False


def _fit_stored(collection: Collection, index: int, layout: Layout, look_for_colour: bool) -> _Fitted:
    try:
        decoded = collection.read(index)
        image = fit_image(decoded, layout.side)
        if image.shape[:2] != layout.shape:
            raise BadImage(f"{collection.path(index)}: {image.shape[0]}x{image.shape[1]} when decoded, "
                           f"{layout.shape[0]}x{layout.shape[1]} by its header (changed while preparing?)")
        return _Fitted(image, colour=look_for_colour and not is_grey(decoded))
    except BadImage as exc:
        return _Fitted(None, ("corrupt", str(exc)))
    except Exception as exc:  # noqa: BLE001 - must escape neither into FFCV's worker nor a Ray task
        where = collection.path(index) or f"image {index}"
        return _Fitted(None, ("error", f"{where}: {type(exc).__name__}: {exc}"))


class _SizedForWriter:
    """The writer's dataset: image i decoded, resized by the size rule, and its label.

    FFCV's writer runs this in several processes and hangs if an item raises, so each one
    records in files beside the output what only decoding shows: an image that fails (a black
    image is written in its place, and with `stop_at_failure` no image after it is read) and
    whether any image has colour (images.is_grey, the collection's channel rule).
    """

    def __init__(self, collection: Collection, indices: np.ndarray, layout: Layout, log: Path,
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
        fitted = _fit_stored(self.collection, index, self.layout, not self.colour_seen)
        if fitted.failure is not None:
            self._record(index, *fitted.failure)
        if fitted.colour:
            self.colour.touch()
            self.colour_seen = True
        return fitted.image

    def _record(self, index: int, kind: str, message: str) -> None:
        with open(self.failures, "a") as log:
            log.write(f"{index}\t{kind}\t{one_line(message)}\n")

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """While FFCV's writer runs; then the records beside the output are read and removed."""
        try:
            yield
            self.found = self._records()
        finally:
            self.failures.unlink(missing_ok=True)
            self.colour.unlink(missing_ok=True)

    def written(self) -> _Written:
        return self.found

    def _records(self) -> _Written:
        found = _Written(greyscale=not self.colour.exists())
        lines = self.failures.read_text().splitlines() if self.failures.exists() else []
        for index, kind, message in (line.split("\t", 2) for line in lines):
            if kind == "corrupt":
                found.corrupt[int(index)] = message
            else:
                found.errors.append(message)
        return found


@dataclass(frozen=True)
class FitRange:
    """Picklable (a Ray task runs it): the images at positions [start, stop) of the file being
    written, decoded and fitted as stored, as columns: `position`, `image` (black where it
    failed), `failure_kind` ("" when it did not), `failure` and `colour` (the chunk's)."""

    collection: Collection
    indices: np.ndarray  # (G,) position -> the collection's index
    layout: Layout

    def __call__(self, start: int, stop: int) -> dict[str, np.ndarray]:
        images = np.zeros((stop - start, *self.layout.shape, 3), np.uint8)
        kinds, messages, colour = [], [], False
        for row, position in enumerate(range(start, stop)):
            fitted = _fit_stored(self.collection, self.indices[position], self.layout, not colour)
            if fitted.image is not None:
                images[row] = fitted.image
            kind, message = fitted.failure or ("", "")
            kinds.append(kind)
            messages.append(message)
            colour = colour or fitted.colour
        return {"position": np.arange(start, stop), "image": images, "failure_kind": np.array(kinds),
                "failure": np.array(messages), "colour": np.full(stop - start, colour)}


# Decodes the images elsewhere (a Ray cluster: cluster.ray_data): given a FitRange and the
# number of images, the FitRange's columns of every position, in order.
Decoder = Callable[[FitRange, int], Iterator[dict[str, np.ndarray]]]


def _shared_array(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """An array in anonymous shared memory: processes forked after it see each other's writes."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(1, size)), dtype=dtype, count=int(np.prod(shape))).reshape(shape)


class _StreamedForWriter:
    """The writer's dataset when the images are decoded elsewhere and arrive in order: a thread
    of this process (`feed`) puts each into a ring of `slots` images in shared memory, which
    FFCV's writer processes (forked after the ring is made) take them from.

    An image is overwritten only once taken. FFCV hands its processes chunks of consecutive
    positions first come first served and each takes its chunk in order, so the oldest position
    not yet taken is always in the ring and its process can take it: neither side waits for
    ever, at any ring size; (processes + 1) chunks let every process work at once. When the
    feed stops early (a failure with `stop_at_failure`, or an error of the decoder) every
    position not yet in the ring is written black.
    """

    def __init__(self, collection: Collection, indices: np.ndarray, layout: Layout, slots: int,
                 stop_at_failure: bool, batches: Iterator[dict[str, np.ndarray]]) -> None:
        self.collection, self.indices, self.layout = collection, indices, layout
        self.feeder = threading.Thread(target=self.feed, args=(batches,), daemon=True, name="decoded images")
        self.slots, self.stop_at_failure = slots, stop_at_failure
        self.ring = _shared_array((slots, *layout.shape, 3), np.uint8)
        # per slot, the position it holds; per slot, the position last taken from it; `stopped`
        self.marks = _shared_array((2 * slots + 1,), np.int64)
        self.marks[:] = -1
        self.changed = multiprocessing.get_context("fork").Condition()
        self.found, self.error = _Written(), None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[np.ndarray, int]:
        slot = position % self.slots
        with self.changed:
            self.changed.wait_for(lambda: self.marks[slot] == position or self.marks[-1] == 1)
        held = self.marks[slot] == position
        image = self.ring[slot].copy() if held else np.zeros((*self.layout.shape, 3), np.uint8)
        with self.changed:
            self.marks[self.slots + slot] = position
            self.changed.notify_all()
        return image, self.collection.label(self.indices[position])

    def feed(self, batches: Iterator[dict[str, np.ndarray]]) -> None:
        """Put every batch's images in the ring in order (run in a thread); whatever happens,
        tell the writer's processes when nothing more will come."""
        try:
            expected = 0
            for batch in batches:
                for position, image in zip(batch["position"], batch["image"], strict=True):
                    if position != expected:
                        raise RuntimeError(f"the decoder sent image {position} when {expected} was due")
                    self._put(expected, image)
                    expected += 1
                if self._note(batch):
                    break
        except BaseException as exc:  # noqa: BLE001 - raised again by the writing thread
            self.error = exc
        finally:
            with self.changed:
                self.marks[-1] = 1
                self.changed.notify_all()

    def _put(self, position: int, image: np.ndarray) -> None:
        slot = position % self.slots
        with self.changed:  # the image before it in this slot was taken
            self.changed.wait_for(lambda: position < self.slots
                                  or self.marks[self.slots + slot] == position - self.slots)
        self.ring[slot] = image
        with self.changed:
            self.marks[slot] = position
            self.changed.notify_all()

    def _note(self, batch: dict[str, np.ndarray]) -> bool:
        """Record the batch's failures and colour; whether to stop feeding."""
        self.found.greyscale = self.found.greyscale and not batch["colour"].any()
        for position in np.flatnonzero(batch["failure_kind"] != ""):
            index, message = self.indices[batch["position"][position]], str(batch["failure"][position])
            if batch["failure_kind"][position] == "corrupt":
                self.found.corrupt[index] = message
            else:
                self.found.errors.append(message)
        return self.stop_at_failure and bool(self.found.corrupt or self.found.errors)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """While FFCV's writer runs: the feed fills the ring (after the writer forked, its
        processes see the same memory)."""
        self.feeder.start()
        yield
        self.feeder.join()

    def written(self) -> _Written:
        if self.error is not None:
            raise self.error
        return self.found


WRITER_CHUNK = 100  # consecutive images FFCV's writer hands each of its processes at a time


def _write_images(collection: Collection, found: ScanResult, layout: Layout, tmp: Path, workers: int,
                  progress: bool, stop_at_failure: bool, decoder: Decoder | None) -> _Written:
    """The images `found.good` written to `tmp` by FFCV's writer: each one read and decoded once,
    by the writer's processes or, with a `decoder`, elsewhere and streamed to them."""
    from ffcv.fields import IntField, RGBImageField

    processes = workers or min(8, os.cpu_count() or 1)
    if decoder is None:
        dataset = _SizedForWriter(collection, found.good, layout, tmp, stop_at_failure)
    else:
        batches = decoder(FitRange(collection, found.good, layout), len(found.good))
        slots = (processes + 1) * WRITER_CHUNK
        dataset = _StreamedForWriter(collection, found.good, layout, slots, stop_at_failure, batches)
    fields = {"image": RGBImageField(write_mode=layout.write_mode, jpeg_quality=90), "label": IntField()}
    writer = _lean_dataset_writer_class()(str(tmp), fields, num_workers=processes)
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet, dataset.writing():  # FFCV's writer draws its own progress bar
        writer.write_all(dataset, WRITER_CHUNK)
    return dataset.written()


@functools.cache
def _lean_dataset_writer_class() -> type:
    from ffcv.writer import DatasetWriter

    class LeanDatasetWriter(DatasetWriter):
        """FFCV's writer without its per-image Python objects. FFCV 1.0.2 queues every image as
        an (index, numpy int) tuple and keeps every allocation as a tuple, turned into one small
        array each at the end, in this process and, forked, in its workers (with the JSON image
        list this replaced: 74 MB more peak memory at 200,000 images, measured). Here the queue
        holds (start, stop) ranges and each worker keeps its allocations as one array; the file
        written is the same."""

        def write_all(self, dataset: Any, chunk: int) -> None:
            count = len(dataset)
            ranges = ((start, min(start + chunk, count)) for start in range(0, count, chunk))
            self._write_common(count, ranges, _write_ranges, (dataset,))

        def finalize(self, allocations: list[np.ndarray]) -> None:
            super().finalize([np.concatenate(allocations)] if allocations else [])

    return LeanDatasetWriter


def _write_ranges(queue: Any, metadata_memory: Any, metadata_type: np.dtype, fields: dict, allocator: Any,
                  done: Any, allocations_queue: Any, dataset: Any) -> None:
    """One writer process (ffcv.writer.worker_job_indexed_dataset with ranges for chunks): the
    images of each (start, stop) range from the queue, then its allocation table, one array."""
    from ffcv.types import ALLOC_TABLE_TYPE
    from ffcv.writer import handle_sample

    metadata = np.frombuffer(metadata_memory.buf, dtype=metadata_type)
    tables = [np.empty(0, ALLOC_TABLE_TYPE)]
    with allocator:  # pages written when the block ends
        while (todo := queue.get()) is not None:
            for position in range(*todo):
                handle_sample(dataset[position], position, metadata_type.names, metadata, allocator, fields)
            # Between images no allocation can be taken back (only the current image's are)
            tables.append(np.array(allocator.allocations, ALLOC_TABLE_TYPE))
            allocator.allocations.clear()
            with done.get_lock():
                done.value += todo[1] - todo[0]
    allocations_queue.put([np.concatenate(tables)])


def write_beton(collection: Collection, out: Path, max_resolution: int = 256, on_error: str = "fail",
                workers: int = 0, progress: bool = True, write_mode: str = "auto",
                decoder: Decoder | None = None) -> dict[str, Any]:
    """Write `collection` to `out` (.beton) and its metadata; returns the metadata.

    Each image is read for its size from its header, then read and decoded once by the writer.
    Images that only decoding shows to be corrupt stop it (on_error `fail`) or, with `skip`,
    are left out by writing the file a second time without them.
    write_mode `auto` stores images of at most 96x96 pixels raw and larger ones as JPEG.
    A `decoder` decodes and fits the images elsewhere (a Ray cluster), streamed in order to
    this machine's `workers` writer processes.
    """
    if max_resolution < 2:
        raise ValueError(f"max_resolution must be >= 2 (got {max_resolution})")
    if len(collection) == 0:
        raise UserError(f"{collection.source}: no images")
    found = scan(collection, on_error, progress)
    with atomic_file(out) as tmp:  # renamed to `out` when whole
        layout = Layout.of(found.sizes, max_resolution, write_mode)
        stop_at_failure = on_error == "fail"
        written = _write_images(collection, found, layout, tmp, workers, progress, stop_at_failure, decoder)
        if written.corrupt and on_error == "skip" and not written.errors:
            found = found.without(written.corrupt, collection)
            layout = Layout.of(found.sizes, max_resolution, write_mode)
            written = _write_images(collection, found, layout, tmp, workers, progress, True, decoder)
            written.errors += written.corrupt.values()  # read well the first time: not to be skipped
        _refuse_failures(written)
        labels = _labels(collection, found)
        metadata = _metadata(collection, found, labels, layout, written.greyscale, max_resolution)
        metadata.update(_digests(tmp))
        metadata_path(out).unlink(missing_ok=True)  # an old JSON must not vouch for the new file
    if collection.path(0):  # the lists are written before the JSON that vouches for them
        metadata.update(_write_sidecar(out, "paths", _packed_paths(collection, found.good)))
    metadata.update(_write_sidecar(out, "labels", [_labels_npy(labels)]))
    write_json_atomic(metadata_path(out), metadata)
    return metadata


def _refuse_failures(written: _Written) -> None:
    if written.errors:
        raise UserError(f"image failed while writing: {written.errors[0]}")
    if written.corrupt:
        raise CorruptImage(f"corrupt image {next(iter(written.corrupt.values()))}")


def _labels(collection: Collection, found: ScanResult) -> np.ndarray:
    return np.fromiter((collection.label(int(i)) for i in found.good), np.int32, len(found.good))


def _metadata(collection: Collection, found: ScanResult, labels: np.ndarray, layout: Layout, greyscale: bool,
              max_resolution: int) -> dict[str, Any]:
    return {
        "version": METADATA_VERSION, "count": len(found.good), "image_shape": [*layout.shape, 3],
        "channels": 1 if greyscale else 3, "labelled": bool(labels.min() >= 0),
        "label_names": collection.class_names, "num_classes": int(np.unique(labels[labels >= 0]).size),
        "source": collection.source, "format": collection.format, "write_mode": layout.write_mode,
        "resized_to": layout.side, "max_resolution": max_resolution,
        "skipped_count": len(found.skipped), "skipped": found.skipped,
    }


def _packed_paths(collection: Collection, indices: np.ndarray, block: int = 4096) -> Iterator[bytes]:
    """FILE.beton.paths's bytes, `block` images at a time: each path in UTF-8 (undecodable file
    names kept byte for byte), ended by a NUL byte, which no path contains."""
    for start in range(0, len(indices), block):
        yield b"".join(collection.path(int(i)).encode("utf-8", "surrogateescape") + b"\0"
                       for i in indices[start:start + block])


def _digests(beton: Path) -> dict[str, Any]:
    """The file's size, SHA-256 and chunk digests, as the metadata records them (one read)."""
    digests = file_digests(beton, CHUNK_BYTES)
    return {"bytes": digests.bytes, "sha256": digests.sha256, "chunk_bytes": digests.chunk_bytes,
            "chunk_sha256": digests.chunk_sha256}


def _write_sidecar(out: Path, kind: str, blocks: Iterable[bytes]) -> dict[str, str]:
    """FILE.beton.KIND written atomically from its blocks of bytes; the metadata's keys that
    vouch for it."""
    path, digest = sidecar_path(out, kind), hashlib.sha256()
    with atomic_file(path) as staging, open(staging, "wb") as file:
        for block in blocks:
            digest.update(block)
            file.write(block)
    return {f"{kind}_file": path.name, f"{kind}_sha256": digest.hexdigest()}


def _labels_npy(labels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, labels, allow_pickle=False)
    return buffer.getvalue()
