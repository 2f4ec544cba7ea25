"""Models people can use: register with a real `mlflow server`, predict and evaluate from
models:/ URIs, plots on the run, safe loading, and one-line errors."""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from commands import refused
from logged_model import assert_logged_model
from mlflow.tracking import MlflowClient
from PIL import Image
from servers import free_port, mlflow_server, stop_server, wait_for
from training_runs import forwarded_lines

from distcluster.commands import evaluate, predict
from distcluster.data.images import digits_arrays
from distcluster.engine.exported import assignment_table, load_model
from distcluster.tracking.registry import MLFLOW_SETTINGS
from distcluster.tracking.runs import environment_restored

pytestmark = pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`

NAME = "digits-e2e"
MODEL_FILES = "artifacts/model"  # distcluster's two files inside the logged MLflow model


def cli(module: str, *argv: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m distcluster.<module>`; `env` is added to this process's environment."""
    quiet = ["--quiet"] if module != "train" else []
    return subprocess.run([sys.executable, "-m", f"distcluster.{module}", *argv, *quiet], capture_output=True,
                          text=True, cwd=cwd, timeout=600, env={**os.environ, **(env or {})})


# Commands that need no Ray run in-process (a `python -m` process costs seconds of imports each);
# evaluate by alias and training stay real processes, as a user runs them.
def predict_in_process(*argv: str) -> None:
    assert predict.main([*argv, "--quiet"]) == 0


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("registry")
    images, labels = digits_arrays()
    np.savez(folder / "digits400.npz", x=images[:400], y=labels[:400])
    with mlflow_server(folder) as uri:
        done = cli("train", "--config", "digits-imc-swav", "--workers", "0", "--epochs", "2",
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
                                                 "confusion_matrix", "sizes_against_classes")}
    assert_logged_model(client, version.run_id)


