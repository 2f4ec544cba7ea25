"""A prepared .beton's integrity: what every open checks (size, header, a fixed sample of chunk
digests, whatever the file's size), what `prepare --verify` checks (every chunk), files written
before chunk digests, and a prepare that reads each image once. Every damage is done here, by
the test, to a real FFCV file."""

import hashlib
import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from distcluster.commands.prepare import main as prepare_main
from distcluster.common.errors import CorruptImage, UserError
from distcluster.common.files import file_digests, read_chunk_digests, spread_sample
from distcluster.data import beton_writer, ffcv_io
from distcluster.data.beton_writer import write_beton
from distcluster.data.ffcv_io import BetonSource, read_metadata, verify_beton
from distcluster.data.images import ArrayCollection, FileCollection, open_collection

SMALL_CHUNK = 64 << 10  # the tests' chunk size: a file of a few MB holds more chunks than are sampled


# ------------------------------------------------------------------ digests and the sample
def test_file_digests_are_the_sha256_of_the_file_and_of_each_chunk(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 2500, dtype=np.uint8).tobytes()
    (tmp_path / "f").write_bytes(data)
    digests = file_digests(tmp_path / "f", 1000)
    assert digests.bytes == 2500 and digests.sha256 == hashlib.sha256(data).hexdigest()
    assert digests.chunk_sha256 == [hashlib.sha256(data[a:a + 1000]).hexdigest()[:16]
                                    for a in (0, 1000, 2000)]  # the last one is 500 bytes
    assert list(read_chunk_digests(tmp_path / "f", 1000, [2, 0])) == [
        (2, digests.chunk_sha256[2]), (0, digests.chunk_sha256[0])]
    (tmp_path / "empty").write_bytes(b"")
    assert file_digests(tmp_path / "empty", 1000).chunk_sha256 == []


def test_the_sample_is_evenly_spread_with_the_first_and_the_last_chunk():
    assert spread_sample(31, 16) == list(range(0, 31, 2))
    assert spread_sample(5, 16) == [0, 1, 2, 3, 4]
    assert spread_sample(0, 16) == []
    assert spread_sample(1000, 3) == [0, 500, 999]


@given(st.integers(0, 100_000), st.integers(2, 64))
def test_the_sample_is_distinct_sorted_and_bounded_for_any_file(count, samples):
    picked = spread_sample(count, samples)
    assert len(picked) == min(count, samples) and picked == sorted(set(picked))
    if count:
        assert picked[0] == 0 and picked[-1] == count - 1


# ------------------------------------------------------------------ a real .beton, damaged here
@pytest.fixture(scope="module")
def beton(tmp_path_factory) -> Path:
    """200 random 32x32 images, raw, its digests kept per 64 KiB chunk (about 130 of them)."""
    folder = tmp_path_factory.mktemp("checks")
    images = np.random.default_rng(1).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(beton_writer, "CHUNK_BYTES", SMALL_CHUNK)
        write_beton(ArrayCollection(images, np.arange(200) % 5, "rng", "npz"), folder / "good.beton",
                    workers=1, progress=False)
    return folder / "good.beton"


def copy_of(beton: Path, folder: Path, metadata=None) -> Path:
    """A copy of `beton` and its JSON (or the `metadata` given) in `folder`."""
    copy = folder / "copy.beton"
    copy.write_bytes(beton.read_bytes())
    for kind in ffcv_io.SIDECARS:
        if ffcv_io.sidecar_path(beton, kind).exists():
            ffcv_io.sidecar_path(copy, kind).write_bytes(ffcv_io.sidecar_path(beton, kind).read_bytes())
    meta = json.loads(ffcv_io.metadata_path(beton).read_text()) if metadata is None else metadata
    ffcv_io.metadata_path(copy).write_text(json.dumps(meta))
    return copy


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0x01]))


def chunks_of(beton: Path) -> tuple[int, list[int]]:
    """How many chunks the file has, and the ones every open hashes."""
    count = len(json.loads(ffcv_io.metadata_path(beton).read_text())["chunk_sha256"])
    return count, spread_sample(count, ffcv_io.SAMPLED_CHUNKS)


