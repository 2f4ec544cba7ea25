"""FFCV loading on real Ray Train workers: disjoint shards whose union is the data set,
and a short 2-worker training run from a .beton made from CIFAR-10 JPEGs."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from distcluster.commands.prepare import main as prepare_main

pytestmark = pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train-jpg.zip"
COUNT, GLOBAL_BATCH, EPOCHS = 600, 100, 2


def _record_shards(config: dict) -> None:
    """Ray worker: decode the index written into each image's pixels, per epoch."""
    import ray.train

    from distcluster.data.ffcv_io import BetonSource

    rank = ray.train.get_context().get_world_rank()
    source = BetonSource(Path(config["beton"]))
    for epoch in range(EPOCHS):
        ids = [int(img[0, 0, 0]) + 256 * int(img[1, 0, 0])
               for batch in source.epoch_batches(epoch, GLOBAL_BATCH, 2, rank, seed=5) for img in batch]
        Path(config["out"], f"rank{rank}-epoch{epoch}.json").write_text(json.dumps(ids))


@pytest.fixture
def local_ray():
    import ray
    from ray import cloudpickle

    from distcluster.cluster.ray_train import init_ray

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/
    had_temp_dir = "RAY_TMPDIR" in os.environ
    init_ray()
    yield
    ray.shutdown()
    if not had_temp_dir:  # init_ray chose this instance's folder: later processes must not inherit it
        os.environ.pop("RAY_TMPDIR")


def test_each_rank_reads_a_disjoint_shard_and_together_they_cover_the_data(tmp_path, local_ray):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    x = np.zeros((COUNT, 4, 4, 3), np.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(COUNT) % 256, np.arange(COUNT) // 256
    np.savez(tmp_path / "ids.npz", x=x)
    assert prepare_main([str(tmp_path / "ids.npz"), "--out", str(tmp_path / "ids.beton"), "--quiet",
                         "--workers", "1"]) == 0
    config = {"beton": str(tmp_path / "ids.beton"), "out": str(tmp_path)}
    TorchTrainer(_record_shards, train_loop_config=config,
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"))).fit()
    for epoch in range(EPOCHS):
        shards = [json.loads((tmp_path / f"rank{r}-epoch{epoch}.json").read_text()) for r in range(2)]
        assert len(shards[0]) == len(shards[1]) == COUNT // 2
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(COUNT))
    first = json.loads((tmp_path / "rank0-epoch0.json").read_text())
    second = json.loads((tmp_path / "rank0-epoch1.json").read_text())
    assert first != second  # a new order every epoch


@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason="needs ../shared/data/cifar10-train-jpg.zip")
def test_two_worker_training_from_a_cifar10_beton(tmp_path, ray_cluster):
    with zipfile.ZipFile(SHARED_CIFAR) as shared, zipfile.ZipFile(tmp_path / "c.zip", "w") as out:
        names = sorted(n for n in shared.namelist() if n.endswith(".jpg"))
        for name in names[::200]:  # 250 images, all ten classes
            out.writestr(name, shared.read(name))
    assert prepare_main([str(tmp_path / "c.zip"), "--out", str(tmp_path / "c.beton"), "--quiet"]) == 0
    # a path relative to the command's folder, which Ray's workers do not share
    argv = [sys.executable, "-m", "distcluster.train", "--data", "c.beton", "--workers", "2",
            "--epochs", "1", "--batch-size", "64", "--set", "model.backbone=small_cnn",
            "--set", "imc_swav.prototypes=30", "--output", str(tmp_path / "out"),
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, **ray_cluster.env})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["num_samples"] == 250 and summary["epochs"] == 1 and summary["workers"] == 2
    # 1 epoch on 250 photos shows the plumbing (a .beton read by 2 workers), not learning: that
    # is asserted against chance in test_train_e2e and against k-means in test_core.
    assert set(summary["metrics"]) == {"acc", "nmi", "ari"}
