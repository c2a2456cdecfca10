"""Capture runs the model on meta-device stand-ins (no arithmetic) and falls back to a real run
only when the model cannot run on meta tensors. Both choices are visible: ``graph.recorded_on``
and a debug line of the ``morphnet.capture.graph`` logger, so a regression that sends every
model down the slow path shows here."""

import logging

import pytest
import torch
import torchvision
from torch import nn

import morphnet
from morphnet.capture.graph import capture_graph
from morphnet.seeds import create_seed
from nets import ConcatNet, counted_flops

LOGGER = "morphnet.capture.graph"


class DataDependent(nn.Module):
    """Takes one of two branches depending on the input's values: meta tensors have no values."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.wide = nn.Conv2d(8, 16, 3, padding=1)
        self.narrow = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        branch = self.wide if x.mean() > 0 else self.narrow
        return branch(torch.relu(self.bn(self.stem(x)))).mean((2, 3))


@pytest.mark.parametrize("name, make, shape", [
    ("resnet18", lambda: torchvision.models.resnet18(), (1, 3, 64, 64)),
    ("mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(), (1, 3, 64, 64)),
    ("gated digits_cnn", lambda: morphnet.add_gates(create_seed("digits_cnn", in_channels=1), torch.randn(2, 1, 8, 8)),
     (1, 1, 8, 8)),
    ("concat net", ConcatNet, (1, 3, 17, 19)),
])
def test_models_that_run_on_meta_tensors_take_the_meta_path(name, make, shape, caplog):
    model = make()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        graph = capture_graph(model, torch.randn(shape))
    assert graph.recorded_on == "meta", name
    assert any("recorded on the meta device" in r.getMessage() for r in caplog.records if r.name == LOGGER)
    assert not any("running it for real" in r.getMessage() for r in caplog.records)


def test_data_dependent_model_falls_back_to_a_real_run_and_says_why(caplog):
    model = DataDependent()
    x = torch.ones(1, 3, 6, 6)
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=0.0)
    assert reg.analysis.graph.recorded_on == "real"
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("DataDependent cannot run on the meta device" in m and "running it for real" in m for m in messages)
    # the real run saw the data: the cost is that of the branch these inputs take, as FlopCounterMode counts it
    assert {call.module for call in reg.analysis.layer_calls} == {"stem", "wide"}
    assert reg.get_cost().item() == counted_flops(model, x) == 2 * 36 * (27 * 8 + 72 * 16)
    other = morphnet.GroupLassoFlopsRegularizer(model, -x, threshold=0.0)
    assert {call.module for call in other.analysis.layer_calls} == {"stem", "narrow"}
    # and left the model as it found it (BatchNorm statistics, training flag)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, stats[key]), key
