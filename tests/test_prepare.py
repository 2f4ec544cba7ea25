"""`distcluster.prepare`: every format round-trips through a real FFCV file; bad input exits 2."""

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from distcluster.commands.prepare import main as prepare_main
from distcluster.data.arrays import STATS_SAMPLE, ArraySource, gather_images, load_source, subset_indices
from distcluster.data.beton_writer import write_beton
from distcluster.data.ffcv_io import BetonSource, read_metadata
from distcluster.data.images import ArrayCollection, digits_arrays, files_under, open_collection
from distcluster.data.sources import resolve_data

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train-jpg.zip"


def prepare(src, out, *flags) -> dict:
    assert prepare_main([str(src), "--out", str(out), "--workers", "1", "--quiet", *flags]) == 0
    return read_metadata(out)


def read_back(beton: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """All images as (N, H, W, C) uint8 and the labels, through the FFCV loader."""
    source = BetonSource(beton)
    images = torch.cat([b.clone() for b in source.batches(7)]).permute(0, 2, 3, 1).numpy()
    return images, None if source.labels is None else source.labels.numpy()


def rng_images(n: int, size=(12, 10), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


@pytest.fixture
def class_folder(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """Two classes of lossless PNGs, one wrapper folder, one greyscale and one RGBA image."""
    root = tmp_path / "pets"
    expected = {}
    for label, name in enumerate(["cat", "dog"]):
        (root / "wrapper" / name).mkdir(parents=True)
        for i, pixels in enumerate(rng_images(3, seed=label)):
            path = f"wrapper/{name}/{i}.png"
            Image.fromarray(pixels).save(root / path)
            expected[path] = pixels
    grey = np.arange(120, dtype=np.uint8).reshape(12, 10)
    Image.fromarray(grey, "L").save(root / "wrapper/cat/grey.png")
    expected["wrapper/cat/grey.png"] = np.repeat(grey[..., None], 3, -1)
    rgba = np.zeros((12, 10, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red -> white
    Image.fromarray(rgba, "RGBA").save(root / "wrapper/dog/clear.png")
    expected["wrapper/dog/clear.png"] = np.full((12, 10, 3), 255, np.uint8)
    return root, expected


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_imagefolder_directory_round_trips_pixels_labels_and_class_names(class_folder, tmp_path):
    root, expected = class_folder
    meta = prepare(root, tmp_path / "pets.beton")
    images, labels = read_back(tmp_path / "pets.beton")
    order = sorted(expected)  # members are stored in sorted path order
    assert meta["count"] == 8 and meta["image_shape"] == [12, 10, 3] and meta["channels"] == 3
    assert meta["labelled"] and meta["label_names"] == ["cat", "dog"] and meta["skipped_count"] == 0
    np.testing.assert_array_equal(images, np.stack([expected[p] for p in order]))
    assert labels.tolist() == [0 if "/cat/" in p else 1 for p in order]


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
@pytest.mark.parametrize("stored_as", ["{}", "./{}"])  # `zip -r pets.zip ./cats ./dogs` keeps the './'
def test_zip_archive_gives_the_same_data_as_the_folder(class_folder, tmp_path, stored_as):
    root, _ = class_folder
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for path in sorted(root.rglob("*.png")):
            name = stored_as.format(path.relative_to(root).as_posix())
            out.writestr(zipfile.ZipInfo(name), path.read_bytes())
    prepare(root, tmp_path / "dir.beton")
    prepare(archive, tmp_path / "zip.beton")
    for a, b in zip(read_back(tmp_path / "dir.beton"), read_back(tmp_path / "zip.beton"), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_flat_folder_is_unlabelled_and_mixed_sizes_follow_the_size_rule(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i, (h, w) in enumerate([(40, 60), (30, 30), (50, 20), (64, 64), (24, 80)]):
        Image.fromarray(rng_images(1, (h, w), seed=i)[0]).save(folder / f"{i}.png")
    meta = prepare(folder, tmp_path / "flat.beton", "--max-resolution", "28")
    images, labels = read_back(tmp_path / "flat.beton")
    # shorter sides 40, 30, 20, 64, 24: median 30, capped at 28
    assert meta["resized_to"] == 28 and images.shape == (5, 28, 28, 3)
    assert labels is None and not meta["labelled"] and meta["label_names"] is None
    wide = np.asarray(Image.open(folder / "0.png").resize((42, 28), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(images[0], wide[:, 7:35])  # centre crop of the 42x28 resize


def write_cifar(root: Path, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR root in torchvision's python format, written here (two tiny batches)."""
    rows = rng_images(6, (32, 32), seed=3)
    if fmt == "cifar10":
        base, key, names = root / "cifar-10-batches-py", "labels", ("batches.meta", "label_names")
        parts = {"data_batch_1": slice(0, 4), "data_batch_2": slice(4, 6)}
        labels = np.array([3, 1, 4, 1, 5, 9])
        files = [f"data_batch_{i}" for i in range(3, 6)]  # present but empty
    else:
        base, key, names = root / "cifar-100-python", "coarse_labels", ("meta", "coarse_label_names")
        parts, labels, files = {"train": slice(0, 6)}, np.array([19, 0, 7, 7, 2, 11]), []
    base.mkdir(parents=True)
    flat = rows.transpose(0, 3, 1, 2).reshape(6, -1)
    for name, part in {**parts, **{f: slice(0, 0) for f in files}}.items():
        batch = {"data": flat[part], key: labels[part].tolist(), "fine_labels": [0] * len(flat[part])}
        (base / name).write_bytes(pickle.dumps(batch))
    count = 10 if fmt == "cifar10" else 20
    (base / names[0]).write_bytes(pickle.dumps({names[1]: [f"class{i}" for i in range(count)]}))
    return rows, labels


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
@pytest.mark.parametrize("fmt", ["cifar10", "cifar100-20"])
def test_cifar_python_format_round_trips(tmp_path, fmt):
    rows, labels = write_cifar(tmp_path / "root", fmt)
    meta = prepare(f"{fmt}:{tmp_path / 'root'}", tmp_path / "c.beton")
    images, read_labels = read_back(tmp_path / "c.beton")
    np.testing.assert_array_equal(images, rows)
    assert read_labels.tolist() == labels.tolist()
    assert meta["format"] == fmt and len(meta["label_names"]) == (10 if fmt == "cifar10" else 20)


def test_digits_are_scikit_learns_scaled_to_bytes():
    from sklearn.datasets import load_digits

    images, labels = digits_arrays()
    reference = load_digits()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8 and labels.dtype == np.int64
    np.testing.assert_array_equal(images[..., 0], np.round(reference.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(labels, reference.target)
    assert images.max() == 255 and sorted(set(labels.tolist())) == list(range(10))


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_npz_and_digits_round_trip_with_greyscale_kept_as_one_channel(tmp_path):
    x = rng_images(5, (9, 9))
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(5))
    prepare(tmp_path / "a.npz", tmp_path / "a.beton")
    images, labels = read_back(tmp_path / "a.beton")
    np.testing.assert_array_equal(images, x)
    assert labels.tolist() == [0, 1, 2, 3, 4]
    with open(tmp_path / "A.NPZ", "wb") as upper_case:  # the suffix in capitals is an .npz too
        np.savez(upper_case, x=x, y=np.arange(5))
    prepare(tmp_path / "A.NPZ", tmp_path / "A.beton")
    np.testing.assert_array_equal(read_back(tmp_path / "A.beton")[0], x)
    meta = prepare("digits", tmp_path / "d.beton")
    images, labels = read_back(tmp_path / "d.beton")
    digits, targets = digits_arrays()
    assert meta["channels"] == 1 and images.shape == (1797, 8, 8, 1)
    np.testing.assert_array_equal(images, digits)
    np.testing.assert_array_equal(labels, targets)


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_grey_images_are_one_channel_in_memory_and_when_prepared_alike(tmp_path):
    """One channel rule (images.is_grey) for an .npz read in memory and for prepare (where the
    writer's processes apply it as they decode): grey images stored as RGB train as one channel
    both ways; colour keeps three, even when one image of many has it."""
    grey = np.repeat(rng_images(4)[..., :1], 3, axis=-1)
    colour = grey.copy()
    colour[2, 5, 5, 0] ^= 1  # one pixel of one image
    for images, channels in ((grey, 1), (colour, 3)):
        in_memory = ArraySource.from_hwc(images, None, "x").channels
        prepared = write_beton(ArrayCollection(images, None, "x", "npz"), tmp_path / "x.beton",
                               workers=2, progress=False)["channels"]
        assert in_memory == prepared == channels
    np.testing.assert_array_equal(ArraySource.from_hwc(grey, None, "x").images[:, 0], grey[..., 0])


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason="needs ../shared/data/cifar10-train-jpg.zip")
def test_subset_of_the_shared_cifar10_jpegs(tmp_path):
    with zipfile.ZipFile(SHARED_CIFAR) as shared, zipfile.ZipFile(tmp_path / "sub.zip", "w") as out:
        names = [n for n in shared.namelist() if n.endswith(".jpg")]
        picked = [n for n in names if "/cat/" in n][:20] + [n for n in names if "/ship/" in n][:20]
        for name in picked:
            out.writestr(name, shared.read(name))
        decoded = {n: np.asarray(Image.open(shared.open(n)).convert("RGB")) for n in picked}
    meta = prepare(tmp_path / "sub.zip", tmp_path / "sub.beton")
    images, labels = read_back(tmp_path / "sub.beton")
    assert meta["count"] == 40 and meta["image_shape"] == [32, 32, 3]
    assert meta["label_names"] == ["cat", "ship"]
    np.testing.assert_array_equal(images, np.stack([decoded[n] for n in sorted(picked)]))
    assert labels.tolist() == [0] * 20 + [1] * 20


# ---- bad input: one line on stderr, exit code 2, nothing left behind -------------------------


def truncated_jpeg(path: Path) -> None:
    buffer = path.with_suffix(".full.jpg")
    Image.fromarray(rng_images(1, (32, 32))[0]).save(buffer, quality=90)
    path.write_bytes(buffer.read_bytes()[:300])
    buffer.unlink()


@pytest.fixture
def folder_with_corrupt_image(tmp_path) -> Path:
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng_images(1, (16, 16), seed=i)[0]).save(root / "a" / f"{i}.png")
    truncated_jpeg(root / "a" / "broken.jpg")
    return root


def run_prepare(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distcluster.prepare", *argv], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_corrupt_image_fails_by_default_naming_the_file(folder_with_corrupt_image, tmp_path):
    done = run_prepare(str(folder_with_corrupt_image), "--out", "x.beton", "--quiet", cwd=tmp_path)
    assert done.returncode == 2
    message = done.stderr.strip().splitlines()
    assert len(message) == 1 and "broken.jpg" in message[0] and "--on-error skip" in message[0]
    assert not list(tmp_path.glob("x.beton*")) and not list(tmp_path.glob(".x.beton*"))


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_corrupt_image_is_skipped_counted_and_listed_on_request(folder_with_corrupt_image, tmp_path):
    meta = prepare(folder_with_corrupt_image, tmp_path / "x.beton", "--on-error", "skip")
    assert meta["count"] == 3 and meta["skipped_count"] == 1
    assert meta["skipped"][0]["path"].endswith("a/broken.jpg")


def encrypted_zip(path: Path) -> Path:
    """A zip whose one image is marked encrypted: Python writes no encryption, so the flag (bit
    0 of the general-purpose flags, what readers go by) is set in the written headers."""
    return _patched_zip(path, flags_at=(6, 8), value=0x1)


def deflate64_zip(path: Path) -> Path:
    """A zip whose one image declares compression method 9 (deflate64), which Python cannot read."""
    return _patched_zip(path, flags_at=(8, 10), value=9)


def _patched_zip(path: Path, flags_at: tuple[int, int], value: int) -> Path:
    """A one-image zip with a byte of its local and central headers (offsets in each) ORed with value."""
    with zipfile.ZipFile(path, "w") as out:
        out.writestr("a.png", b"not really compressed so")
    data = bytearray(path.read_bytes())
    for signature, offset in zip((b"PK\x03\x04", b"PK\x01\x02"), flags_at, strict=True):
        data[data.index(signature) + offset] |= value
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("case, needle", [
    ("missing", "not found"),
    ("empty", "no images found"),
    ("text-file", "unknown data format"),
    ("cifar-without-files", "missing cifar-10-batches-py/batches.meta"),
    ("npz-without-x", "no array 'x'"),
    ("bad-format-flag", "invalid choice"),
    ("bad-resolution", "--max-resolution"),
    ("bad-out", "must end in .beton"),
    ("encrypted-zip", "is encrypted"),
    ("deflate64-zip", "compression method 9"),
])
@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    np.savez(tmp_path / "no_x.npz", images=np.zeros((2, 4, 4), np.uint8))
    src, extra, out = {
        "missing": (tmp_path / "nowhere", [], "o.beton"),
        "empty": (tmp_path / "empty", [], "o.beton"),
        "text-file": (tmp_path / "notes.txt", [], "o.beton"),
        "cifar-without-files": (f"cifar10:{tmp_path / 'empty'}", [], "o.beton"),
        "npz-without-x": (tmp_path / "no_x.npz", [], "o.beton"),
        "encrypted-zip": (encrypted_zip(tmp_path / "locked.zip"), [], "o.beton"),
        "deflate64-zip": (deflate64_zip(tmp_path / "deflate64.zip"), [], "o.beton"),
        "bad-format-flag": ("digits", ["--format", "tiff-stack"], "o.beton"),
        "bad-resolution": ("digits", ["--max-resolution", "1"], "o.beton"),
        "bad-out": ("digits", [], "o.npy"),
    }[case]
    code = prepare_main([str(src), "--out", str(tmp_path / out), "--quiet", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not list(tmp_path.glob("*.beton*")) and not list(tmp_path.glob(".*.tmp*"))


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_image_failing_during_the_write_leaves_no_file_that_looks_complete(class_folder, tmp_path,
                                                                             monkeypatch, capsys):
    """The scan passes, then a file breaks before the writer reads it (a file changing under us)."""
    from distcluster.data import beton_writer

    root, _ = class_folder
    real_scan = beton_writer.scan

    def scan_then_break(collection, on_error, progress=True):
        found = real_scan(collection, on_error, progress)
        truncated_jpeg(root / "wrapper" / "dog" / "1.png")
        return found

    monkeypatch.setattr(beton_writer, "scan", scan_then_break)
    code = prepare_main([str(root), "--out", str(tmp_path / "p.beton"), "--quiet", "--workers", "1"])
    assert code == 2 and "dog/1.png" in capsys.readouterr().err
    assert not list(tmp_path.glob("p.beton*")) and not list(tmp_path.glob(".p.beton*"))


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_a_beton_without_its_metadata_is_refused(tmp_path):
    prepare("digits", tmp_path / "d.beton")
    (tmp_path / "d.beton.json").unlink()
    with pytest.raises(Exception, match="interrupted prepare"):
        BetonSource(tmp_path / "d.beton")


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_metadata_json_is_plain_json(tmp_path, capsys):
    prepare("digits", tmp_path / "d.beton")
    meta = json.loads((tmp_path / "d.beton.json").read_text())
    assert {"count", "image_shape", "label_names", "labelled", "skipped", "source"} <= set(meta)
    printed = capsys.readouterr()
    said = json.loads(printed.out)  # stdout is the JSON alone, for scripts; the status on stderr
    assert said == {k: meta[k] for k in said} and said["count"] == 1797
    assert printed.err == f"wrote {tmp_path / 'd.beton'} and d.beton.json\n"
    umask = os.umask(0)
    os.umask(umask)
    for name in ("d.beton", "d.beton.json", "d.beton.labels.npy"):  # readable as any file written here
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_max_samples_reads_a_fixed_random_subset_from_every_class_with_labels_and_paths_aligned(tmp_path):
    root = tmp_path / "sorted"
    for label, name in enumerate(["a", "b", "c"]):  # prepared in sorted order: 20 a, 20 b, 20 c
        (root / name).mkdir(parents=True)
        for i in range(20):
            pixels = np.zeros((8, 8, 3), np.uint8)
            pixels[..., 0], pixels[..., 1] = label * 80, label * 20 + i  # the image says who it is
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    prepare(root, tmp_path / "sorted.beton")
    every = BetonSource(tmp_path / "sorted.beton").paths()
    source = BetonSource(tmp_path / "sorted.beton", max_samples=12)
    picked = subset_indices(60, 12)
    assert len(source) == 12 and list(source.paths()) == [every[i] for i in picked]
    images = torch.cat([b.clone() for b in source.batches(5)])
    assert images[:, 1, 0, 0].tolist() == picked.tolist()  # G = label * 20 + i = index when sorted
    assert (images[:, 0, 0, 0] // 80).tolist() == source.labels.tolist() == (picked // 20).tolist()
    assert set(source.labels.tolist()) == {0, 1, 2}  # the first 12 would all be class a
    trained = torch.cat([b.clone() for b in source.epoch_batches(0, 12, 1, 0, seed=1)])
    assert sorted(trained[:, 1, 0, 0].tolist()) == picked.tolist()  # training sees exactly the subset
    shown = gather_images(source, np.array([7, 2, 11, 2]))  # the gallery's read: those images only
    assert sorted(shown) == [2, 7, 11]
    assert [int(shown[i][0, 0, 1]) for i in (2, 7, 11)] == picked[[2, 7, 11]].tolist()


def test_subset_indices_are_sorted_distinct_fixed_and_all_when_count_is_zero_or_too_large():
    picked = subset_indices(1000, 100)
    assert len(set(picked.tolist())) == 100 and (np.diff(picked) > 0).all() and picked.max() < 1000
    assert picked.tolist() == subset_indices(1000, 100).tolist()
    assert picked.min() < 100 and picked.max() > 900  # spread over the whole collection
    assert subset_indices(5, 0).tolist() == subset_indices(5, 9).tolist() == [0, 1, 2, 3, 4]


def test_files_under_lists_nested_and_linked_files_and_folders_without_going_round_a_loop(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.png").write_bytes(b"1")
    (tmp_path / "top.png").write_bytes(b"2")
    (tmp_path / "linked.png").symlink_to(tmp_path / "top.png")
    (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)  # a cycle, not followed
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    (elsewhere / "c").mkdir(parents=True)
    (elsewhere / "c" / "y.png").write_bytes(b"3")
    (elsewhere / "c" / "back").symlink_to(tmp_path / "a", target_is_directory=True)  # a longer cycle
    (tmp_path / "dogs").symlink_to(elsewhere / "c", target_is_directory=True)  # a linked class folder
    assert sorted(name for name, _ in files_under(tmp_path)) == [
        "a/b/x.png", "dogs/back/b/x.png", "dogs/y.png", "linked.png", "top.png"]


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_a_folder_is_prepared_once_and_again_when_a_file_is_added_or_changed(class_folder, capsys):
    root, _ = class_folder
    first = resolve_data(str(root))
    printed = capsys.readouterr()
    assert "preparing" in printed.err and printed.out == ""  # status: stdout is a command's result
    assert resolve_data(str(root), progress=False) == first and capsys.readouterr() == ("", "")
    Image.fromarray(rng_images(1)[0]).save(root / "wrapper/cat/new.png")
    added = resolve_data(str(root), progress=False)
    assert added != first and len(BetonSource(Path(added))) == len(BetonSource(Path(first))) + 1
    os.utime(root / "wrapper/dog/0.png", ns=(1, 1))  # same size, other modification time
    assert resolve_data(str(root), progress=False) not in (first, added)


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_data_is_resolved_to_absolute_paths_that_ray_workers_in_other_folders_can_open(
        class_folder, tmp_path, monkeypatch):
    root, _ = class_folder
    np.savez(tmp_path / "a.npz", x=rng_images(2))
    (tmp_path / "a.beton").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISTCLUSTER_CACHE", "cache")
    assert resolve_data("a.npz") == str(tmp_path / "a.npz")
    assert resolve_data("a.beton") == str(tmp_path / "a.beton")
    assert resolve_data("digits") == "digits"
    cached = Path(resolve_data(os.path.relpath(root, tmp_path), progress=False))
    assert cached.parent == tmp_path / "cache" and cached.is_file()


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_a_photo_is_read_turned_as_its_exif_orientation_says(tmp_path):
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, 16:] = (255, 160, 0)  # as the sensor wrote it: dark left half, orange right half
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: show it turned 90 degrees clockwise
    (tmp_path / "phone").mkdir()
    Image.fromarray(stored).save(tmp_path / "phone" / "photo.jpg", exif=exif, quality=95)
    prepare(tmp_path / "phone", tmp_path / "phone.beton")
    images, _ = read_back(tmp_path / "phone.beton")
    assert images.shape == (1, 32, 16, 3)  # upright: tall, not wide
    red = images[0, ..., 0]
    assert red[:12].max() < 40 and red[20:].min() > 215  # the right half is now the bottom


def test_an_images_size_from_its_header_is_the_size_it_decodes_to(tmp_path):
    """What prepare's first pass reads (no pixels decoded) agrees with `read`: EXIF turns in
    JPEG, PNG and WebP, grey, transparent and 16-bit images, in a folder and in a zip."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    stored = rng_images(1, (16, 32))[0]  # 16x32 stored; turned 90 degrees, 32x16 shown
    Image.fromarray(stored).save(folder / "turned.jpg", exif=exif_orientation(6))
    Image.fromarray(stored).save(folder / "turned.png", exif=exif_orientation(8))
    Image.fromarray(stored).save(folder / "mirrored.webp", exif=exif_orientation(2))
    Image.fromarray(rng_images(1, (9, 7))[0][..., 0]).save(folder / "grey.png")
    Image.fromarray(np.zeros((5, 11, 4), np.uint8), "RGBA").save(folder / "clear.png")
    Image.fromarray(np.arange(60, dtype=np.uint16).reshape(6, 10) * 999).save(folder / "deep.tif")
    with zipfile.ZipFile(tmp_path / "mixed.zip", "w") as out:
        for path in folder.iterdir():
            out.write(path, path.name)
    for src in (folder, tmp_path / "mixed.zip"):
        collection = open_collection(str(src))
        sizes = {name: collection.size(i) for i, name in enumerate(collection.members)}
        assert sizes == {name: collection.read(i).shape[:2] for i, name in enumerate(collection.members)}
        assert sizes["turned.jpg"] == sizes["turned.png"] == (32, 16) and sizes["mirrored.webp"] == (16, 32)


@pytest.mark.parametrize("pixels, mode, byte", [
    (np.full((2, 2), 3, np.uint16), "I;16", 0),  # near black stays near black, not stretched to white
    (np.full((2, 2), 65535, np.uint16), "I;16", 255),
    (np.full((2, 2), 32896, np.int32), "I", 128),  # a 16-bit PNG as older Pillows open it
    (np.full((2, 2), -100, np.int32), "I", 0),  # out of the 16-bit range: clipped
    (np.full((2, 2), 0.5, np.float32), "F", 128),  # floats in 0..1
    (np.full((2, 2), 300.0, np.float32), "F", 255),  # floats beyond 1: 0..255, clipped
])
def test_deep_images_become_bytes_by_the_range_their_format_declares(pixels, mode, byte):
    from distcluster.data.images import rgb_image

    image = Image.fromarray(pixels, mode) if mode != "I;16" else Image.fromarray(pixels)
    assert image.mode == mode
    assert np.asarray(rgb_image(image)).tolist() == np.full((2, 2, 3), byte).tolist()


def test_fitting_takes_the_centre_square_as_resizing_then_cropping_would_and_strips_stay_cheap():
    from distcluster.data.images import fit_image

    wide = rng_images(1, (40, 100))[0]
    resized = np.asarray(Image.fromarray(wide).resize((40, 16), Image.Resampling.BICUBIC))  # shorter side 16
    np.testing.assert_array_equal(fit_image(wide, 16), resized[:, 12:28])  # its centre 16 columns
    strip = rng_images(1, (1, 20_000))[0]  # resized whole first, this was 256 x 5,120,000 pixels
    assert fit_image(strip, 256).shape == (256, 256, 3)


def test_a_file_name_that_is_not_utf8_is_prepared_and_printed_with_escapes(tmp_path):
    """Linux file names are bytes: one that is not UTF-8 must not stop the cache's fingerprint,
    and predict's tables (CSV, Parquet) show it with \\xNN escapes."""
    from distcluster.data.sources import fingerprint
    from distcluster.inference.batch import printable

    folder = tmp_path / "latin1"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.png")  # 'café' in Latin-1
    Image.fromarray(rng_images(1)[0]).save(folder / name)
    assert len(fingerprint(folder)) == 16
    assert printable(name) == "caf\\xe9.png" and printable("café.png") == "café.png"


def exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_normalisation_statistics_come_from_images_spread_over_a_class_sorted_collection(tmp_path):
    dark_then_bright = np.zeros((12_000, 2, 2, 3), np.uint8)
    dark_then_bright[6_000:] = (255, 128, 0)  # the first 10,000 would be 60% dark
    np.savez(tmp_path / "sorted.npz", x=dark_then_bright)
    bright = (subset_indices(12_000, STATS_SAMPLE) >= 6_000).mean()  # the exact share in the sample
    prepare(tmp_path / "sorted.npz", tmp_path / "sorted.beton")
    for source in (load_source(str(tmp_path / "sorted.npz")), BetonSource(tmp_path / "sorted.beton")):
        mean, std = source.channel_stats()
        np.testing.assert_allclose(mean, [bright, bright * 128 / 255, 0], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(std[0], np.sqrt(bright * (1 - bright)), rtol=1e-6)


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_train_words_its_own_way_past_a_corrupt_image(folder_with_corrupt_image, tmp_path, capsys):
    """train has --on-error too: the hint it prints is one its user can follow."""
    from distcluster.commands import train

    argv = ["--config", "digits-imc-swav", "--workers", "0", "--data", str(folder_with_corrupt_image),
            "--epochs", "1", "--set", "batch_size=2",
            "--output", str(tmp_path / "run"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("distcluster.train: error: corrupt image") and "--on-error skip" in err
    assert train.main([*argv, "--on-error", "skip"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["num_samples"] == 3


def test_read_only_grey_images_from_the_object_store_make_a_source_without_a_warning():
    """Tune hands trials the consensus images through Ray's object store: read-only arrays."""
    import warnings

    from distcluster.data.arrays import ArraySource

    images = np.random.default_rng(0).integers(0, 17, (20, 8, 8, 1), dtype=np.uint8)
    images.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only array
        source = ArraySource.from_hwc(images, None, "consensus")
    assert torch.equal(source.images[:, 0], torch.from_numpy(images[..., 0].copy()))


def _layout_with_path_objects(names: list[str]):
    """The layout rule as it was written with a PurePosixPath per file (0.4 GB at a million files):
    the reference the string version must match."""
    from pathlib import PurePosixPath

    from distcluster.data.images import IMAGE_SUFFIXES

    def is_image(path):
        return (path.suffix.lower() in IMAGE_SUFFIXES and not any(p.startswith(".") for p in path.parts)
                and "__MACOSX" not in path.parts)

    paths = [PurePosixPath(name) for name in names if is_image(PurePosixPath(name))]
    if not paths:
        return "no images"
    prefix = 0
    while all(len(p.parts) > prefix + 1 for p in paths) and len({p.parts[prefix] for p in paths}) == 1:
        prefix += 1
    loose = [p for p in paths if len(p.parts) == prefix + 1]
    if loose and len(loose) != len(paths):
        return "mixed"
    members = sorted(str(p) for p in paths)
    if loose:
        return members, [-1] * len(members), None
    class_names = sorted({PurePosixPath(m).parts[prefix] for m in members})
    return members, [class_names.index(PurePosixPath(m).parts[prefix]) for m in members], class_names


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["a", "ab", "b", ".", "", ".h", "__MACOSX", "x.png", "y.JPG",
                                          ".z.jpg", "w.txt", "v.", "a.b.jpeg"]), min_size=1, max_size=4)
                .map("/".join).filter(lambda name: not name.startswith("/")), max_size=8))
def test_the_folder_layout_is_the_path_object_rule_for_any_names(names):
    """Relative names (a listing's, a zip's), with empty and '.' parts, hidden files, odd suffixes."""
    from distcluster.common.errors import UserError
    from distcluster.data.images import _folder_layout

    try:
        found = _folder_layout(names, "pile")
    except UserError as exc:
        found = "no images" if "no images" in str(exc) else "mixed"
    assert found == _layout_with_path_objects(names)