def bytes_read() -> int:
    """What this process has read so far (Linux: /proc/self/io's rchar, page cache included)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_the_metadata_records_size_sha256_and_chunk_digests(beton):
    meta = json.loads(ffcv_io.metadata_path(beton).read_text())
    data = beton.read_bytes()
    assert meta["version"] == 4 and meta["bytes"] == len(data) and meta["chunk_bytes"] == SMALL_CHUNK
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["chunk_sha256"][1] == hashlib.sha256(data[SMALL_CHUNK:2 * SMALL_CHUNK]).hexdigest()[:16]
    count, sampled = chunks_of(beton)
    assert count == math.ceil(len(data) / SMALL_CHUNK) and count > 4 * len(sampled)


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_an_open_refuses_a_flipped_byte_in_a_sampled_chunk(beton, tmp_path, which):
    count, sampled = chunks_of(beton)
    chunk = {"first": 0, "middle": sampled[len(sampled) // 2], "last": count - 1}[which]
    copy = copy_of(beton, tmp_path)
    flip_byte(copy, min(chunk * SMALL_CHUNK + 77, copy.stat().st_size - 1))
    with pytest.raises(UserError, match=f"chunk {chunk} of {count}, bytes {chunk * SMALL_CHUNK}-"):
        BetonSource(copy)


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_an_open_reads_only_the_sample_and_verify_finds_a_flipped_byte_anywhere(beton, tmp_path):
    count, sampled = chunks_of(beton)
    unsampled = next(c for c in range(count) if c not in sampled)
    copy = copy_of(beton, tmp_path)
    flip_byte(copy, unsampled * SMALL_CHUNK + 5)
    before = bytes_read()
    read_metadata(copy)  # the open's check: the flipped chunk is not among those it hashes
    read = bytes_read() - before
    json_size = ffcv_io.metadata_path(copy).stat().st_size
    assert read <= len(sampled) * SMALL_CHUNK + json_size + 8192 < copy.stat().st_size / 4
    with pytest.raises(UserError, match=f"chunk {unsampled} of {count},"):
        verify_beton(copy, progress=False)
    assert "intact" in verify_beton(beton, progress=False)


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_a_file_above_the_old_full_check_size_is_checked_too(beton, tmp_path, monkeypatch):
    """Before chunk digests, a file above FULL_CHECK_BYTES (1 GiB) was checked by size and header
    only; its sampled chunks are checked now at any size."""
    monkeypatch.setattr(ffcv_io, "FULL_CHECK_BYTES", 1024)  # every file here is "above 1 GiB"
    count, _ = chunks_of(beton)
    copy = copy_of(beton, tmp_path)
    flip_byte(copy, (count - 1) * SMALL_CHUNK + 3)
    with pytest.raises(UserError, match=f"chunk {count - 1} of {count},"):
        read_metadata(copy)


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
@pytest.mark.parametrize("damage", [
    lambda data: data + b"\0" * 10,  # extended: every chunk it had still matches
    lambda data: data[:-SMALL_CHUNK],
], ids=["extended", "truncated"])
def test_an_open_always_finds_a_file_of_another_size(beton, tmp_path, damage):
    copy = copy_of(beton, tmp_path)
    copy.write_bytes(damage(copy.read_bytes()))
    with pytest.raises(UserError, match=rf"\({copy.stat().st_size} bytes, {beton.stat().st_size} written\)"):
        read_metadata(copy)


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
@pytest.mark.parametrize("edit", [
    lambda meta: {**meta, "chunk_sha256": meta["chunk_sha256"][:-1]},
    lambda meta: {**meta, "chunk_bytes": 0},
    lambda meta: {**meta, "chunk_sha256": [7] * len(meta["chunk_sha256"])},
    lambda meta: {k: v for k, v in meta.items() if k != "bytes"},
])
def test_chunk_digests_that_do_not_cover_the_file_are_not_prepares_metadata(beton, tmp_path, edit):
    copy = copy_of(beton, tmp_path, edit(json.loads(ffcv_io.metadata_path(beton).read_text())))
    with pytest.raises(UserError, match="not the metadata distcluster.prepare writes"):
        read_metadata(copy)


# ------------------------------------------------------------- files from earlier versions
def legacy(meta: dict, version: int) -> dict:
    """The metadata as distcluster wrote it before chunk digests (2) or before any digest (1)."""
    dropped = {"chunk_bytes", "chunk_sha256"} | ({"bytes", "sha256"} if version == 1 else set())
    return {**{k: v for k, v in meta.items() if k not in dropped}, "version": version}


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_a_file_written_before_chunk_digests_opens_and_is_checked_as_before(beton, tmp_path, monkeypatch):
    meta = json.loads(ffcv_io.metadata_path(beton).read_text())
    copy = copy_of(beton, tmp_path, legacy(meta, 2))
    before, now = BetonSource(copy), BetonSource(beton)
    assert len(before) == 200 and before.labels.tolist() == now.labels.tolist()
    assert torch.equal(next(before.batches(200)), next(now.batches(200)))
    assert "its SHA-256 as written" in verify_beton(copy, progress=False)
    flip_byte(copy, copy.stat().st_size // 2)
    with pytest.raises(UserError, match="its SHA-256 changed"):
        read_metadata(copy)  # up to FULL_CHECK_BYTES: the whole file is hashed, as before
    with pytest.raises(UserError, match="cannot be named"):
        verify_beton(copy, progress=False)
    monkeypatch.setattr(ffcv_io, "FULL_CHECK_BYTES", 1024)
    read_metadata(copy)  # above it: size and header only, as before


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_a_file_written_before_any_digest_opens_and_verify_says_it_cannot_check_it(beton, tmp_path):
    meta = json.loads(ffcv_io.metadata_path(beton).read_text())
    copy = copy_of(beton, tmp_path, legacy(meta, 1))
    assert len(BetonSource(copy)) == 200
    with pytest.raises(UserError, match="records no digest"):
        verify_beton(copy, progress=False)


# ------------------------------------------------------------------------ prepare --verify
@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_verify_says_intact_with_exit_0_and_names_the_changed_chunk_with_exit_2(beton, tmp_path, capsys):
    count, _ = chunks_of(beton)
    assert prepare_main(["--verify", str(beton), "--quiet"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{beton}: intact ({beton.stat().st_size} bytes, all {count} chunks' SHA-256 as written)"]
    copy = copy_of(beton, tmp_path)
    for chunk in (3, count - 2):
        flip_byte(copy, chunk * SMALL_CHUNK + 11)
    assert prepare_main(["--verify", str(copy), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"distcluster.prepare: error: {copy}: damaged")
    first = f"chunk 3 of {count}, bytes {3 * SMALL_CHUNK}-{4 * SMALL_CHUNK - 1}, changed, 1 more after it"
    assert first in err[0]


@pytest.mark.parametrize("argv, expected", [
    (["--verify", "nowhere.beton"], "data file not found"),
    (["--verify", "x.npz"], "--verify takes a FILE.beton"),
    (["digits", "--verify", "x.beton"], "give no SRC or --out"),
    (["digits"], "required: --out"),
    ([], "required: src, --out"),
])
def test_verify_and_prepare_refuse_what_they_cannot_do(tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    assert prepare_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


# ------------------------------------------------------------- prepare reads each image once
@dataclass
class LoggedFiles(FileCollection):
    """A real folder collection that also notes, in `log`, each image's header read ('size i')
    and each decode ('read i'), whichever of the writer's processes does it."""

    log: Path | None = None

    def _note(self, what: str, index: int) -> None:
        with open(self.log, "a") as log:
            log.write(f"{what} {index}\n")

    def size(self, index: int) -> tuple[int, int]:
        self._note("size", index)
        return super().size(index)

    def read(self, index: int) -> np.ndarray:
        self._note("read", index)
        return super().read(index)


