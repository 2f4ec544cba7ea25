"""What a user's disk can throw at distcluster: one line on stderr, exit 2, nothing lost,
nothing executed. Every hostile input is built here, by the test."""

import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from commands import refused

from distcluster import config
from distcluster.cluster.ray_train import check_ray_address, warn_if_oversubscribed
from distcluster.commands import prepare, train
from distcluster.common.errors import UserError
from distcluster.common.files import file_sha256, write_atomic_dir, write_json_atomic
from distcluster.data.images import read_member
from distcluster.engine.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_META,
    CorruptCheckpoint,
    save_checkpoint,
    verified_checkpoint,
)
from distcluster.tracking.runs import check_reachable


# --------------------------------------------------------------------- files we write
def test_atomic_writes_never_follow_a_link_planted_at_a_temporary_name(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for planted in (".summary.json.tmp", ".summary.json.old"):
        (tmp_path / planted).symlink_to(victim)
    write_json_atomic(tmp_path / "summary.json", {"a": 1})
    assert victim.read_text() == "keep me"
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": 1}


def test_a_folder_written_atomically_has_the_permissions_of_any_folder_made_here(tmp_path):
    """(mkdtemp alone makes 0700: different from mkdir's under any umask but 077.)"""
    written = write_atomic_dir(tmp_path / "model", lambda folder: (folder / "w").write_text("x"))
    (tmp_path / "plain").mkdir()
    assert written.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_an_output_folder_with_the_users_files_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "model" / "precious.pt").write_text("user data")
    err = refused(train, ["--workers", "0", "--epochs", "1", "--output", str(out)], capsys)
    assert "not empty" in err
    assert (out / "model" / "precious.pt").read_text() == "user data"


def test_an_output_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "is a file" in refused(train, ["--workers", "0", "--output", str(tmp_path / "file")], capsys)


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", "."])
def test_a_run_name_is_one_folder_name(name, capsys):
    assert "run_name" in refused(train, ["--workers", "0", "--run-name", name], capsys)


