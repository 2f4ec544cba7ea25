"""Models people can use: register with a real `mlflow server`, predict and evaluate from
models:/ URIs, plots on the run, safe loading, and one-line errors."""

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from servers import free_port, mlflow_server

from distcluster.images import digits_arrays

pytestmark = pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`

NAME = "digits-e2e"


def cli(module: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    quiet = ["--quiet"] if module != "train" else []
    return subprocess.run([sys.executable, "-m", f"distcluster.{module}", *argv, *quiet],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("registry")
    images, labels = digits_arrays()
    np.savez(folder / "digits400.npz", x=images[:400], y=labels[:400])
    with mlflow_server(folder) as uri:
        done = cli("train", "--config", "digits-imc-swav", "--workers", "0", "--epochs", "4",
                   "--batch-size", "100", "--data", str(folder / "digits400.npz"), "--register", NAME,
                   "--tracking-uri", uri, "--output", str(folder / "out"), cwd=folder)
        assert done.returncode == 0, done.stderr[-3000:]
        yield folder, uri, json.loads((folder / "out" / "summary.json").read_text())


def test_train_registers_a_version_whose_run_has_the_model_and_the_plots(registered):
    _, uri, summary = registered
    assert summary["mlflow"]["registered_model"] == NAME and summary["mlflow"]["version"] == "1"
    client = MlflowClient(uri)
    version = client.get_model_version(NAME, "1")
    assert version.run_id == summary["mlflow"]["run_id"]
    files = {a.path for a in client.list_artifacts(version.run_id, "plots")}
    assert files == {f"plots/{n}.png" for n in ("cluster_gallery", "cluster_sizes", "learning_curves",
                                                 "confusion_matrix")}
    assert {a.path for a in client.list_artifacts(version.run_id, "model")} == {"model/weights.pt",
                                                                                 "model/config.json"}


def test_evaluate_by_alias_gives_the_accuracy_of_the_training_summary(registered):
    folder, uri, summary = registered
    done = cli("evaluate", "--model", f"models:/{NAME}@latest", "--data", str(folder / "digits400.npz"),
               "--tracking-uri", uri, "--gallery", str(folder / "gallery.png"), cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["acc"] == pytest.approx(summary["metrics"]["acc"], abs=1e-9)
    assert result["nmi"] == pytest.approx(summary["metrics"]["nmi"], abs=1e-9)
    assert (result["num_samples"], result["clusters"]) == (400, 10)
    assert Image.open(folder / "gallery.png").size[0] > 100


def test_predict_on_new_jpegs_gives_one_row_per_image_and_one_file_alone_the_same(registered, tmp_path):
    folder, uri, _ = registered
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(23):  # RGB 20x20: the 1-channel 8x8 model gets them converted and resized
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(photos / f"p{i:02d}.jpg")
    for suffix in ("csv", "parquet"):
        out = tmp_path / f"clusters.{suffix}"
        done = cli("predict", "--model", f"models:/{NAME}/1", "--data", str(photos), "--out", str(out),
                   "--tracking-uri", uri, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        table = pd.read_csv(out) if suffix == "csv" else pd.read_parquet(out)
        assert list(table.columns) == ["index", "path", "cluster", "confidence"]
        assert table["index"].tolist() == list(range(23))
        assert [Path(p).name for p in table["path"]] == [f"p{i:02d}.jpg" for i in range(23)]
        assert table["cluster"].between(0, 9).all() and table["confidence"].between(0.1, 1).all()
    alone = tmp_path / "alone.csv"  # one image file: the same answer as in its folder
    done = cli("predict", "--model", f"models:/{NAME}/1", "--data", str(photos / "p05.jpg"), "--out",
               str(alone), "--tracking-uri", uri, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    row = pd.read_csv(alone)
    assert row["path"].tolist() == [str(photos / "p05.jpg")] and row["cluster"][0] == table["cluster"][5]
    assert row["confidence"][0] == pytest.approx(table["confidence"][5], rel=1e-4)


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_that_would_run_code_is_refused_and_the_code_never_runs(registered, tmp_path):
    folder, _, _ = registered
    model = tmp_path / "model"
    shutil.copytree(folder / "out" / "model", model)
    payload = _RunsCode()
    payload.marker = str(tmp_path / "pwned")
    (model / "weights.pt").write_bytes(pickle.dumps({"model": payload}))
    done = cli("predict", "--model", str(model), "--data", "digits", "--out", str(tmp_path / "p.csv"),
               cwd=tmp_path)
    assert done.returncode == 2 and "refused to load" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("case, needle", [
    ("unknown-model", "not found"),
    ("unknown-alias", "cannot load models:/digits-e2e@champion"),
    ("closed-registry", "cannot reach MLflow"),
    ("unlabelled", "has no labels"),
    ("missing-out-folder", "does not exist"),
    ("bad-out-suffix", "must end in .csv or .parquet"),
    ("missing-local-model", "model not found"),
    ("mismatched-model", "model config and weights do not match"),
])
def test_bad_input_exits_2_with_one_line(registered, tmp_path, case, needle):
    folder, uri, _ = registered
    photos = tmp_path / "flat"
    photos.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photos / "a.png")
    closed = f"http://127.0.0.1:{free_port()}"
    mismatched = tmp_path / "mismatched"
    shutil.copytree(folder / "out" / "model", mismatched)
    meta = json.loads((mismatched / "config.json").read_text())
    meta["config"]["clusters"] = 20  # heads of 10 in the weights
    (mismatched / "config.json").write_text(json.dumps(meta))
    module, argv = {
        "unknown-model": ("evaluate", ["--model", "models:/no-such-model@latest", "--tracking-uri", uri]),
        "unknown-alias": ("evaluate", ["--model", f"models:/{NAME}@champion", "--tracking-uri", uri]),
        "closed-registry": ("evaluate", ["--model", f"models:/{NAME}@latest", "--tracking-uri", closed]),
        "unlabelled": ("evaluate", ["--model", str(folder / "out"), "--data", str(photos)]),
        "missing-out-folder": ("predict", ["--model", str(folder / "out"),
                                           "--out", str(tmp_path / "no/x.csv")]),
        "bad-out-suffix": ("predict", ["--model", str(folder / "out"), "--out", str(tmp_path / "x.txt")]),
        "missing-local-model": ("evaluate", ["--model", str(tmp_path / "nothing")]),
        "mismatched-model": ("evaluate", ["--model", str(mismatched)]),
    }[case]
    if "--data" not in argv:
        argv += ["--data", "digits"]
    done = cli(module, *argv, cwd=tmp_path)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and needle in err[0], done.stderr[-2000:]