def photo_folder(root: Path, count: int) -> dict[str, np.ndarray]:
    """PNGs of mixed sizes in two classes; their pixels by relative path."""
    pixels = {}
    for i in range(count):
        size = (20 + i % 3 * 4, 24 + i % 2 * 6)
        path = f"{'ab'[i % 2]}/{i:02d}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        pixels[path] = np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels[path]).save(root / path)
    return pixels


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_prepare_decodes_each_image_once(tmp_path):
    photo_folder(tmp_path / "photos", 12)
    plain = open_collection(str(tmp_path / "photos"))
    logged = LoggedFiles(**vars(plain), log=tmp_path / "log")
    meta = write_beton(logged, tmp_path / "p.beton", max_resolution=16, workers=2, progress=False)
    notes = sorted((tmp_path / "log").read_text().split("\n")[:-1])
    assert notes == sorted([f"size {i}" for i in range(12)] + [f"read {i}" for i in range(12)])
    assert meta["count"] == 12 and meta["resized_to"] == 16 and meta["channels"] == 3


def truncated_in_the_pixels(path: Path) -> None:
    """A JPEG whose header is whole and whose pixel data stops at 60%: only decoding finds it."""
    noise = np.random.default_rng(9).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, "JPEG", quality=90)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 6 // 10])
    with Image.open(path) as image:
        assert image.size == (32, 32)  # the header reads


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_an_image_only_decoding_finds_corrupt_fails_or_is_skipped_and_left_out(tmp_path, capsys):
    pixels = photo_folder(tmp_path / "photos", 4)
    truncated_in_the_pixels(tmp_path / "photos" / "a" / "broken.jpg")
    argv = [str(tmp_path / "photos"), "--out", str(tmp_path / "p.beton"), "--quiet", "--workers", "1",
            "--max-resolution", "20"]
    assert prepare_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt image a/broken.jpg" in err[0] and "--on-error skip" in err[0]
    assert not list(tmp_path.glob("p.beton*")) and not list(tmp_path.glob(".p.beton*"))
    assert prepare_main([*argv, "--on-error", "skip"]) == 0
    meta = read_metadata(tmp_path / "p.beton")
    assert meta["count"] == 4 and meta["skipped_count"] == 1 and meta["resized_to"] == 20
    assert meta["skipped"][0]["index"] == 2 and meta["skipped"][0]["path"].endswith("a/broken.jpg")
    paths = BetonSource(tmp_path / "p.beton").paths()
    assert [Path(p).relative_to(tmp_path / "photos").as_posix() for p in paths] == sorted(pixels)
    assert not list(tmp_path.glob(".p.beton*"))


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
@pytest.mark.parametrize("on_error, reads", [
    ("fail", [0]),  # stops at the first image
    ("skip", [0, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5]),  # the five others again, for the file without it
])
def test_a_corrupt_image_stops_the_reading_or_with_skip_the_others_are_read_again(tmp_path, on_error, reads):
    photo_folder(tmp_path / "photos", 6)
    truncated_in_the_pixels(tmp_path / "photos" / "a" / "00.png")  # index 0, sorted first
    logged = LoggedFiles(**vars(open_collection(str(tmp_path / "photos"))), log=tmp_path / "log")
    if on_error == "fail":
        with pytest.raises(CorruptImage, match="a/00.png"):
            write_beton(logged, tmp_path / "p.beton", workers=1, progress=False, on_error=on_error)
    else:
        meta = write_beton(logged, tmp_path / "p.beton", workers=1, progress=False, on_error=on_error)
        assert meta["count"] == 5 and meta["skipped"][0]["index"] == 0
    notes = (tmp_path / "log").read_text().split("\n")  # one writer process: in order
    assert [note for note in notes if note.startswith("read")] == [f"read {i}" for i in reads]


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_image_paths_live_beside_the_metadata_and_are_checked_when_read(tmp_path):
    """The JSON every open parses holds no per-image list; predict's paths come from
    FILE.beton.paths (NUL-ended UTF-8), refused when it changed; a file prepared when the list
    was JSON (metadata version 3) still gives its paths."""
    photo_folder(tmp_path / "photos", 4)
    assert prepare_main([str(tmp_path / "photos"), "--out", str(tmp_path / "p.beton"), "--quiet",
                         "--workers", "1", "--max-resolution", "20"]) == 0
    meta = read_metadata(tmp_path / "p.beton")
    assert "paths" not in meta and meta["paths_file"] == "p.beton.paths"
    paths = list(BetonSource(tmp_path / "p.beton").paths())
    assert len(paths) == 4 and all(Path(p).is_file() for p in paths)
    sidecar = tmp_path / "p.beton.paths"
    assert sidecar.read_bytes() == b"".join(p.encode() + b"\0" for p in paths)

    legacy = json.dumps(paths).encode()  # as version 3 wrote it
    (tmp_path / "p.beton.paths.json").write_bytes(legacy)
    meta_file = tmp_path / "p.beton.json"
    meta_file.write_text(json.dumps({**meta, "version": 3, "paths_file": "p.beton.paths.json",
                                     "paths_sha256": hashlib.sha256(legacy).hexdigest()}))
    assert BetonSource(tmp_path / "p.beton").paths() == paths
    meta_file.write_text(json.dumps(meta))

    sidecar.write_bytes(sidecar.read_bytes().replace(b"a/", b"b/", 1))
    with pytest.raises(UserError, match="not the image list prepare wrote"):
        BetonSource(tmp_path / "p.beton").paths()


