"""Image collections on disk or in arrays: discovery, decoding, RGB conversion, size.

Every collection answers the same questions (how many images, the label and
path of image i, its pixels as (H, W, 3) uint8) so that `prepare` writes any
of them the same way. Labels are integers (-1 for none) and are only ever
used for evaluation.

Formats (see architecture.md, "Data SPEC"):

- `imagefolder`: a directory or a .zip. After descending through single
  wrapper folders, sub-folders are classes (images anywhere below them); a
  folder of loose images is one unlabelled collection.
- `cifar10`, `cifar100-20`: torchvision's python pickles under ROOT (or
  ROOT/cifar-10-batches-py, ROOT/cifar-100-python); CIFAR-100 uses its 20
  coarse super-class labels.
- `npz`: `x` (N, H, W[, C]) uint8 and optional integer `y`.
- `digits`: scikit-learn's embedded 8x8 digits.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import ExifTags, Image, ImageOps

from distcluster.common.errors import UserError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                            ".ppm", ".pgm", ".pbm"})
FORMATS = ("auto", "imagefolder", "cifar10", "cifar100-20", "npz", "digits")
MAX_MEMBER_BYTES = 256 << 20  # one image file inside a zip, inflated (a 50 MP JPEG is ~20 MB)
MAX_CLASSES = 100_000  # labels are class numbers below this
SPLITS = ("train", "test", "all")
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "label_names", "labels"),
    "cifar100-20": ("cifar-100-python", ["train"], ["test"], "meta", "coarse_label_names",
                    "coarse_labels"),
}


class BadImage(Exception):
    """An image file that cannot be decoded."""


class Collection(Protocol):
    source: str
    format: str
    class_names: list[str] | None

    def __len__(self) -> int: ...

    def label(self, index: int) -> int: ...

    def path(self, index: int) -> str | None: ...

    def read(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8; raises BadImage."""

    def size(self, index: int) -> tuple[int, int]:
        """(H, W) of `read(index)`, decoding no pixels where the format allows; raises BadImage
        when even that much is unreadable (damage further in is found by `read`)."""


@dataclass
class ArrayCollection:
    """Images already in memory: (N, H, W, C) uint8 with C in {1, 3, 4}."""

    images: np.ndarray
    labels: np.ndarray | None
    source: str
    format: str
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def label(self, index: int) -> int:
        return -1 if self.labels is None else int(self.labels[index])

    def path(self, index: int) -> str | None:
        return None

    def read(self, index: int) -> np.ndarray:
        return to_rgb_array(self.images[index])

    def size(self, index: int) -> tuple[int, int]:
        return self.images.shape[1], self.images.shape[2]


@dataclass
class FileCollection:
    """Image files in a directory or a .zip archive, with labels from class folders."""

    root: Path
    members: list[str]  # paths relative to root (or names inside the zip)
    labels: list[int]
    source: str
    class_names: list[str] | None
    format: str = "imagefolder"
    _zip: zipfile.ZipFile | None = field(default=None, repr=False)
    _zip_pid: int = field(default=-1, repr=False)

    def __len__(self) -> int:
        return len(self.members)

    def label(self, index: int) -> int:
        return self.labels[index]

    def path(self, index: int) -> str:
        """The file (a directory's file, or archive.zip/member)."""
        return str(self.root / self.members[index])

    def _open(self, member: str, whole: bool = True):
        """The file's bytes as a stream; a zip member inflated whole, or with `whole` False only
        as far as the reader reads (a header)."""
        if self.root.is_dir():
            path = self.root / member
            if not path.is_file():  # a FIFO or a device would hang or never end
                raise OSError(f"not a regular file: {path}")
            return open(path, "rb")
        if self._zip is None or self._zip_pid != os.getpid():  # one handle per process
            self._zip, self._zip_pid = zipfile.ZipFile(self.root), os.getpid()
        if whole:
            return io.BytesIO(read_member(self._zip, member))
        return self._zip.open(checked_member(self._zip, member))

    def read(self, index: int) -> np.ndarray:
        member = self.members[index]
        try:
            with self._open(member) as handle, Image.open(handle) as image:
                image.load()
                ImageOps.exif_transpose(image, in_place=True)  # as viewers show it: phones store it turned
                return np.asarray(rgb_image(image))
        except _UNREADABLE as exc:
            raise BadImage(f"{member}: {exc}") from None

    def size(self, index: int) -> tuple[int, int]:
        """From the header alone: PIL reads the size (and EXIF) without decoding the pixels."""
        member = self.members[index]
        try:
            with self._open(member, whole=False) as handle, Image.open(handle) as image:
                width, height = image.size
                return (width, height) if _orientation(image) in _QUARTER_TURNS else (height, width)
        except _UNREADABLE as exc:
            raise BadImage(f"{member}: {exc}") from None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_zip"], state["_zip_pid"] = None, -1
        return state