def test_evaluate_by_alias_gives_the_accuracy_of_the_training_summary(registered):
    folder, uri, summary = registered
    done = cli("evaluate", "--model", f"models:/{NAME}@latest", "--data", str(folder / "digits400.npz"),
               "--tracking-uri", uri, "--gallery", str(folder / "gallery.png"), cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # stdout is the JSON alone
    assert result["acc"] == pytest.approx(summary["metrics"]["acc"], abs=1e-9)
    assert result["nmi"] == pytest.approx(summary["metrics"]["nmi"], abs=1e-9)
    assert (result["num_samples"], result["clusters"]) == (400, 10)
    assert Image.open(folder / "gallery.png").size[0] > 100


def test_evaluate_prints_its_json_alone_when_it_prepares_a_folder_first(registered, tmp_path, capsys):
    """A script reads evaluate's stdout as JSON: the status of preparing a folder goes to stderr
    (and with --quiet nowhere)."""
    folder, _, _ = registered
    images, labels = digits_arrays()
    for i in range(40):
        (tmp_path / "digits" / str(labels[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i, ..., 0]).save(tmp_path / "digits" / str(labels[i]) / f"{i}.png")
    assert evaluate.main(["--model", str(folder / "out"), "--data", str(tmp_path / "digits")]) == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out)
    assert (result["num_samples"], result["clusters"]) == (40, 10) and 0 <= result["acc"] <= 1
    assert printed.err.startswith(f"preparing {tmp_path / 'digits'} into "), printed.err
    Image.fromarray(images[40, ..., 0]).save(tmp_path / "digits" / str(labels[40]) / "40.png")  # again
    assert evaluate.main(["--model", str(folder / "out"), "--data", str(tmp_path / "digits"), "--quiet"]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["num_samples"] == 41 and printed.err == ""


def test_predict_on_new_jpegs_gives_one_row_per_image_and_one_file_alone_the_same(registered, tmp_path):
    folder, uri, _ = registered
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(23):  # RGB 20x20: the 1-channel 8x8 model gets them converted and resized
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(photos / f"p{i:02d}.jpg")
    # what the model itself says of these pixels, decoded here: predict must write exactly that
    pixels = np.stack([np.asarray(Image.open(photos / f"p{i:02d}.jpg").convert("RGB")) for i in range(23)])
    expected = assignment_table(load_model(folder / "out"), pixels)
    for suffix in ("csv", "PARQUET"):  # the suffix in any case
        out = tmp_path / f"clusters.{suffix}"
        predict_in_process("--model", f"models:/{NAME}/1", "--data", str(photos), "--out", str(out),
                             "--tracking-uri", uri)
        table = pd.read_csv(out) if suffix == "csv" else pd.read_parquet(out)
        assert list(table.columns) == ["index", "path", "cluster", "confidence"]
        assert table["index"].tolist() == list(range(23))
        assert [Path(p).name for p in table["path"]] == [f"p{i:02d}.jpg" for i in range(23)]
        assert table["cluster"].tolist() == expected["cluster"].tolist()
        assert np.allclose(table["confidence"], expected["confidence"], atol=1e-6)
    alone = tmp_path / "alone.csv"  # one image file: the same answer as in its folder
    predict_in_process("--model", f"models:/{NAME}/1", "--data", str(photos / "p05.jpg"), "--out",
                         str(alone), "--tracking-uri", uri)
    row = pd.read_csv(alone)
    assert row["path"].tolist() == [str(photos / "p05.jpg")] and row["cluster"][0] == table["cluster"][5]
    assert row["confidence"][0] == pytest.approx(table["confidence"][5], rel=1e-4)


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_that_would_run_code_is_refused_and_the_code_never_runs(registered, tmp_path, capsys):
    folder, _, _ = registered
    model = tmp_path / "model"  # an older version's layout: weights.pt + config.json
    model.mkdir()
    shutil.copy(folder / "out" / "model" / MODEL_FILES / "config.json", model)
    payload = _RunsCode()
    payload.marker = str(tmp_path / "pwned")
    (model / "weights.pt").write_bytes(pickle.dumps({"model": payload}))
    argv = ["--model", str(model), "--data", "digits", "--out", str(tmp_path / "p.csv"), "--quiet"]
    assert "refused to load" in refused(predict, argv, capsys)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("case, needle", [
    ("unknown-model", "not found"),
    ("unknown-alias", "cannot load models:/digits-e2e@champion"),
    ("closed-registry", "cannot reach MLflow"),
    ("unlabelled", "has no labels"),
    ("missing-out-folder", "does not exist"),
    ("bad-out-suffix", "must end in .csv or .parquet"),
    ("missing-local-model", "model not found"),
    ("a-file-as-model", "is a file: name the folder that holds it"),
    ("mistyped-store", "no MLflow database at"),
    ("mismatched-model", "model config and weights do not match"),
])
def test_bad_input_exits_2_with_one_line(registered, tmp_path, case, needle, capsys, monkeypatch):
    folder, uri, _ = registered
    if case == "unlabelled":  # refused before any image is assigned (a large folder takes minutes)
        monkeypatch.setattr("distcluster.commands.evaluate.assign_all",
                            lambda *_: pytest.fail("assigned images before refusing"))
    photos = tmp_path / "flat"
    photos.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photos / "a.png")
    closed = f"http://127.0.0.1:{free_port()}"
    mismatched = tmp_path / "mismatched"
    shutil.copytree(folder / "out" / "model", mismatched)
    meta = json.loads((mismatched / MODEL_FILES / "config.json").read_text())
    meta["config"]["clusters"] = 20  # heads of 10 in the weights
    (mismatched / MODEL_FILES / "config.json").write_text(json.dumps(meta))
    command, argv = {
        "unknown-model": ("evaluate", ["--model", "models:/no-such-model@latest", "--tracking-uri", uri]),
        "unknown-alias": ("evaluate", ["--model", f"models:/{NAME}@champion", "--tracking-uri", uri]),
        "closed-registry": ("evaluate", ["--model", f"models:/{NAME}@latest", "--tracking-uri", closed]),
        "unlabelled": ("evaluate", ["--model", str(folder / "out"), "--data", str(photos)]),
        "missing-out-folder": ("predict", ["--model", str(folder / "out"),
                                           "--out", str(tmp_path / "no/x.csv")]),
        "bad-out-suffix": ("predict", ["--model", str(folder / "out"), "--out", str(tmp_path / "x.txt")]),
        "missing-local-model": ("evaluate", ["--model", str(tmp_path / "nothing")]),
        "a-file-as-model": ("evaluate", ["--model", str(folder / "out" / "checkpoint" / "checkpoint.pt")]),
        "mistyped-store": ("evaluate", ["--model", f"models:/{NAME}@latest", "--tracking-uri",
                                        f"sqlite:///{tmp_path}/typo.db"]),
        "mismatched-model": ("evaluate", ["--model", str(mismatched)]),
    }[case]
    if "--data" not in argv:
        argv += ["--data", "digits"]
    assert needle in refused({"evaluate": evaluate, "predict": predict}[command], [*argv, "--quiet"], capsys)
    assert not (tmp_path / "typo.db").exists()


ALIAS = "served"  # set by the tests below (the error cases above need champion unset)


def predicted(folder: Path, uri: str, out: Path, *extra: str, ray_env: dict[str, str] | None = None
              ) -> pd.DataFrame:
    """distcluster.predict's rows for the 400 digits, with the model of alias ALIAS; in a process
    of its own joining the Ray cluster whose environment `ray_env` is, else in-process."""
    MlflowClient(uri, registry_uri=uri).set_registered_model_alias(NAME, ALIAS, "1")
    argv = ["--model", f"models:/{NAME}@{ALIAS}", "--data", str(folder / "digits400.npz"), "--out", str(out),
            "--tracking-uri", uri, *extra]
    if ray_env:
        done = cli("predict", *argv, cwd=out.parent, env=ray_env)
        assert done.returncode == 0, done.stderr[-3000:]
        # the command's line alone, nothing of the actors' or Ray's processes' on either stream (Ray
        # 2.60's driver itself says on stderr that Ray Data's actors have arguments in the object
        # store: a line of its C++ log, which no setting but its level for every Ray process hides)
        assert done.stdout.splitlines() == [f"wrote 400 rows to {out}"], done.stdout[-3000:]
        assert not forwarded_lines(done.stderr), done.stderr[-3000:]
    else:
        predict_in_process(*argv)
    return pd.read_parquet(out) if out.suffix != ".csv" else pd.read_csv(out)


@pytest.mark.parametrize("set_by", ["mlflow", "environment"])
def test_a_models_lookup_leaves_the_callers_mlflow_settings_as_they_were(registered, tmp_path, set_by):
    """predict in a Python session with MLflow settings of its own, set through MLflow or only in
    the environment: afterwards its tracking and registry URIs (in MLflow and in the environment
    its subprocesses inherit) are still its own, and no progress-bar setting appeared."""
    folder, uri, _ = registered
    mine, my_registry = f"sqlite:///{tmp_path}/mine.db", f"sqlite:///{tmp_path}/registry.db"
    with environment_restored(MLFLOW_SETTINGS):  # this test's own settings go afterwards
        for name in MLFLOW_SETTINGS:
            os.environ.pop(name, None)
        if set_by == "mlflow":
            mlflow.set_tracking_uri(mine)
            mlflow.set_registry_uri(my_registry)
        else:
            os.environ.update(MLFLOW_TRACKING_URI=mine, MLFLOW_REGISTRY_URI=my_registry)
        try:
            predicted(folder, uri, tmp_path / "rows.csv")
            assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (mine, my_registry)
            environment = os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_REGISTRY_URI"]
            assert environment == (mine, my_registry)
            assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)


