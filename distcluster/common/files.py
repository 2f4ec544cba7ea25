"""Files and folders written so that a reader never sees half of one, and their hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distcluster.common.errors import UserError


def write_atomic_dir(target: Path, fill: Callable[[Path], object]) -> Path:
    """Fill a temporary sibling folder with `fill(folder)`, then rename it to `target`.

    A reader never sees a half-written folder: either the old one or the new one.
    """
    staging = staging_dir(target)
    try:
        fill(staging)
        if target.exists():
            # an empty folder of our own, under an unpredictable name: renaming over it cannot
            # follow a link someone planted at a fixed name
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # the process's umask: reading it means setting it, so set it straight back


def staging_dir(target: Path) -> Path:
    """A new empty folder beside `target` (unpredictable name) to fill and then rename to it,
    with the permissions any folder made here gets (mkdtemp makes 0700: a serving account
    could not read a model or a checkpoint written on shared storage)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o777 & ~_UMASK)
    return staging


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A new temporary file beside `path` (unpredictable name, created with O_EXCL, so no
    planted link is ever followed) to write into; renamed to `path` when the block ends
    without an error, removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the result reads like any file written here
    os.close(fd)
    staging = Path(name)
    try:
        yield staging
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as staging:
        staging.write_text(text)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


CHUNK_HEX = 16  # hex digits kept of each chunk's SHA-256: 64 bits, enough to tell a changed chunk


def chunk_digest(block: bytes) -> str:
    """The first CHUNK_HEX hex digits of the SHA-256 of `block` (`sha256sum` of the chunk, cut)."""
    return hashlib.sha256(block).hexdigest()[:CHUNK_HEX]


@dataclass(frozen=True)
class FileDigests:
    """A file's size, its SHA-256, and the chunk digest of each `chunk_bytes` piece of it in
    order (the last piece may be shorter; an empty file has none)."""

    bytes: int
    sha256: str
    chunk_bytes: int
    chunk_sha256: list[str]


def file_digests(path: Path, chunk_bytes: int) -> FileDigests:
    """`path` read once: its SHA-256 and its chunks' digests."""
    whole, chunks, size = hashlib.sha256(), [], 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_bytes), b""):
            whole.update(block)
            chunks.append(chunk_digest(block))
            size += len(block)
    return FileDigests(size, whole.hexdigest(), chunk_bytes, chunks)


def read_chunk_digests(path: Path, chunk_bytes: int, indices: Iterable[int]) -> Iterator[tuple[int, str]]:
    """(index, chunk digest) of the chunks `indices` of `path`, reading only those chunks."""
    with open(path, "rb") as handle:
        for index in indices:
            handle.seek(index * chunk_bytes)
            yield index, chunk_digest(handle.read(chunk_bytes))


def spread_sample(count: int, samples: int) -> list[int]:
    """`samples` of range(count) spread evenly, the first and the last always among them (all
    of them when count <= samples): the same ones on every call."""
    if samples < 2:
        raise ValueError(f"samples must be >= 2 to hold the first and the last (got {samples})")
    if count <= samples:
        return list(range(count))
    # the step is above 1 here, so no two positions round to the same index
    return [round(i * (count - 1) / (samples - 1)) for i in range(samples)]


def check_output_folder(out: Path, flag: str = "--output") -> None:
    """UserError (one line) unless `out` is a folder, or can be made one, that this process
    may write into."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file, not a folder")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {flag} {out}: {existing} is not a writable folder")


def check_writable_target(path: Path, flag: str, kind: str = "file") -> None:
    """UserError (one line) unless `path` can be written as a new `kind`: a "file" (an existing
    file is replaced, a folder is not) or a "folder" (must not exist yet), in an existing folder
    this process may write to."""
    if kind == "file" and path.is_dir():
        raise UserError(f"{flag} {path} is a folder: name a file")
    if kind == "folder" and path.exists():
        raise UserError(f"{flag} {path} exists: name a new folder")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"{flag}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag}: folder {parent} is not writable")
