"""Backbones: the small CNN's stages, the Sobel edge front (`model.sobel`) with known answers, and a
run on it."""

import pytest
import torch
from recorder import Recorder

from distcluster.common.errors import UserError
from distcluster.config import from_dict, load_recipe
from distcluster.core.networks import ModelConfig, OnEdges, SobelEdges, build_backbone
from distcluster.data.arrays import load_source
from distcluster.engine.build import WorkerContext, build_model
from distcluster.engine.loop import train_loop


@pytest.mark.parametrize("stages, side", [(1, 20), (2, 20), (3, 20), (4, 16)])
def test_each_stage_doubles_the_channels_and_halves_the_side(stages, side):
    net = build_backbone(ModelConfig(backbone="small_cnn", width=8, stages=stages), in_channels=3)
    convs = [m for m in net.layers if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8 * 2 ** (i // 2) for i in range(2 * stages)]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.layers) == stages - 1
    features = 4 * convs[-1].out_channels  # the last stage's channels, 2x2 pooled
    assert net.feature_dim == features and net(torch.rand(2, 3, side, side)).shape == (2, features)


@pytest.mark.parametrize("pool", [1, 2, 3])
def test_the_final_pool_gives_pool_squared_times_the_last_channels(pool):
    net = build_backbone(ModelConfig(backbone="small_cnn", width=8, stages=2, pool=pool), in_channels=3)
    images = torch.rand(2, 3, 12, 12)
    assert net.feature_dim == pool * pool * 16 and net(images).shape == (2, pool * pool * 16)
    if pool == 1:  # the global average of the last stage: the 2x2 grid's mean
        grid = build_backbone(ModelConfig(backbone="small_cnn", width=8, stages=2), in_channels=3)
        grid.load_state_dict(net.state_dict())
        net.eval(), grid.eval()
        torch.testing.assert_close(net(images), grid(images).view(2, 16, 4).mean(-1))


@pytest.mark.parametrize("pool", [0, 5, 1.5])
def test_an_impossible_pool_is_a_user_error(pool):
    with pytest.raises(UserError, match="model.pool"):
        ModelConfig(backbone="small_cnn", pool=pool).validate()


def test_the_default_keeps_the_layout_models_were_saved_with():
    # Models logged before `model.stages` existed hold these keys: they still load.
    keys = list(build_backbone(ModelConfig(backbone="small_cnn", width=8), 3).state_dict())
    assert [k for k in keys if k.endswith(".weight")] == [
        "layers.0.weight", "layers.1.weight", "layers.3.weight", "layers.4.weight",
        "layers.7.weight", "layers.8.weight", "layers.10.weight", "layers.11.weight"]


@pytest.mark.parametrize("stages", [0, 5, 2.5, True])
def test_an_impossible_stage_count_is_a_user_error(stages):
    with pytest.raises(UserError, match="model.stages"):
        ModelConfig(backbone="small_cnn", stages=stages).validate()


def test_more_stages_than_the_smallest_crop_can_halve_is_a_user_error():
    values = load_recipe("digits-crlc")  # 8 px crops: 3 stages (2 halvings to 2x2), not 4
    from_dict({**values, "model": {**values["model"], "stages": 3}}).validate()
    with pytest.raises(UserError, match="'model.stages'.*at least 16 px and the smallest is 8: lower"):
        from_dict({**values, "model": {**values["model"], "stages": 4}}).validate()
    with pytest.raises(UserError, match="'model.stages'.*pool 3 need crops of at least 12 px"):
        from_dict({**values, "model": {**values["model"], "stages": 3, "pool": 3}}).validate()


def test_sobel_sees_a_vertical_edge_in_x_only_and_nothing_in_flat_colour():
    step = torch.zeros(1, 3, 6, 6)
    step[..., 3:] = 3.0  # every channel steps from 0 to 3 between columns 2 and 3: a grey step of 3
    edges = SobelEdges()(step)
    assert edges.shape == (1, 2, 6, 6)
    inner = edges[0, :, 1:-1, 1:-1]  # away from the zero padding
    # dx = left - right, weighted 1, 2, 1 down the 3 rows: -3 * 4 = -12 on both sides of the step
    assert torch.equal(inner[0], torch.tensor([[0.0, -12.0, -12.0, 0.0]] * 4))
    assert torch.equal(inner[1], torch.zeros(4, 4))
    flat = torch.rand(1, 3, 1, 1).expand(1, 3, 6, 6)  # one colour, whatever it is
    assert torch.allclose(SobelEdges()(flat)[0, :, 1:-1, 1:-1], torch.zeros(2, 4, 4), atol=1e-6)


def test_the_edge_front_is_fixed_and_feeds_the_backbone_two_channels():
    net = build_backbone(ModelConfig(backbone="small_cnn", width=8, sobel=True), in_channels=3)
    assert net.backbone.layers[0].in_channels == 2 and net.feature_dim == 64
    assert "edges.kernels" in net.state_dict()
    assert all(not name.startswith("edges") for name, _ in net.named_parameters())  # never trained
    assert net(torch.rand(4, 3, 16, 16)).shape == (4, 64)


def test_a_run_on_edges_trains_and_evaluates():
    values = {**load_recipe("digits-crlc"), "epochs": 2, "batch_size": 128, "precision": "fp32",
              "model": {**load_recipe("digits-crlc")["model"], "sobel": True}}
    assert isinstance(build_model(from_dict(values), 1).backbone, OnEdges)  # the config reaches the model
    recorder = Recorder()
    train_loop(from_dict(values), load_source("digits", 256), WorkerContext(), recorder, log=lambda s: None)
    last = recorder.epochs[-1]
    assert torch.isfinite(torch.tensor(last["train/loss"])) and 0 < last["eval/acc"] <= 1
