"""The pure core imports and trains with ray, mlflow and ffcv unavailable, and without importing
scikit-learn."""

import subprocess
import sys

import torch
from recorder import Recorder

from distcluster.build import WorkerContext
from distcluster.config import from_dict, load_recipe
from distcluster.data import load_source
from distcluster.loop import train_loop

BLOCKED_CORE_RUN = """
import sys
for name in ("ray", "mlflow", "ffcv"):
    sys.modules[name] = None  # any import of them now raises ImportError
import distcluster.augment, distcluster.checkpoint, distcluster.config, distcluster.data
import distcluster.images, distcluster.inference, distcluster.plots
import distcluster.distributed, distcluster.loop, distcluster.metrics, distcluster.models
import distcluster.objectives, distcluster.search_space, distcluster.build, distcluster.step
import distcluster.evaluation
from distcluster.config import from_dict, load_recipe
from distcluster.data import load_source
from distcluster.build import WorkerContext
from distcluster.loop import train_loop

class Quiet:
    def epoch_end(self, report): pass

cfg = from_dict({**load_recipe("digits-imc-swav"), "epochs": 1, "max_samples": 300,
                 "batch_size": 100})
train_loop(cfg, load_source("digits", 300), WorkerContext(), Quiet(), log=lambda s: None)
# nor scikit-learn, which a run on the digits would import for nothing but data and scores
assert "sklearn" not in sys.modules, "the core imported scikit-learn"
print("core ok")
"""


def test_core_runs_without_ray_mlflow_ffcv():
    done = subprocess.run([sys.executable, "-c", BLOCKED_CORE_RUN], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "core ok" in done.stdout


def test_every_objective_lowers_its_loss_on_digits():
    for objective in ("iic", "imc_swav", "crlc"):
        torch.manual_seed(0)
        values = {**load_recipe(f"digits-{objective.replace('_', '-')}"), "epochs": 4,
                  "batch_size": 128, "eval_every": 0, "precision": "fp32"}
        cfg = from_dict(values)
        recorder = Recorder()
        train_loop(cfg, load_source("digits", 768), WorkerContext(), recorder, log=lambda s: None)
        losses = [m["train/loss"] for m in recorder.epochs]
        assert losses[-1] < losses[0], (objective, losses)


def test_checkpoints_every_n_epochs_and_always_at_the_end():
    values = {**load_recipe("digits-iic"), "epochs": 5, "batch_size": 128, "eval_every": 0,
              "checkpoint_every": 2}
    recorder = Recorder()
    train_loop(from_dict(values), load_source("digits", 256), WorkerContext(), recorder, log=lambda s: None)
    assert recorder.saved == [False, 2, False, 4, 5]


def test_short_default_run_beats_kmeans_on_raw_pixels():
    from sklearn.cluster import KMeans

    from distcluster.metrics import cluster_scores

    source = load_source("digits")
    pixels = source.images.flatten(1).float().numpy()
    kmeans = cluster_scores(source.labels.numpy(),
                            KMeans(10, n_init=10, random_state=0).fit_predict(pixels))
    cfg = from_dict({**load_recipe("digits-imc-swav"), "epochs": 15, "eval_every": 0})  # the last only
    recorder = Recorder()
    train_loop(cfg, source, WorkerContext(), recorder, log=lambda s: None)
    final = recorder.epochs[-1]
    assert final["eval/acc"] > kmeans["acc"] and final["eval/nmi"] > kmeans["nmi"], (final, kmeans)