_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_UNREADABLE = (OSError, ValueError, SyntaxError, zipfile.BadZipFile, Image.DecompressionBombError)
_QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that exif_transpose turns by 90 degrees


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation `exif_transpose` will apply, from what the header holds. A PNG
    without an eXIf chunk before its pixels (where the PNG specification puts it) reads as
    upright: PIL's getexif() would decode the whole image to look behind them."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return image.getexif().get(ExifTags.Base.Orientation, 1)


def checked_member(archive: zipfile.ZipFile, member: str, limit: int = MAX_MEMBER_BYTES) -> zipfile.ZipInfo:
    """A zip member whose declared size is at most `limit` (else OSError)."""
    info = archive.getinfo(member)
    if info.file_size > limit:
        raise OSError(f"declares {info.file_size} bytes, more than the {limit} allowed per image")
    return info


def read_member(archive: zipfile.ZipFile, member: str, limit: int = MAX_MEMBER_BYTES) -> bytes:
    """A zip member's bytes, never inflating more than `limit` (a 4 MB zip bomb can declare a
    small size and hold gigabytes): the declared size is checked first, then the stream."""
    info = checked_member(archive, member, limit)
    with archive.open(info) as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"inflates past the {limit} bytes allowed per image")
    return data


def rgb_image(image: Image.Image) -> Image.Image:
    """Any PIL mode as RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(_bytes_of_depth(image)).convert("RGB")
    return image.convert("RGB")


def _bytes_of_depth(image: Image.Image) -> np.ndarray:
    """Pixels of a 16-bit, 32-bit integer or floating-point image as uint8, by the range its
    format declares, the same for every image (so a dark picture stays dark): 0..65535 for
    16 bits and for 32-bit integers within that range (16-bit PNGs open so in older Pillows),
    0..1 for floats that stay within it, else 0..255 clipped."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.min() >= 0 and values.max() <= 65535):
        values = values * (255 / 65535)
    elif image.mode == "F" and values.min() >= 0 and values.max() <= 1:
        values = values * 255
    return np.clip(np.nan_to_num(values).round(), 0, 255).astype(np.uint8)


