"""Prepare with the decoding elsewhere: images decoded in order by a decoder (in this process, or
Ray Data tasks on a real two-node Ray cluster on this machine) stream through a ring in shared
memory to FFCV's writer processes; the file holds what a local prepare writes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from servers import ray_head, start_ray_node, stop_ray_node

from distcluster.commands.prepare import main as prepare_main
from distcluster.common.errors import CorruptImage
from distcluster.data import beton_writer
from distcluster.data.beton_writer import write_beton
from distcluster.data.ffcv_io import BetonSource, read_metadata
from distcluster.data.images import open_collection

pytestmark = pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`


def photo_pile(root: Path, count: int) -> Path:
    """`count` JPEGs of two sizes in 3 class folders: prepare resizes them (the size rule)."""
    rng = np.random.default_rng(5)
    for index in range(count):
        folder = root / f"class{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        shape = (30, 40, 3) if index % 2 else (44, 34, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{index:04d}.jpg")
    return root


def read_back(beton: Path) -> tuple[np.ndarray, np.ndarray]:
    source = BetonSource(beton)
    return torch.cat([b.clone() for b in source.batches(64)]).numpy(), source.labels.numpy()


def in_process_decoder(chunk: int, stop_after: int | None = None):
    """A decoder that fits `chunk` images at a time here, in order; it raises after `stop_after`."""
    def decode(fit, count):
        for start in range(0, count, chunk):
            if stop_after is not None and start >= stop_after:
                raise RuntimeError("the decoding cluster went away")
            yield fit(start, min(start + chunk, count))
    return decode


@pytest.fixture(scope="module")
def pile(tmp_path_factory) -> tuple[Path, Path]:
    """The pile, and the .beton a local prepare (the writer processes decode) makes of it."""
    root = tmp_path_factory.mktemp("streamed")
    photo_pile(root / "photos", 300)
    write_beton(open_collection(str(root / "photos")), root / "local.beton", max_resolution=24, workers=2,
                progress=False)
    return root / "photos", root / "local.beton"


def test_streamed_images_through_a_small_ring_make_the_file_a_local_prepare_makes(pile, tmp_path,
                                                                                  monkeypatch):
    """Chunks of 3 images for 2 writer processes: a ring of 9 slots wraps around 33 times."""
    photos, local = pile
    monkeypatch.setattr(beton_writer, "WRITER_CHUNK", 3)
    streamed = write_beton(open_collection(str(photos)), tmp_path / "s.beton", max_resolution=24, workers=2,
                           progress=False, decoder=in_process_decoder(chunk=7))
    expected = read_metadata(local)
    for key in ("count", "image_shape", "channels", "labelled", "label_names", "resized_to", "write_mode"):
        assert streamed[key] == expected[key], key
    images, labels = read_back(tmp_path / "s.beton")
    local_images, local_labels = read_back(local)
    assert np.array_equal(images, local_images) and np.array_equal(labels, local_labels)


def test_a_corrupt_image_met_by_the_decoder_fails_or_is_skipped_as_in_a_local_prepare(pile, tmp_path):
    photos, _ = pile
    broken = tmp_path / "photos"
    subprocess.run(["cp", "-r", str(photos), str(broken)], check=True)
    victim = broken / "class1" / "0100.jpg"
    victim.write_bytes(victim.read_bytes()[:400])  # its header is whole: only decoding finds it
    with pytest.raises(CorruptImage, match="0100.jpg"):
        write_beton(open_collection(str(broken)), tmp_path / "f.beton", max_resolution=24, workers=2,
                    progress=False, decoder=in_process_decoder(chunk=16))
    assert not (tmp_path / "f.beton").exists()
    kept = write_beton(open_collection(str(broken)), tmp_path / "k.beton", max_resolution=24, workers=2,
                       progress=False, on_error="skip", decoder=in_process_decoder(chunk=16))
    assert kept["count"] == 299 and kept["skipped"][0]["path"].endswith("class1/0100.jpg")


def test_a_decoder_that_fails_midway_fails_the_prepare_and_leaves_no_file(pile, tmp_path):
    photos, _ = pile
    with pytest.raises(RuntimeError, match="the decoding cluster went away"):
        write_beton(open_collection(str(photos)), tmp_path / "x.beton", max_resolution=24, workers=2,
                    progress=False, decoder=in_process_decoder(chunk=16, stop_after=64))
    assert list(tmp_path.iterdir()) == []


def test_ray_data_tasks_on_two_nodes_decode_and_stream_to_the_one_writer(pile, tmp_path):
    """`prepare --ray-decoders 4` with RAY_ADDRESS set: both nodes decode, the file is the local one's."""
    photos, local = pile
    with ray_head(cpus=1) as head:
        node = start_ray_node(head, cpus=1)
        try:
            done = subprocess.run(
                [sys.executable, "-m", "distcluster.prepare", str(photos), "--out", str(tmp_path / "r.beton"),
                 "--max-resolution", "24", "--workers", "2", "--ray-decoders", "4"],
                cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, **head.env})
        finally:
            stop_ray_node(node)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "decoded on 2 Ray node(s)" in done.stderr, done.stderr[-3000:]
    images, labels = read_back(tmp_path / "r.beton")
    local_images, local_labels = read_back(local)
    assert np.array_equal(images, local_images) and np.array_equal(labels, local_labels)


def test_a_negative_number_of_decoders_is_refused_in_one_line(tmp_path, capsys):
    assert prepare_main(["digits", "--out", str(tmp_path / "d.beton"), "--ray-decoders", "-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "distcluster.prepare: error: --ray-decoders must be >= 0 (0 = no Ray), got -1"]


def test_decode_tasks_are_whole_chunks_of_at_most_256_images_and_every_decoder_gets_some():
    from distcluster.cluster.ray_data import CHUNK, chunk_size

    assert chunk_size(1_000_000, 64) == CHUNK == 256
    assert chunk_size(300, 4) == 18  # 17 tasks for 4 decoders
    assert chunk_size(10, 4) == 16  # never below 16 images
