"""The per-layer floor (``min_layer_fraction``): which channels it keeps, what it does to the term
and the cost, and that a model rebuilt with it computes what the killed original computes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import morphnet
from morphnet.seeds import create_seed

pytestmark = pytest.mark.usefixtures("one_thread")


def resnet14():
    torch.manual_seed(0)
    return create_seed("resnet14", num_classes=10, in_channels=3), torch.randn(2, 3, 16, 16)


def batchnorms(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def test_every_scale_zero_leaves_exactly_the_floor_and_the_cost_of_that_structure():
    model, x = resnet14()
    widths = morphnet.StructureExporter(morphnet.GammaFlopsRegularizer(model, x[:1], gamma_threshold=0.0))
    widths = widths.get_alive_counts()
    with torch.no_grad():
        for bn in batchnorms(model).values():
            bn.weight.zero_()
    reg = morphnet.GammaFlopsRegularizer(model, x[:1], gamma_threshold=0.01, min_layer_fraction=0.25)
    counts = morphnet.StructureExporter(reg).get_alive_counts()
    assert counts == {name: math.ceil(0.25 * w) for name, w in widths.items()}
    slim = morphnet.apply_structure(model, counts, x[:1])
    assert reg.get_cost().item() == pytest.approx(morphnet.compute_cost(slim, x[:1]), rel=1e-6)
    assert reg.get_regularization_term().item() == 0.0  # every scale is zero: nothing left to push


def test_the_floor_keeps_the_largest_scales_and_exempts_them_from_the_penalty():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.001, 0.3, 0.0, 0.002, 0.2, 0.0, 0.005, 0.004]))
    plain = morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=0.01)
    floored = morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=0.01, min_layer_fraction=0.5)
    assert morphnet.StructureExporter(plain).get_alive_counts() == {"0": 2}
    assert morphnet.StructureExporter(floored).get_alive_counts() == {"0": 4}
    floored.get_regularization_term().backward()
    grad = model[1].weight.grad
    # kept: 0.3, 0.2 (alive anyway), 0.005 and 0.004 (the floor): no push on them; the rest is pushed
    assert grad[[1, 4, 6, 7]].abs().sum() == 0
    assert (grad[[0, 3]] > 0).all()


def test_a_residual_group_counts_once_for_every_layer_it_spans():
    """Stage 1 of ResNet-14 is one channel group written by the stem and both blocks: one floor."""
    model, x = resnet14()
    with torch.no_grad():
        for bn in batchnorms(model).values():
            bn.weight.fill_(1e-4)
        batchnorms(model)["bn1"].weight[:5] = 1.0  # the stem's BN writes the stage-1 stream
    reg = morphnet.GammaFlopsRegularizer(model, x[:1], gamma_threshold=0.01, min_layer_fraction=0.25)
    counts = morphnet.StructureExporter(reg).get_alive_counts()
    assert counts["conv1"] == counts["layer1.0.conv2"] == counts["layer1.1.conv2"] == 5  # 5 alive >= 4
    assert counts["layer1.0.conv1"] == 4 and counts["layer3.1.conv1"] == 16


def test_rebuild_with_the_floor_is_exact():
    """The floor only keeps channels: a model whose BatchNorms are three-quarters dead, rebuilt with
    the floor's structure and kept weights, computes what the killed original computes."""
    model, x = resnet14()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in batchnorms(model).values():
            dead = torch.randperm(bn.num_features, generator=generator)[: 3 * bn.num_features // 4]
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.1, 0.1)
            bn.weight[dead] = 0.0
            bn.bias[dead] = 0.0
            bn.running_mean.uniform_(-0.2, 0.2)
    model.eval()
    reg = morphnet.GammaFlopsRegularizer(model, x[:1], gamma_threshold=0.01, min_layer_fraction=0.5)
    slim = morphnet.apply_structure(model, reg, x[:1], keep_weights=True).eval()
    counts = morphnet.StructureExporter(reg).get_alive_counts()
    assert counts["layer1.0.conv1"] == 8  # half of 16 kept although three quarters are dead
    with torch.no_grad():
        assert torch.allclose(slim(x), model(x), rtol=1e-5, atol=1e-5)


def test_off_by_default_and_bad_values_are_refused():
    model, x = resnet14()
    default = morphnet.GammaFlopsRegularizer(model, x[:1], gamma_threshold=0.01)
    assert default.min_layer_fraction == 0.0 and default.floor is None
    for bad in (-0.1, 1.5, "0.25", True):
        with pytest.raises(ValueError, match="min_layer_fraction"):
            morphnet.GammaFlopsRegularizer(model, x[:1], gamma_threshold=0.01, min_layer_fraction=bad)


def test_runs_default_to_the_floor_and_runs_saved_before_it_resume_without():
    from morphnet.pipeline.config import RunConfig

    assert RunConfig().min_layer_fraction == 0.25
    saved = {k: v for k, v in RunConfig(steps=7).to_dict().items() if k != "min_layer_fraction"}
    assert RunConfig.from_saved(saved).min_layer_fraction == 0.0  # what a run saved before the floor did
    assert RunConfig.from_saved(saved).steps == 7
    assert RunConfig.from_saved(RunConfig(min_layer_fraction=0.5).to_dict()).min_layer_fraction == 0.5
    with pytest.raises(ValueError, match="--min-layer-fraction"):
        RunConfig(min_layer_fraction=1.5)


@pytest.mark.parametrize("fraction", [0.25, 0.0])
def test_minimum_cost_is_the_cost_of_the_smallest_structure_the_rebuild_builds(fraction):
    """Every layer at its floor, or at one channel without one: the cost of that slim model."""
    model, x = resnet14()
    reg = morphnet.GammaFlopsRegularizer(model, x[:1], gamma_threshold=0.01, min_layer_fraction=fraction)
    widths = morphnet.StructureExporter(reg).get_alive_counts()
    smallest = {name: max(1, math.ceil(fraction * w)) for name, w in widths.items()}
    slim = morphnet.apply_structure(model, smallest, x[:1])
    assert reg.minimum_cost() == pytest.approx(morphnet.compute_cost(slim, x[:1]), rel=1e-9)
    assert 0 < reg.minimum_cost() < reg.get_cost().item()