# -------------------------------------------------------------- data that attacks
class _Exploit:
    """Unpickling this would create a file: what a hostile CIFAR batch can do."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_cifar_batch_whose_pickle_runs_code_is_refused_unrun(tmp_path, capsys):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    evidence = tmp_path / "pwned"
    for name in ["batches.meta", *[f"data_batch_{i}" for i in range(1, 6)], "test_batch"]:
        (root / name).write_bytes(pickle.dumps({"data": _Exploit(str(evidence)), "labels": [0]}))
    err = refused(prepare, [f"cifar10:{tmp_path}", "--out", str(tmp_path / "x.beton")], capsys)
    assert "refused" in err and not evidence.exists()


def test_a_zip_bomb_member_is_never_inflated_past_the_limit(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("cls/big.png", b"\0" * 200_000)
        info = archive.getinfo("cls/big.png")
    with zipfile.ZipFile(bomb) as archive:
        with pytest.raises(OSError, match="declares"):
            read_member(archive, "cls/big.png", limit=10_000)
    # a member that lies about its size is cut off at the declared size while streaming (where
    # zipfile then finds the CRC wrong) or at the limit: never read whole
    data = bytearray(bomb.read_bytes())
    small = (1000).to_bytes(4, "little")
    for offset in (data.find(b"PK\x03\x04") + 22, data.find(b"PK\x01\x02") + 24):
        data[offset:offset + 4] = small  # uncompressed size in the local and central headers
    bomb.write_bytes(bytes(data))
    with zipfile.ZipFile(bomb) as archive:
        assert archive.getinfo("cls/big.png").file_size == 1000 and info.file_size == 200_000
        with pytest.raises((OSError, zipfile.BadZipFile)):
            read_member(archive, "cls/big.png", limit=10_000)


def test_a_fifo_as_data_is_refused_at_once(tmp_path, capsys):
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    assert "not a regular file" in refused(train, ["--workers", "0", "--data", str(fifo)], capsys)


def test_a_yaml_alias_bomb_is_one_short_line(tmp_path, capsys):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i, name in enumerate("bcdefghijk"):
        previous = "abcdefghijk"[i]
        lines.append(f"{name}: &{name} [*{previous}, *{previous}, *{previous}, *{previous}, *{previous}, "
                     f"*{previous}, *{previous}, *{previous}, *{previous}]")
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    assert "aliases" in refused(train, ["--workers", "0", "--config", str(recipe)], capsys)


@pytest.mark.parametrize("text, expected", [
    ("epochs: !!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
    ("epochs: 3\n".encode("utf-16"), "not UTF-8"),
])
def test_python_tags_and_other_encodings_in_a_recipe_are_one_line(tmp_path, capsys, text, expected):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert expected in refused(train, ["--workers", "0", "--config", str(recipe)], capsys)


@pytest.mark.parametrize("arrays, expected", [
    ({"x": np.array([object()] * 4)}, "not a readable .npz"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, -1, 2])}, "class numbers"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, 2, 10**9])}, "class numbers"),
])
def test_npz_with_objects_or_impossible_labels_is_refused(tmp_path, capsys, arrays, expected):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    assert expected in refused(train, ["--workers", "0", "--data", str(path)], capsys)


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    folder = tmp_path_factory.mktemp("beton")
    np.savez(folder / "small.npz", x=np.random.default_rng(0).integers(0, 256, (64, 8, 8), np.uint8),
             y=np.arange(64) % 4)
    assert prepare.main([str(folder / "small.npz"), "--out", str(folder / "good.beton"), "--quiet"]) == 0
    return folder / "good.beton"


def _damaged_copy(beton, tmp_path, damage) -> str:
    copy = tmp_path / "copy.beton"
    copy.write_bytes(beton.read_bytes())
    meta = json.loads(beton.with_name(beton.name + ".json").read_text())
    data, meta = damage(copy.read_bytes(), meta)
    copy.write_bytes(data)
    copy.with_name(copy.name + ".json").write_text(json.dumps(meta))
    return str(copy)


@pytest.mark.parametrize("damage, expected", [
    (lambda data, meta: (data[:len(data) // 2], meta), "damaged"),
    (lambda data, meta: (os.urandom(len(data)), meta), "damaged"),
    (lambda data, meta: (data[:100] + os.urandom(len(data) - 100), meta), "SHA-256"),
    (lambda data, meta: (data, {}), "metadata"),
    (lambda data, meta: (data, [1, 2]), "metadata"),
    (lambda data, meta: (data, {**meta, "count": meta["count"] * 10}), "damaged"),
])
@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_a_damaged_beton_is_refused_before_ffcv_opens_it(beton, tmp_path, capsys, damage, expected):
    data = _damaged_copy(beton, tmp_path, damage)
    assert expected in refused(train, ["--workers", "0", "--data", data, "--set", "batch_size=16"], capsys)


def test_a_replaced_checkpoint_with_a_matching_hash_is_passed_over(tmp_path):
    save_checkpoint({"epoch": 3, "model": {"w": torch.ones(2)}}, tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(pickle.dumps(_Exploit(str(tmp_path / "pwned"))))
    path = tmp_path / CHECKPOINT_FILE
    (tmp_path / CHECKPOINT_META).write_text(json.dumps(
        {"epoch": 3, "bytes": path.stat().st_size, "sha256": file_sha256(path)}))
    with pytest.raises(CorruptCheckpoint):
        verified_checkpoint(tmp_path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"config": 5}'])
def test_a_malformed_model_config_is_one_line(tmp_path, capsys, text):
    from distcluster.commands import predict

    (tmp_path / "model").mkdir()
    torch.save({"w": torch.ones(1)}, tmp_path / "model" / "weights.pt")
    (tmp_path / "model" / "config.json").write_text(text)
    err = refused(predict, ["--model", str(tmp_path / "model"), "--data", "digits",
                            "--out", str(tmp_path / "p.csv")], capsys)
    assert "not a readable distcluster model" in err


# ------------------------------------------------------------ configuration values
@pytest.mark.parametrize("override, key", [
    ("optim.lr=.inf", "optim.lr"), ("imc_swav.temperature=.nan", "imc_swav.temperature"),
    ("optim.weight_decay=.inf", "optim.weight_decay"), ("clusters=1000000000", "clusters"),
    ("seed=1180591620717411303424", "seed"),
])
def test_infinite_and_huge_values_are_refused(override, key, capsys):
    assert f"'{key}'" in refused(train, ["--workers", "0", "--set", override], capsys)


@pytest.mark.parametrize("argv, expected", [
    (["digits", "--out", "FOLDER.beton"], "not a file"),
    (["digits", "--out", "x.beton", "--workers", "-1"], "--workers"),
])
def test_prepare_refuses_impossible_outputs_and_workers(tmp_path, capsys, argv, expected):
    (tmp_path / "FOLDER.beton").mkdir()
    argv = [str(tmp_path / a) if a.endswith(".beton") else a for a in argv]
    assert expected in refused(prepare, argv, capsys)


def test_a_cache_that_is_a_file_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "cache").write_text("x")
    monkeypatch.setenv("DISTCLUSTER_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    assert "DISTCLUSTER_CACHE" in refused(train, ["--workers", "0", "--data", str(folder.parent)], capsys)


@pytest.mark.parametrize("make, expected", [
    (lambda p: "bogus://x", "unknown scheme"),
    (lambda p: (p / "garbage.db").write_bytes(os.urandom(64)) and f"sqlite:///{p / 'garbage.db'}",
     "not an SQLite database"),
    (lambda p: (p / "dir.db").mkdir() or f"sqlite:///{p / 'dir.db'}", "not a file"),
])
def test_unusable_tracking_stores_are_refused_before_training(tmp_path, make, expected):
    with pytest.raises(UserError, match=expected):
        check_reachable(make(tmp_path))


def test_a_ray_address_that_does_not_answer_stops_within_seconds():
    with pytest.raises(UserError, match="cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:9"):
        check_ray_address("127.0.0.1:9", timeout=2)


def test_more_workers_than_cpus_gets_a_warning():
    said = []
    warn_if_oversubscribed(config.Config(workers=8), {"CPU": 2.0}, said.append)
    warn_if_oversubscribed(config.Config(workers=2), {"CPU": 2.0}, said.append)
    assert len(said) == 1 and "8 workers" in said[0] and "2 CPUs" in said[0]


def test_weights_that_are_not_finite_are_never_exported(tmp_path):
    from distcluster.common.errors import RunFailed
    from distcluster.engine.exported import export_model

    state = {"model": {"w": torch.tensor([1.0, float("nan")]), "n": torch.tensor(3)}, "config": {},
             "head": 0, "input": {}, "epoch": 1}
    with pytest.raises(RunFailed, match="not finite"):
        export_model(state, tmp_path)
    assert not list(tmp_path.iterdir())
