"""Paper recipes run, and the fast-step switches change speed, not results."""

import itertools
import re
from importlib import resources

import pytest
import torch
from recorder import Recorder

from distcluster import config
from distcluster.common.errors import ConfigError, TrainingDiverged
from distcluster.data.arrays import ArraySource
from distcluster.engine.build import WorkerContext, build_training_state
from distcluster.engine.loop import train_loop
from distcluster.engine.step import (
    NonFiniteGuard,
    backward_spreading_non_finite,
    gradients_finite,
    train_step,
)

PAPER_RECIPES = {"cifar10-imc-swav": 32, "cifar100-20-imc-swav": 32, "stl10-imc-swav": 96,
                 "cifar10-iic": 32, "cifar10-crlc": 32, "cifar10-imc-swav-fast": 32}
PLAIN = {"channels_last": False, "compile": False, "fused_optimizer": False, "check_every": 1}


def random_images(count: int, size: int, channels: int = 3, labels: bool = True) -> ArraySource:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, channels, size, size), generator=gen, dtype=torch.uint8)
    return ArraySource(images, torch.arange(count) % 2 if labels else None, "random")


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES))
def test_paper_recipe_validates_and_trains_one_step_at_its_input_size(name):
    values = config.load_recipe(name)
    config.from_dict(values).validate(PAPER_RECIPES[name])
    cfg = config.from_dict({**values, "gpu": False, "workers": 0, "epochs": 1, "batch_size": 4})
    recorder = Recorder()
    train_loop(cfg, random_images(4, PAPER_RECIPES[name]), WorkerContext(), recorder, log=lambda s: None)
    (metrics,) = recorder.epochs
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and metrics["train/skipped_steps"] == 0
    assert 0 <= metrics["eval/view_mi"] <= 1


def test_every_packaged_recipe_states_the_papers_numbers_or_its_target():
    """Each recipe's header says what it reaches: an ACC between 0 and 1 (the paper's, a target, or
    what was measured), and it still builds the config it documents."""
    for name in config.recipe_names():
        text = (resources.files("distcluster") / "recipes" / f"{name}.yaml").read_text()
        header = "\n".join(itertools.takewhile(lambda line: line.startswith("#"), text.splitlines()))
        accuracies = [float(v) for v in re.findall(r"ACC\D{0,12}(0?\.\d+|1\.0)", header)]
        assert accuracies and all(0 < acc <= 1 for acc in accuracies), (name, header)
        config.from_dict(config.load_recipe(name)).validate()


def _losses(recipe: str, speed: dict, steps: int = 3, poisoned: frozenset = frozenset()) -> list[float]:
    """The loss of `steps` steps on fixed crops, from the same initial weights, in fp32."""
    cfg = config.from_dict({**config.load_recipe(recipe), "precision": "fp32", "speed": speed})
    state = build_training_state(cfg, 1, WorkerContext())
    crops = [torch.randn(g.count * 16, 1, g.size, g.size, generator=torch.Generator().manual_seed(i))
             for i, g in enumerate(cfg.augment.crops)]
    if state.speed.channels_last:
        crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
    losses = []
    for step in range(steps):
        result, finite = train_step(state, crops, 16, inject_nan=step in poisoned)
        losses.append(float(result.loss.detach()) if finite > 0 else float("nan"))
    return losses


