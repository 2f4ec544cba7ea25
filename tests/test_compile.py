"""torch.compile failures are visible: fatal when the run asked for compile, said once and run
eagerly under auto; never a process-wide suppression (issue 30, item 5). The eager backend keeps
these fast: a graph break fails in Dynamo's tracing, before any backend runs."""

import pytest
import torch
from torch import nn

from distcluster import config
from distcluster.common.errors import RunFailed
from distcluster.core.networks import ModelConfig, build_backbone
from distcluster.engine.build import WorkerContext, build_training_state, compile_backbone


class BreaksTheGraph(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum().item() > 0:  # a branch on a value: Dynamo cannot keep one graph
            return x * 2
        return x - 1


def test_a_graph_break_stops_a_run_that_asked_for_compile():
    module = BreaksTheGraph()
    compile_backbone(module, required=True, backend="eager")
    with pytest.raises(RunFailed, match="torch.compile failed on the backbone .*data-dependent"):
        module(torch.ones(3))


def test_under_auto_a_compile_failure_is_said_once_and_the_module_runs_eagerly():
    module, warnings = BreaksTheGraph(), []
    compile_backbone(module, required=False, backend="eager", warn=warnings.append)
    x = torch.ones(3)
    assert torch.equal(module(x), x * 2) and torch.equal(module(-x), -x - 1)
    assert len(warnings) == 1 and "runs eagerly" in warnings[0] and "data-dependent" in warnings[0]


def test_a_backbone_that_compiles_gives_the_eager_result_and_keeps_its_state_dict_keys():
    torch._dynamo.reset()
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(backbone="small_cnn", width=4), 1).eval()
    keys, x = list(backbone.state_dict()), torch.randn(2, 1, 8, 8)
    eager = backbone(x)
    compiled_frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compile_backbone(backbone, required=True, backend="eager")
    torch.testing.assert_close(backbone(x), eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_frames + 1
    assert list(backbone.state_dict()) == keys


def test_compile_sets_no_process_wide_error_suppression():
    cfg = config.from_dict({**config.load_recipe("digits-imc-swav"), "speed": {"compile": True}})
    build_training_state(cfg, 1, WorkerContext())
    assert torch._dynamo.config.suppress_errors is False
