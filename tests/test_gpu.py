"""What only a GPU can show: each test skips without CUDA (CI has none). Run them all,
with the GPU benchmarks, by `benchmarks/gpu_check.sh` on a machine with a GPU."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from distcluster import config
from distcluster.data.augment import MultiCrop
from distcluster.engine.build import WorkerContext, build_training_state
from distcluster.engine.step import train_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")


def recipe(name: str, **overrides) -> config.Config:
    return config.from_dict(config.merge(config.load_recipe(name), overrides))


def test_augmentation_on_cuda_equals_cpu():
    """The draws come from one CPU generator, so the device only changes rounding."""
    cfg = recipe("cifar10-imc-swav", augment={"blur_p": 0.5, "solarize_p": 0.2})
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    augment = MultiCrop(cfg.augment, [0.5] * 3, [0.25] * 3)
    on_cpu = augment(images, torch.Generator().manual_seed(3))
    on_gpu = augment(images.to(CUDA), torch.Generator().manual_seed(3))
    for cpu_crops, gpu_crops in zip(on_cpu, on_gpu, strict=True):
        torch.testing.assert_close(gpu_crops.cpu(), cpu_crops, atol=2e-3, rtol=1e-3)


def one_step_loss(cfg: config.Config, crops: list[torch.Tensor]) -> float:
    state = build_training_state(cfg, 3, WorkerContext(device=CUDA))
    result, finite = train_step(state, [c.to(CUDA) for c in crops], 64)
    assert float(finite) == 1.0
    return result.loss.item()


@pytest.fixture(scope="module")
def cifar_crops() -> list[torch.Tensor]:
    cfg = recipe("cifar10-imc-swav")
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    return MultiCrop(cfg.augment, [0.5] * 3, [0.25] * 3)(images, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("switch", ["compile", "channels_last", "fused_optimizer"])
def test_each_speed_switch_computes_the_plain_step(cifar_crops, switch):
    plain = {"channels_last": False, "compile": False, "fused_optimizer": False, "check_every": 1}
    base = one_step_loss(recipe("cifar10-imc-swav", precision="fp32", speed=plain), cifar_crops)
    fast = one_step_loss(recipe("cifar10-imc-swav", precision="fp32", speed={**plain, switch: True}),
                         cifar_crops)
    assert fast == pytest.approx(base, rel=1e-3)


def test_bf16_autocast_step_is_close_to_fp32(cifar_crops):
    fp32 = one_step_loss(recipe("cifar10-imc-swav", precision="fp32"), cifar_crops)
    bf16 = one_step_loss(recipe("cifar10-imc-swav", precision="bf16"), cifar_crops)
    assert bf16 == pytest.approx(fp32, rel=3e-2)


def test_beton_batches_reach_device_memory_unchanged(tmp_path):
    from distcluster.data.beton_writer import write_beton
    from distcluster.data.ffcv_io import BetonSource
    from distcluster.data.images import ArrayCollection

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 16, 16, 3), dtype=np.uint8)
    write_beton(ArrayCollection(images, rng.integers(0, 3, 300), "random", "npz"), tmp_path / "x.beton",
                progress=False)
    source = BetonSource(tmp_path / "x.beton")
    for batch in source.batches(128):
        on_device = batch.pin_memory().to(CUDA, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(on_device.cpu(), batch)


def gpu_train_run(tmp_path, workers: int) -> tuple[dict, str]:
    """A real `train --gpu --workers N` run on the digits (15 epochs): its summary and output."""
    argv = [sys.executable, "-m", "distcluster.train", "--gpu", "--workers", str(workers), "--epochs", "15",
            "--output", str(tmp_path / "run"), "--run-name", f"gpu-check-{workers}",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "run" / "summary.json").read_text()), done.stdout + done.stderr


def test_a_train_run_on_one_gpu_worker(tmp_path):
    """One Ray worker on the GPU (compile and channels-last on by `auto`), scored on the GPU, far
    above k-means on the digits' pixels (0.79)."""
    summary, _ = gpu_train_run(tmp_path, 1)
    assert summary["device"] == "cuda" and summary["workers"] == 1
    assert summary["metrics"]["acc"] > 0.79, summary["metrics"]


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2,
                              reason="needs 2 GPUs for a 2-process NCCL group")


@TWO_GPUS
def test_two_nccl_ranks_with_syncbatchnorm_train_as_one_gpu_on_the_global_batch(tmp_path):
    """Three steps on 2 GPUs (NCCL, SyncBatchNorm, half the batch each) give the weights and
    BatchNorm statistics of one GPU on the whole batch."""
    import torch.multiprocessing as mp
    from distributed_cases import gpu_worker, training_case

    mp.spawn(gpu_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = training_case(0, 1, sync_batchnorm=True, device=CUDA)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, expected in single.items():
            torch.testing.assert_close(result[name], expected, atol=1e-4, rtol=1e-3, msg=f"{name} differs")


@TWO_GPUS
def test_two_gpu_workers_train(tmp_path):
    """`train --gpu --workers 2`: both ranks train and the model beats k-means (0.79)."""
    summary, output = gpu_train_run(tmp_path, 2)
    assert summary["workers"] == 2 and summary["device"] == "cuda"
    assert "rank 1 of 2: done" in output
    assert summary["metrics"]["acc"] > 0.79, summary["metrics"]