@pytest.fixture
def two_threads():
    """The tolerances below were measured at two torch threads. At one (as under `make test`, two
    test processes side by side) the two paths' fp32 convolutions sum in other orders and CRLC's
    third Adam step carries that 0.2% apart."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("recipe", ["digits-imc-swav", "digits-iic", "digits-crlc"])
def test_channels_last_fused_optimizer_and_deferred_checks_give_the_plain_losses(recipe, two_threads):
    fast = {"channels_last": True, "compile": False, "fused_optimizer": True, "check_every": 4}
    plain, quick = _losses(recipe, PLAIN), _losses(recipe, fast)
    assert quick == pytest.approx(plain, rel=1e-4, abs=1e-5)
    assert len(set(plain)) == 3  # the weights moved between steps


@pytest.mark.slow  # torch.compile builds C++ kernels: about a minute on 2 cores
def test_a_compiled_backbone_gives_the_plain_losses():
    compiled = {**PLAIN, "compile": True}
    plain = _losses("digits-imc-swav", PLAIN, 2)
    assert _losses("digits-imc-swav", compiled, 2) == pytest.approx(plain, rel=1e-3, abs=1e-4)


def test_a_skipped_step_on_the_device_leaves_weights_and_optimiser_as_they_were():
    fast = {"channels_last": False, "compile": False, "fused_optimizer": True, "check_every": 8}
    # Step 1 poisoned: step 2 then sees the weights after step 0, exactly as if step 1 never was.
    skipped = _losses("digits-crlc", fast, 3, poisoned=frozenset({1}))
    without = _losses("digits-crlc", fast, 2)
    assert skipped[1] != skipped[1]  # NaN: the poisoned step
    assert skipped[2] == pytest.approx(without[1], rel=1e-6)


@pytest.mark.parametrize("constant, finite", [(1.0, 1.0), (float("inf"), 0.0), (float("nan"), 0.0)])
def test_a_non_finite_loss_makes_its_gradients_non_finite_even_where_they_would_not_be(constant, finite):
    model = torch.nn.Linear(3, 2)
    loss = model(torch.ones(1, 3)).sum() + constant  # d loss / d weights is finite either way
    backward_spreading_non_finite(loss)
    assert float(gradients_finite(model)) == finite


def test_the_guard_gives_up_after_max_bad_steps_in_a_row_at_its_next_look():
    guard = NonFiniteGuard(max_bad=3, check_every=5, fused=True, device=torch.device("cpu"))
    for finite in (0.0, 0.0, 1.0, 0.0, 0.0):  # never 3 in a row
        guard.count(torch.tensor(finite))
    guard.raise_if_diverged(step=5, epoch=1)
    for finite in (0.0, 1.0):  # 3 in a row across the check, then a good step
        guard.count(torch.tensor(finite))
    with pytest.raises(TrainingDiverged, match="3 consecutive steps .by step 7, epoch 1"):
        guard.raise_if_diverged(step=7, epoch=1)


def test_speed_switches_resolve_auto_per_device_and_refuse_other_values():
    auto = config.SpeedConfig()
    assert auto.resolved(gpu=True) == config.SpeedConfig(True, True, True, 50)
    assert auto.resolved(gpu=False) == config.SpeedConfig(False, False, True, 1)
    assert config.SpeedConfig(compile=True, check_every=7).resolved(gpu=False).compile is True
    with pytest.raises(ConfigError, match="'speed.compile'.*true, false or auto"):
        config.from_dict({"speed": {"compile": "yes"}}).validate()
    with pytest.raises(ConfigError, match="'speed.check_every'"):
        config.from_dict({"speed": {"check_every": -1}}).validate()


def test_auto_precision_is_bf16_only_where_bf16_is_native(monkeypatch):
    """`precision: auto` autocasts to bf16 on GPUs and on CPUs with AVX-512 BF16 or AMX; on other
    CPUs (where torch emulates bf16, 12x slower on an AVX2 machine) it stays fp32."""
    from distcluster.engine import step

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    cfg = config.Config()
    for flags, expected in ((frozenset({"avx2"}), False), (frozenset({"avx2", "avx512_bf16"}), True)):
        monkeypatch.setattr(step, "cpu_flags", lambda flags=flags: flags)
        assert isinstance(step.autocast_for(cfg, cpu), torch.autocast) is expected
        assert step.fast_bf16(gpu)
        assert isinstance(step.autocast_for(config.Config(precision="bf16"), cpu), torch.autocast)
        assert not isinstance(step.autocast_for(config.Config(precision="fp32"), gpu), torch.autocast)