PYFUNC_SESSION = """
import json, sys
import mlflow, numpy as np
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
table = model.predict(np.load(sys.argv[3])["x"])
print(json.dumps({"columns": list(table.columns), "cluster": table["cluster"].tolist(),
                  "confidence": table["confidence"].tolist()}))
"""


def test_the_registered_pyfunc_model_in_a_plain_python_session_gives_predicts_clusters(registered, tmp_path):
    folder, uri, _ = registered
    expected = predicted(folder, uri, tmp_path / "rows.csv")
    done = subprocess.run([sys.executable, "-c", PYFUNC_SESSION, uri, f"models:/{NAME}@{ALIAS}",
                           str(folder / "digits400.npz")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["columns"] == ["cluster", "confidence", *[f"p{k}" for k in range(10)]]
    assert result["cluster"] == expected["cluster"].tolist()
    assert result["confidence"] == pytest.approx(expected["confidence"].tolist(), abs=1e-5)


def test_mlflow_models_serve_answers_invocations_with_predicts_clusters(registered, tmp_path):
    folder, uri, _ = registered
    expected = predicted(folder, uri, tmp_path / "rows.csv")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@{ALIAS}",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        # as in a shell with the venv activated: the server runs `uvicorn` from PATH
        env={**os.environ, "MLFLOW_TRACKING_URI": uri,
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        cwd=tmp_path, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/ping"), timeout=300, what="mlflow models serve")
        images = np.load(folder / "digits400.npz")["x"][:64]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": images.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            rows = json.loads(response.read())["predictions"]
    finally:
        stop_server(server)
    assert [row["cluster"] for row in rows] == expected["cluster"][:64].tolist()
    expected_confidence = expected["confidence"][:64].tolist()
    assert [row["confidence"] for row in rows] == pytest.approx(expected_confidence, abs=1e-5)
    for row in rows:  # the K probabilities come back too, the cluster's the largest
        probs = [row[f"p{k}"] for k in range(10)]
        assert sum(probs) == pytest.approx(1, abs=1e-5) and max(probs) == row["confidence"]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_predict_on_two_ray_data_actors_writes_exactly_the_single_process_rows(registered, tmp_path,
                                                                             ray_cluster):
    folder, uri, _ = registered
    single = predicted(folder, uri, tmp_path / "single.csv", "--batch-size", "64")
    # The actors' rows come back to the driver, which writes them as it writes any rows: here as
    # parquet shards (the CSV writer is the single process's).
    actors = predicted(folder, uri, tmp_path / "shards", "--workers", "2", "--batch-size", "64",
                       ray_env=ray_cluster.env)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["part-00000.parquet"]
    assert actors["index"].tolist() == single["index"].tolist() == list(range(400))
    assert actors["cluster"].tolist() == single["cluster"].tolist()
    assert actors["confidence"].tolist() == pytest.approx(single["confidence"].tolist(), abs=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_predict_actors_asking_for_a_gpu_the_cluster_lacks_exit_2_with_one_line(registered, tmp_path,
                                                                                ray_cluster):
    folder, uri, _ = registered
    MlflowClient(uri).set_registered_model_alias(NAME, ALIAS, "1")
    done = cli("predict", "--model", f"models:/{NAME}@{ALIAS}", "--data", str(folder / "digits400.npz"),
               "--out", str(tmp_path / "p.csv"), "--tracking-uri", uri, "--workers", "1", "--gpu",
               cwd=tmp_path, env=ray_cluster.env)  # unchecked, the actors would wait for a GPU for ever
    err = done.stderr.strip().splitlines()
    expected = "distcluster.predict: error: --gpu: the Ray cluster has no GPU for the predict actors"
    assert done.returncode == 2 and err == [expected], done.stderr[-2000:]
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("tamper, needle", [
    ("weights-byte", "changed after export"),
    ("weights-header", "unreadable model weights"),
])  # a tampered config.json: the mismatched-model case above
def test_a_tampered_model_folder_is_refused_with_exit_2(registered, tmp_path, tamper, needle, capsys):
    folder, _, _ = registered
    model = tmp_path / "model"
    shutil.copytree(folder / "out" / "model", model)
    files = model / MODEL_FILES
    weights, config = files / "weights.safetensors", files / "config.json"
    meta = json.loads(config.read_text())
    if tamper == "weights-byte":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # one weight changed
        weights.write_bytes(bytes(data))
    else:  # a header length that lies, with config.json's hash made to match it
        weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])
        meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    config.write_text(json.dumps(meta))
    argv = ["--model", str(model), "--data", "digits", "--out", str(tmp_path / "p.csv"), "--quiet"]
    assert needle in refused(predict, argv, capsys)
    assert not (tmp_path / "p.csv").exists()
