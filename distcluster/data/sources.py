"""From a data SPEC to an ImageSource: in memory, a .beton, or prepared into a cache.

`digits` and `.npz` files are small and stay in memory. A `.beton` is read
through FFCV. Any other SPEC (an ImageFolder directory or .zip, `cifar10:ROOT`,
`cifar100-20:ROOT`) is prepared once into the cache ($DISTCLUSTER_CACHE, else
~/.cache/distcluster) under a key made of its format, path, and the sizes and
modification times of its files, and read from there.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from distcluster.common.errors import UserError
from distcluster.data.arrays import ImageSource, load_source
from distcluster.data.images import detect_format, files_under, open_collection

IN_MEMORY = ("digits", "npz")
DEFAULT_MAX_RESOLUTION = 256
CACHE_VERSION = 2  # bump when prepare writes different pixels (2: EXIF orientation applied)


def cache_dir() -> Path:
    folder = Path(os.environ.get("DISTCLUSTER_CACHE") or Path.home() / ".cache" / "distcluster").absolute()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"DISTCLUSTER_CACHE={folder} is not a folder")
    return folder


def fingerprint(path: Path) -> str:
    """Changes when any file under `path` (a folder or one file) is added, removed, resized or
    touched: one stat per file, on every run."""
    digest = hashlib.sha256(os.fsencode(f"{CACHE_VERSION}:{path.resolve()}"))  # any file name's bytes
    files = sorted(files_under(path)) if path.is_dir() else [("", path)]
    for name, file in files:
        stat = file.stat()
        digest.update(os.fsencode(f"{name}:{stat.st_size}:{stat.st_mtime_ns}"))
    return digest.hexdigest()[:16]


def resolve_data(spec: str, progress: bool = True, on_error: str = "fail",
                 max_resolution: int = DEFAULT_MAX_RESOLUTION) -> str:
    """Where a run reads `spec` from: `digits` itself; a .beton or .npz by its absolute path (Ray
    workers run in other folders); anything else converted once into a cached .beton (this
    machine's cache: README, shared storage), images at most `max_resolution` px (prepare's size
    rule), a corrupt image stopping it (CorruptImage) or, with on_error `skip`, left out."""
    if spec.endswith(".beton"):
        return str(Path(spec).absolute())
    fmt, path = detect_format(spec)
    if fmt in IN_MEMORY:
        return str(path.absolute()) if path else spec
    from distcluster.data.beton_writer import write_beton
    from distcluster.data.ffcv_io import metadata_path

    size = "" if max_resolution == DEFAULT_MAX_RESOLUTION else f"-r{max_resolution}"
    beton = cache_dir() / f"{fmt}-{path.name}-{fingerprint(path)}{size}.beton"
    if not metadata_path(beton).is_file():
        if progress:  # status, on stderr (evaluate's stdout is its JSON alone); --quiet: none
            print(f"preparing {spec} into {beton} (once)", file=sys.stderr, flush=True)
        write_beton(open_collection(spec, fmt), beton, max_resolution, on_error=on_error, progress=progress)
    return str(beton)


def open_source(resolved: str, max_samples: int = 0, threads: int = 0) -> ImageSource:
    """Open what `resolve_data` returned; `threads` for FFCV (0 = this process's torch threads)."""
    if not resolved.endswith(".beton"):
        return load_source(resolved, max_samples)
    from distcluster.data.ffcv_io import BetonSource

    return BetonSource(Path(resolved), max_samples, threads)
