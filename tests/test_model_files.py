"""A model folder is checked as a whole when it is opened, and every output path before any
work: each mistake is one line and exit 2 (issue 30, item 8)."""

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from commands import refused

from distcluster.commands import evaluate, predict
from distcluster.engine.exported import MODEL_CONFIG_FILE

OLD_MODEL = Path(__file__).parent / "fixtures" / "model-0.1.0-flat"
MODEL_FILES = "artifacts/model"


def edited_model(folder: Path, edit) -> Path:
    """A copy of the fixture model whose config.json went through `edit` (its weights untouched)."""
    model = folder / "model"
    shutil.copytree(OLD_MODEL, model)
    path = model / MODEL_FILES / MODEL_CONFIG_FILE
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    return model


@pytest.mark.parametrize("field, value, needle", [
    ("head", 99, "head 99 (the objective has 1 sub-heads)"),
    ("head", -1, "head -1"),
    ("size", [0, 0], "input.size [0, 0]"),
    ("size", [32], "input.size [32]"),
    ("std", [0.0], "input.std [0.0]"),
    ("std", [float("nan")], "input.std [nan]"),
    ("mean", [1.0, 2.0], "input.mean [1.0, 2.0] (must be 1 finite numbers)"),
    ("channels", 2, "input.channels 2"),
])
def test_a_model_that_cannot_be_applied_is_refused_when_opened(tmp_path, capsys, field, value, needle):
    def edit(meta):
        (meta if field == "head" else meta["input"])[field] = value

    model = edited_model(tmp_path, edit)
    out = tmp_path / "p.csv"
    err = refused(predict, ["--model", str(model), "--data", "digits", "--out", str(out), "--quiet"], capsys)
    assert needle in err and "not a usable model" in err
    assert not out.exists()


def test_an_output_that_names_a_folder_is_refused_before_any_work(tmp_path, capsys):
    taken = tmp_path / "x.csv"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    err = refused(predict, ["--model", str(OLD_MODEL), "--data", "digits", "--out", str(taken), "--quiet"],
                  capsys)
    assert "--out" in err and "is a folder" in err
    gallery = tmp_path / "g.png"
    gallery.mkdir()
    err = refused(evaluate, ["--model", str(OLD_MODEL), "--data", "digits", "--gallery", str(gallery),
                             "--quiet"], capsys)
    assert "--gallery" in err and "is a folder" in err
    assert (taken / "keep.txt").read_text() == "mine"


PR_CAPBSET_DROP, CAP_DAC_OVERRIDE = 24, 1  # linux/prctl.h, linux/capability.h


def without_write_override() -> None:
    """In the child before exec: drop the capability by which root writes to any folder, so
    that a suite run as root meets a read-only folder as every other user does."""
    if os.geteuid() == 0 and ctypes.CDLL(None, use_errno=True).prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.mark.parametrize("out_name", ["p.csv", "shards"])
def test_an_output_in_a_read_only_folder_is_refused_with_one_line(tmp_path, out_name):
    """A real process asked to write into a folder it may not write to."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "distcluster.predict", "--model", str(OLD_MODEL), "--data", "digits",
             "--out", str(locked / out_name), "--quiet"],
            capture_output=True, text=True, cwd=tmp_path, preexec_fn=without_write_override)
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.strip().count("\n") == 0 and "is not writable" in done.stderr
        assert not (locked / out_name).exists()
    finally:
        locked.chmod(0o755)
