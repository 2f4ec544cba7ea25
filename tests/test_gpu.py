"""What only a GPU can show: each test skips without CUDA (CI has none). Run them all,
with the GPU benchmarks, by `benchmarks/gpu_check.sh` on a machine with a GPU."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from distcluster import config
from distcluster.augment import MultiCrop
from distcluster.build import WorkerContext, build_training_state
from distcluster.step import train_step

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
    from distcluster.ffcv_io import BetonSource, write_beton
    from distcluster.images import ArrayCollection

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 16, 16, 3), dtype=np.uint8)
    write_beton(ArrayCollection(images, rng.integers(0, 3, 300), "random", "npz"), tmp_path / "x.beton",
                progress=False)
    source = BetonSource(tmp_path / "x.beton")
    for batch in source.batches(128):
        on_device = batch.pin_memory().to(CUDA, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(on_device.cpu(), batch)


def test_nccl_syncbn_training_run_on_the_gpu(tmp_path):
    """A real `train --gpu` run: one Ray worker on the GPU (NCCL process group, SyncBatchNorm
    conversion, compile and channels-last on by `auto`), scored on the GPU."""
    argv = [sys.executable, "-m", "distcluster.train", "--gpu", "--workers", "1", "--epochs", "3",
            "--output", str(tmp_path / "run"), "--run-name", "gpu-check",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["device"] == "cuda"
    assert summary["metrics"]["acc"] > 0.5  # digits, 3 epochs: far above chance (0.1)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for a 2-process NCCL group")
def test_two_gpu_workers_train(tmp_path):
    argv = [sys.executable, "-m", "distcluster.train", "--gpu", "--workers", "2", "--epochs", "2",
            "--output", str(tmp_path / "run"), "--run-name", "gpu-check-2",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