def test_a_path_table_gives_every_name_back_as_written(tmp_path):
    """Known answer: odd names (non-ASCII, spaces, undecodable bytes kept by surrogateescape)
    come back whole, by position, by slice and through a subset."""
    undecodable = b"\xff\xfe.jpg".decode("utf-8", "surrogateescape")
    names = ["a/x.jpg", "b/ümlaut café.png", f"c/{undecodable}", "d/e/f.jpg"]
    file = tmp_path / "p.beton.paths"
    file.write_bytes(b"".join(n.encode("utf-8", "surrogateescape") + b"\0" for n in names))
    with open(file, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    table = ffcv_io.PathTable(mapped, len(names))
    assert len(table) == 4 and list(table) == names and table[1:3] == names[1:3] and table[-1] == names[-1]
    assert list(table.subset(np.array([0, 3]))) == [names[0], names[3]]
    with pytest.raises(ValueError, match="4 paths for 5 images"):
        ffcv_io.PathTable(mapped, 5)


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_an_open_reads_the_labels_from_their_checked_list_and_older_files_from_the_beton(
        beton, tmp_path, monkeypatch):
    """FILE.beton.labels.npy (4 bytes an image) instead of a pass over the .beton's label field;
    a changed list is refused; a file prepared before the list reads the field."""
    expected = np.arange(200) % 5
    field_reads = []
    real_loader = BetonSource._loader
    monkeypatch.setattr(BetonSource, "_loader", lambda self, batch, fields, *a, **k: (
        field_reads.append(fields), real_loader(self, batch, fields, *a, **k))[1])
    subset = BetonSource(beton, max_samples=50)
    assert np.array_equal(subset.labels.numpy(), expected[subset.indices]) and field_reads == []
    older = json.loads(ffcv_io.metadata_path(beton).read_text())
    del older["labels_file"], older["labels_sha256"]
    assert np.array_equal(BetonSource(copy_of(beton, tmp_path, older)).labels.numpy(), expected)
    assert field_reads == [("label",)]
    copy = copy_of(beton, tmp_path)
    changed = expected.astype(np.int32)
    changed[7] = 4
    np.save(ffcv_io.sidecar_path(copy, "labels"), changed)
    with pytest.raises(UserError, match="copy.beton.labels.npy: not the label list prepare wrote"):
        BetonSource(copy)
    ffcv_io.sidecar_path(copy, "labels").unlink()
    with pytest.raises(UserError, match="copy.beton.labels.npy: unreadable"):
        BetonSource(copy)


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_one_loader_per_batch_size_reads_every_pass_each_aimed_at_its_own_images(beton, monkeypatch):
    """Each FFCV Loader compiles its pipeline anew (numba code is never freed: about 12 MB a
    loader), and predict's actors read a new range per chunk: every pass of one batch size goes
    through one loader, aimed at the pass's images, and gives exactly those images (the
    fixture's, known); only a pass started inside another gets a loader of its own."""
    built = []
    real_loader = BetonSource._loader
    monkeypatch.setattr(BetonSource, "_loader", lambda self, *a, **k: (
        built.append(a[0]), real_loader(self, *a, **k))[1])
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8))
    expected = images.permute(0, 3, 1, 2)  # the fixture's, as the source gives them
    source = BetonSource(beton)
    for _ in range(3):
        assert torch.equal(torch.cat(list(source.range_batches(0, 100, 32))), expected[:100])
    for start in range(0, 200, 30):  # 30 images (20 in the last range): 8, 8, 8, 6 (8, 8, 4)
        batches = list(source.range_batches(start, min(start + 30, 200), 8))
        assert [len(b) for b in batches] == ([8, 8, 8, 6] if start < 180 else [8, 8, 4])
        assert torch.equal(torch.cat(batches), expected[start:start + 30])
    assert torch.equal(source.take(np.array([150, 3, 77])), expected[[3, 77, 150]])
    assert built == [32, 8, ffcv_io.SCATTERED_BATCH]
    outer = source.range_batches(0, 24, 8)
    first = next(outer).clone()
    inner = torch.cat(list(source.range_batches(100, 124, 8)))  # while the outer pass is open
    assert torch.equal(torch.cat([first, *outer]), expected[:24]) and torch.equal(inner, expected[100:124])
    assert built == [32, 8, ffcv_io.SCATTERED_BATCH, 8]
    assert torch.equal(torch.cat(list(source.range_batches(40, 60, 8))), expected[40:60]) and len(built) == 4


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
@pytest.mark.parametrize("mode", ["raw", "jpg"])
def test_the_lean_writer_writes_the_bytes_ffcvs_own_writer_writes(tmp_path, mode):
    """LeanDatasetWriter queues ranges and keeps its allocations as arrays, FFCV's writer tuples:
    with one writer process (page order fixed) the two files are byte for byte the same; 250
    images of 64x64 fill several of FFCV's pages, so images are placed across page ends."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    images = np.random.default_rng(2).integers(0, 256, (250, 64, 64, 3), dtype=np.uint8)
    dataset = [(image, index % 7) for index, image in enumerate(images)]
    written = {}
    for name, writer_class in (("ffcv", DatasetWriter), ("lean", beton_writer._lean_dataset_writer_class())):
        fields = {"image": RGBImageField(write_mode=mode, jpeg_quality=90), "label": IntField()}
        writer = writer_class(str(tmp_path / f"{name}.beton"), fields, num_workers=1, page_size=1 << 21)
        if name == "ffcv":
            writer.from_indexed_dataset(dataset, chunksize=30)
        else:
            writer.write_all(dataset, 30)
        written[name] = (tmp_path / f"{name}.beton").read_bytes()
    assert len(written["ffcv"]) > 2 << 21 and written["lean"] == written["ffcv"]  # three pages or more


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_loaders_read_the_file_without_ffcvs_per_image_tables(beton):
    """FFCV's memory manager built a dict and two dicts of sets per image for every loader
    (0.55 GB and 2 s a loader at a million images); ours reads the same bytes without them, and
    builds them only for an order that asks (QUASI_RANDOM)."""
    from ffcv.loader import Loader, OrderOption

    source = BetonSource(beton)
    images = np.random.default_rng(1).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)  # the fixture's
    assert torch.equal(torch.cat(list(source.batches(64))), torch.from_numpy(images).permute(0, 3, 1, 2))
    manager = next(iter(source._idle_loaders.values())).memory_manager
    assert type(manager).__name__ == "LeanOSCacheManager" and "_page_tables" not in vars(manager)
    quasi = Loader(str(beton), batch_size=50, order=OrderOption.QUASI_RANDOM, drop_last=False,
                   pipelines={"image": None})
    assert sorted(int(x) for batch in quasi for x in batch[0].reshape(-1)) == sorted(np.arange(200) % 5)
    assert len(quasi.memory_manager.sample_to_pages) == 200


def mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if not line[:1].isupper() or ":" not in line.split()[0]:  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_the_mapped_pages_are_released_after_every_batch():
    released = []

    class Loader:  # what _released uses of an FFCV loader
        memory_manager = type("Manager", (), {"release_pages": lambda self: released.append(len(seen))})()

    seen = []
    for batch in ffcv_io._released(Loader(), range(10)):
        seen.append(batch)
    assert seen == list(range(10)) and released == list(range(1, 11))


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_a_pass_leaves_none_of_the_file_mapped_once_ended_or_left(beton):
    """A read-only mapping counts every page read towards the RSS (3 GB for an evaluation of a
    million images, before the release): an FFCV loader alone keeps all it read mapped; a pass
    of ours leaves nothing mapped once it ended or was left early."""
    image_bytes = 32 * 32 * 3
    source = BetonSource(beton)
    plain = source._loader(20, ("image",))
    assert sum(len(batch[0]) for batch in plain) == 200
    assert mapped_kib(beton) * 1024 >= 200 * image_bytes
    plain.memory_manager.release_pages()
    assert mapped_kib(beton) == 0
    batches = source.range_batches(0, 200, 20)  # mid-pass: what is mapped depends on the kernel
    assert sum(len(next(batches)) for _ in range(8)) == 160  # (a fault may map a 2 MiB folio)
    assert sum(len(rest) for rest in batches) == 40
    assert mapped_kib(beton) == 0
    left = source.range_batches(0, 200, 20)
    next(left)
    left.close()
    assert mapped_kib(beton) == 0
