"""Assigning many images to clusters: the model and data of predict and evaluate, one
process or Ray Data actors, and tables written as the rows arrive.

With `workers` > 0 the images are read where they are used: the Ray Data dataset
holds only chunk numbers, and each actor opens the prepared data itself, reads its
chunks' images and assigns them with the model it built once from the model's two
files (sent through Ray's object store, so actors on other nodes need no shared
folder for the model; the data must be where every node sees it, as for training).
Rows come back in index order and are written as they arrive: memory stays bounded
whatever the number of images.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from distcluster.common.errors import UserError
from distcluster.common.files import atomic_file, staging_dir
from distcluster.data.arrays import ImageSource
from distcluster.engine.exported import LoadedModel, load_model, model_files, probabilities

Rows = dict[str, np.ndarray]  # index, (path,) cluster, confidence: one entry per image
CHUNK_BATCHES = 8  # an actor's task: at most this many batches of images
SHARD_ROWS = 1_000_000  # rows per parquet file when the output is a folder
TABLE_SUFFIXES = (".csv", ".parquet")  # a one-file --out, in any case (no suffix: a folder)


@dataclass
class Inputs:
    """What predict and evaluate work on."""

    model: LoadedModel
    model_files: dict[str, bytes]  # its weights and config.json, for actors to build it from
    data: str  # --data resolved: a .beton path, or a SPEC read in memory
    source: ImageSource


def open_inputs(args: argparse.Namespace) -> Inputs:
    """The model of --model, and --data resolved (prepared when a folder or zip) and opened."""
    from distcluster.data.sources import open_source, resolve_data
    from distcluster.tracking.registry import fetch_model

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0 (got {args.workers})")
    if args.gpu and args.workers == 0 and not torch.cuda.is_available():
        raise UserError("--gpu: no CUDA GPU is visible to this process")
    folder, scratch = fetch_model(args.model, args.tracking_uri, progress=not args.quiet)
    try:
        loaded, files = load_model(folder), model_files(folder)
    finally:
        if scratch is not None:
            scratch.cleanup()
    data = resolve_data(args.data, progress=not args.quiet, on_error=args.on_error)
    return Inputs(loaded, files, data, open_source(data))


def assign_all(inputs: Inputs, args: argparse.Namespace) -> Iterator[Rows]:
    """Rows of every image in index order, from this process or from args.workers actors; the
    paths are joined here (the actors hold no per-image list)."""
    if args.workers == 0:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rows = local_rows(inputs.model, inputs.source, 0, len(inputs.source), args.batch_size, device,
                          progress=not args.quiet)
    else:
        rows = ray_rows(inputs.model_files, inputs.data, len(inputs.source), args.workers, args.batch_size,
                        args.gpu)
    paths = inputs.source.paths()
    for part in rows:
        names = [printable(paths[int(i)]) for i in part["index"]] if paths else [None] * len(part["index"])
        yield {"index": part["index"], "path": np.array(names, dtype=object), "cluster": part["cluster"],
               "confidence": part["confidence"]}


def local_rows(loaded: LoadedModel, source: ImageSource, start: int, stop: int, batch: int,
               device: torch.device, progress: bool = False) -> Iterator[Rows]:
    """Rows of images [start, stop) without their paths, one batch at a time."""
    with tqdm(total=stop - start, desc="assigning", unit="img", disable=not progress) as bar:
        for images in source.range_batches(start, stop, batch):
            best = probabilities(loaded, images, device).max(1)
            end = start + len(images)
            yield {"index": np.arange(start, end), "cluster": best.indices.numpy(),
                   "confidence": best.values.numpy().round(6)}
            bar.update(len(images))
            start = end


class ChunkAssigner:
    """A Ray Data actor: the model and the data, opened once; chunk numbers in, rows out."""

    def __init__(self, files: dict[str, bytes], data: str, batch: int, chunk: int, threads: int) -> None:
        from distcluster.data.sources import open_source

        torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory() as folder:
            for name, content in files.items():
                (Path(folder) / name).write_bytes(content)
            self.loaded = load_model(Path(folder))
        self.source = open_source(data, threads=threads)
        self.batch, self.chunk = batch, chunk
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def __call__(self, chunks: dict[str, np.ndarray]) -> Rows:
        starts = [int(chunk) * self.chunk for chunk in chunks["id"]]
        parts = [rows for start in starts for rows in local_rows(
            self.loaded, self.source, start, min(start + self.chunk, len(self.source)),
            self.batch, self.device)]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def ray_rows(model_files: dict[str, bytes], data: str, total: int, workers: int, batch: int,
             gpu: bool) -> Iterator[Rows]:
    """Rows in index order from `workers` Ray Data actors (one GPU each with `gpu`)."""
    import ray

    from distcluster.cluster.ray_data import ordered_quiet_data
    from distcluster.cluster.ray_train import init_ray, share_cpus

    init_ray()  # the actors' output and Ray's stay in Ray's logs: stdout is the command's
    if gpu and ray.cluster_resources().get("GPU", 0) < 1:  # else the actors would wait for ever
        raise UserError("--gpu: the Ray cluster has no GPU for the predict actors")
    ordered_quiet_data()
    cpus = share_cpus(ray.cluster_resources().get("CPU", 1), workers)
    # Chunks of whole batches (the single-process batches, so the rows are the same), small
    # enough that every actor gets some of a small input.
    chunk = batch * max(1, min(CHUNK_BATCHES, total // (batch * workers * 2)))
    chunks = -(-total // chunk)
    # The chunk numbers come from the driver: no read task waits for a CPU the actors hold.
    numbers = ray.data.from_items([{"id": chunk} for chunk in range(chunks)], override_num_blocks=chunks)
    # No more actors than chunks: an actor without one would idle (and Ray Data warn about it).
    actors = ray.data.ActorPoolStrategy(size=min(workers, chunks))
    rows = numbers.map_batches(
        ChunkAssigner, batch_size=1, compute=actors, num_cpus=cpus, num_gpus=1 if gpu else 0,
        fn_constructor_kwargs={"files": model_files, "data": data, "batch": batch, "chunk": chunk,
                               "threads": max(1, round(cpus))})
    yield from rows.iter_batches(batch_size=None, batch_format="numpy")


@contextlib.contextmanager
def table_writer(out: Path) -> Iterator[Callable[[Rows], None]]:
    """A function taking Rows that writes them to `out` (.csv, .parquet, or a folder of
    parquet shards of SHARD_ROWS rows) as they come; `out` appears, whole, only when the
    block ends without an error."""
    if out.suffix.lower() in TABLE_SUFFIXES:
        with atomic_file(out) as staging, _ArrowWriter(staging, out.suffix.lower()) as writer:
            yield writer.write
        return
    staging = staging_dir(out)
    try:
        with _ShardWriter(staging) as writer:
            yield writer.write
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def printable(path: str) -> str:
    """A file name as text: bytes that are not UTF-8 (kept by Python as surrogates) written as
    \\xNN escapes, which CSV and Parquet can hold."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class _ArrowWriter:
    """Rows appended to one .csv or .parquet file (pyarrow), the schema taken from the first."""

    def __init__(self, path: Path, suffix: str) -> None:
        self.path, self.suffix, self.writer = path, suffix, None

    def write(self, rows: Rows) -> None:
        import pyarrow as pa

        table = pa.table({**rows, "path": pa.array(list(rows["path"]), pa.string())})
        if self.writer is None:
            self.writer = self._open(table.schema)
        self.writer.write_table(table)

    def _open(self, schema: Any) -> Any:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        return (pacsv.CSVWriter if self.suffix == ".csv" else pq.ParquetWriter)(str(self.path), schema)

    def __enter__(self) -> _ArrowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()


class _ShardWriter:
    """Rows written to part-00000.parquet, part-00001.parquet, ... of SHARD_ROWS rows each."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.current, self.rows, self.shards = folder, None, 0, 0

    def write(self, rows: Rows) -> None:
        if self.current is None or self.rows >= SHARD_ROWS:
            self.__exit__()
            self.current = _ArrowWriter(self.folder / f"part-{self.shards:05d}.parquet", ".parquet")
            self.shards, self.rows = self.shards + 1, 0
        self.current.write(rows)
        self.rows += len(rows["index"])

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.current is not None:
            self.current.__exit__()
            self.current = None