def to_rgb_array(image: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 with C in {1, 3, 4} -> (H, W, 3); alpha is composited on white."""
    channels = image.shape[-1]
    if channels == 3:
        return image
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    alpha = image[..., 3:4].astype(np.float32) / 255
    return np.round(image[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)


def is_grey(images: np.ndarray) -> bool:
    """Whether (..., H, W, C) uint8 images carry no colour: one channel, or R = G = B everywhere.
    The one rule for a collection's channels, in memory and in prepare alike: a collection of
    grey images is trained as one channel, whatever channels its files store."""
    if images.shape[-1] == 1:
        return True
    return bool((images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all())


def target_size(sizes: np.ndarray, max_resolution: int) -> int | None:
    """The stored square side, or None when images are kept as they are.

    Images that all share one size with no side above `max_resolution` are
    stored unchanged. Otherwise every image is resized so that its shorter
    side is min(max_resolution, median shorter side of the collection) and
    centre-cropped to a square of that side.
    """
    sizes = np.asarray(sizes).reshape(-1, 2)  # (N, 2)
    if (sizes == sizes[0]).all() and sizes[0].max() <= max_resolution:
        return None
    shorter = np.sort(sizes.min(1))
    return min(max_resolution, int(shorter[len(shorter) // 2]))


def fit_image(image: np.ndarray, side: int | None) -> np.ndarray:
    """The centre square of the image, resized (antialiased bicubic) to side x side: what
    resizing the shorter side to `side` and centre-cropping gives, without resizing the parts
    the crop drops (a 1 x 3,000 strip would first become 256 x 768,000 pixels, 2 GB)."""
    if side is None:
        return image
    height, width = image.shape[:2]
    if (height, width) == (side, side):
        return image
    square = min(height, width)
    left, top = (width - square) / 2, (height - square) / 2
    box = (left, top, left + square, top + square)
    return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC, box=box))


def _parts(name: str) -> list[str]:
    """The parts of a relative POSIX path, as PurePosixPath reads them ('a//./b' -> a, b)."""
    return [part for part in name.split("/") if part not in ("", ".")]


def _is_image(name: str) -> bool:
    return _is_image_path(_parts(name))


def _is_image_path(parts: list[str]) -> bool:
    if not parts or any(part.startswith(".") for part in parts) or "__MACOSX" in parts:
        return False
    dot = parts[-1].rfind(".")
    return 0 < dot < len(parts[-1]) - 1 and parts[-1][dot:].lower() in IMAGE_SUFFIXES


def _image_names(names: Iterable[str]) -> list[str]:
    """The image files among relative POSIX paths, normalised and sorted. Plain strings: a path
    object per file cost 0.4 GB and tens of seconds at a million files."""
    found = []
    for name in names:
        parts = _parts(name)
        if _is_image_path(parts):
            found.append("/".join(parts))
    found.sort()
    return found


def _folder_layout(names: Iterable[str], source: str) -> tuple[list[str], list[int], list[str] | None]:
    """Class folders or a flat folder, from relative POSIX paths of image files."""
    members = _image_names(names)
    if not members:
        raise UserError(f"{source}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    # Wrapper folders every image shares are stripped: the longest common folder path (that of
    # the first and the last name, sorted, is that of all of them).
    shared = os.path.commonprefix([members[0], members[-1]])
    start = shared.rfind("/") + 1
    ends = [member.find("/", start) for member in members]  # where each one's class name ends
    loose = [member for member, end in zip(members, ends, strict=True) if end < 0]
    if loose and len(loose) != len(members):
        raise UserError(f"{source}: has both loose images ({loose[0]}) and class folders; "
                        "use one layout")
    if loose:
        return members, [-1] * len(members), None
    class_names = sorted({member[start:end] for member, end in zip(members, ends, strict=True)})
    index = {name: i for i, name in enumerate(class_names)}
    return members, [index[member[start:end]] for member, end in zip(members, ends, strict=True)], class_names


def files_under(folder: Path) -> Iterator[tuple[str, os.DirEntry]]:
    """(path relative to `folder`, with '/', and its directory entry) of every file below it,
    in no particular order. Linked files and linked folders count (class folders are often links
    to where the images live), as `find -L` lists them: a folder reached again along one path,
    through a link back to where that path came from, is not entered (no cycles)."""
    pending = [(str(folder), "", (_identity(os.stat(folder)),))]
    while pending:
        top, prefix, route = pending.pop()
        try:
            with os.scandir(top) as entries:
                for entry in entries:
                    if entry.is_dir():
                        identity = _identity(entry.stat())
                        if identity not in route:
                            pending.append((entry.path, f"{prefix}{entry.name}/", (*route, identity)))
                    elif entry.is_file():
                        yield f"{prefix}{entry.name}", entry
        except OSError as exc:
            raise UserError(f"{top}: cannot list this folder ({exc.strerror})") from None


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def open_imagefolder(path: Path) -> FileCollection:
    if path.is_dir():
        names = [name for name, _ in files_under(path)]
    elif zipfile.is_zipfile(path):
        names = _zip_image_members(path)
    elif path.is_file() and _is_image(path.name):  # one image: a folder of one, unlabelled
        return FileCollection(path.parent, [path.name], [-1], str(path), None)
    else:
        raise UserError(f"{path}: not a directory, a .zip archive or an image file")
    members, labels, class_names = _folder_layout(names, str(path))
    if path.is_file():  # a zip opens './a/b.png' by that name, not by the normalised 'a/b.png'
        as_stored = {"/".join(_parts(name)): name for name in names}
        members = [as_stored[member] for member in members]
    return FileCollection(path, members, labels, str(path), class_names)


def _zip_image_members(path: Path) -> list[str]:
    """The names of a zip's files, refusing (one line) an archive Python's zipfile cannot open:
    encrypted members or a compression method it lacks (deflate64, for one)."""
    with zipfile.ZipFile(path) as archive:
        infos = [info for info in archive.infolist() if not info.is_dir()]
    for info in infos:
        if info.flag_bits & 0x1:
            raise UserError(f"{path}: {info.filename} is encrypted; unzip the archive and give the folder")
        if info.compress_type not in _ZIP_METHODS:
            raise UserError(f"{path}: {info.filename} uses zip compression method {info.compress_type}, "
                            "which cannot be read here; unzip the archive and give the folder")
    return [info.filename for info in infos]


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR python batch holds: dicts, lists, strings, bytes, numbers and
    numpy arrays of numbers. Any other global (os.system, builtins.eval, ...) is refused, so
    a hostile batch file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: not part of a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            batch = _CifarUnpickler(handle, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"{path}: not a readable CIFAR python file ({exc})") from None
    if not isinstance(batch, dict):
        raise UserError(f"{path}: not a CIFAR python file (holds a {type(batch).__name__}, not a dict)")
    return batch


def open_cifar(root: Path, fmt: str, split: str = "train") -> ArrayCollection:
    folder, train_files, test_files, meta_file, names_key, labels_key = _CIFAR[fmt]
    base = root if (root / meta_file).is_file() else root / folder
    files = {"train": train_files, "test": test_files, "all": train_files + test_files}[split]
    missing = [name for name in [meta_file, *files] if not (base / name).is_file()]
    if missing:
        raise UserError(f"{root}: not a {fmt} root in torchvision's python format "
                        f"(missing {folder}/{', '.join(missing)})")
    images, labels = [], []
    for name in files:
        batch = _unpickle(base / name)
        if "data" not in batch or labels_key not in batch:
            raise UserError(f"{base / name}: missing 'data' or '{labels_key}'")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[labels_key], dtype=np.int64))
    class_names = list(_unpickle(base / meta_file)[names_key])
    return ArrayCollection(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels),
                           f"{fmt}:{root}", fmt, class_names)


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """`x` as (N, H, W, C) uint8 and `y` as int64, validated."""
    try:
        arrays = np.load(path, allow_pickle=False)  # never unpickle: object arrays are refused
        if not hasattr(arrays, "files"):
            raise ValueError("a single .npy array, not an .npz archive")
        if "x" not in arrays:
            raise UserError(f"{path}: .npz has no array 'x' (found: {', '.join(arrays.files) or 'none'})")
        x = arrays["x"]
        y = arrays["y"] if "y" in arrays else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a readable .npz file of numbers ({exc})") from None
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.dtype != np.uint8 or len(x) == 0 or x.shape[-1] not in (1, 3, 4):
        raise UserError(f"{path}: 'x' must be non-empty uint8 (N, H, W[, C]) with C in 1, 3, 4; "
                        f"got {x.dtype} {x.shape}")
    labels = None
    if y is not None:
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"{path}: 'y' must be integers of shape ({len(x)},), got {y.dtype} {y.shape}")
        if y.min() < 0 or y.max() >= MAX_CLASSES:
            raise UserError(f"{path}: labels 'y' must be class numbers in [0, {MAX_CLASSES}), "
                            f"got {y.min()} to {y.max()}")
        labels = y.astype(np.int64)
    return x, labels


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits (values 0-16) as uint8 (N, 8, 8, 1) and labels, read from
    the file scikit-learn ships (one row per image: 64 pixels, then the label) without importing
    scikit-learn, which every Ray worker that loads them would pay for (docs/architecture.md)."""
    package = importlib.util.find_spec("sklearn")
    if package is None or not package.submodule_search_locations:
        raise UserError("the digits data set comes with scikit-learn: pip install scikit-learn")
    path = Path(package.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    try:
        with gzip.open(path, "rt") as rows:
            table = np.loadtxt(rows, delimiter=",")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the digits scikit-learn ships at {path}: {exc}") from None
    images = np.clip(np.round(table[:, :64].reshape(-1, 8, 8) * (255 / 16)), 0, 255).astype(np.uint8)
    return images[..., None], table[:, 64].astype(np.int64)


def detect_format(spec: str) -> tuple[str, Path | None]:
    """A SPEC or SRC path to (format, path); `cifar10:ROOT` and `cifar100-20:ROOT` name theirs."""
    if spec == "digits":
        return "digits", None
    for fmt in ("cifar10", "cifar100-20"):
        if spec.startswith(fmt + ":"):
            root = Path(spec[len(fmt) + 1:])
            if not root.is_dir():
                raise UserError(f"data not found: {spec} ({root} is not a folder)")
            return fmt, root
    path = Path(spec)
    if not path.exists():
        raise UserError(f"data not found: {spec}")
    if not (path.is_dir() or path.is_file()):  # a FIFO or a device (/dev/zero) never ends
        raise UserError(f"{spec}: not a regular file or a folder")
    if path.suffix.lower() == ".npz":
        return "npz", path
    if path.is_dir():
        for fmt, (folder, *_rest) in _CIFAR.items():
            if (path / folder).is_dir() or path.name == folder:
                return fmt, path
        return "imagefolder", path
    if zipfile.is_zipfile(path) or _is_image(path.name):
        return "imagefolder", path
    raise UserError(f"{spec}: unknown data format (expected digits, a folder, .zip, .npz, .beton, "
                    "an image file, cifar10:ROOT or cifar100-20:ROOT)")


def open_collection(src: str, fmt: str = "auto", split: str = "train") -> Collection:
    """Open SRC as a collection of the given format (`auto` detects it)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}' (expected one of {', '.join(FORMATS)})")
    detected, path = detect_format(src) if fmt == "auto" else (fmt, Path(src.split(":", 1)[-1]))
    if path is not None and not path.exists():
        raise UserError(f"data not found: {path}")
    if detected == "digits":
        images, labels = digits_arrays()
        return ArrayCollection(images, labels, "digits", "digits", [str(d) for d in range(10)])
    if detected == "npz":
        images, labels = read_npz(path)
        return ArrayCollection(images, labels, str(path), "npz")
    if detected in _CIFAR:
        return open_cifar(path, detected, split)
    return open_imagefolder(path)
