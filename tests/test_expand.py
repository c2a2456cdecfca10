"""Uniform expansion, rounding and the width multiplier that meets a cost target."""

import warnings

import pytest
import torch
import torchvision

import morphnet
from nets import ConcatNet, counted_flops, weight_count
from test_rebuild import Block, Grouped

X32 = torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


@pytest.fixture(scope="module")
def resnet_structure(resnet):
    """A learned-looking structure: random gammas, half of them below the threshold."""
    model = torchvision.models.resnet18(num_classes=10)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen))
    reg = morphnet.GammaFlopsRegularizer(model, X32, gamma_threshold=0.5)
    counts = morphnet.StructureExporter(reg).get_alive_counts()
    assert any(v < 0.6 * resnet.get_submodule(k).out_channels for k, v in counts.items())
    return counts


def test_factor_one_without_rounding_is_the_identity(resnet, resnet_structure):
    assert morphnet.expand_structure(resnet, resnet_structure, X32, 1.0) == resnet_structure


def test_expansion_rounds_every_width_and_keeps_residual_layers_equal(resnet, resnet_structure):
    wide = morphnet.expand_structure(resnet, resnet_structure, X32, 1.7, round_to=8)
    assert wide.keys() == resnet_structure.keys()
    assert all(v % 8 == 0 and v > 0 for v in wide.values())
    stage = [wide[k] for k in ("conv1", "layer1.0.conv2", "layer1.1.conv2")]
    assert len(set(stage)) == 1  # one residual group
    assert wide["layer2.0.conv2"] == wide["layer2.0.downsample.0"] == wide["layer2.1.conv2"]
    for k, v in resnet_structure.items():
        assert abs(wide[k] - 1.7 * v) <= 4 + 1e-9 or wide[k] == 8
    slim = morphnet.apply_structure(resnet, wide, X32)
    assert slim.layer4[1].conv1.out_channels == wide["layer4.1.conv1"]


def test_depthwise_and_grouped_units_follow_round_to():
    block = Block(mult=2)
    x = torch.randn(1, 3, 8, 8)
    wide = morphnet.expand_structure(block, {"pw1": 5, "dw": 10}, x, 1.9, round_to=4)
    assert wide == {"pw1": 8, "dw": 16}  # 9.5 input channels -> 8 (a multiple of 4 whose doubled width is too)
    grouped = Grouped()
    x = torch.randn(1, 3, 6, 6)
    # gconv comes in blocks of 16 channels; conv1 (tied across gconv's 4 groups) in blocks of 4
    wide = morphnet.expand_structure(grouped, {"conv1": 8, "gconv": 16}, x, 2.6, round_to=8)
    assert wide == {"conv1": 24, "gconv": 48}
    morphnet.apply_structure(grouped, wide, x)


def test_a_vanished_layer_stays_at_zero_and_others_keep_one_unit():
    model = ConcatNet()
    x = torch.randn(1, 3, 17, 19)
    assert morphnet.expand_structure(model, {"conv1": 0, "conv2": 11}, x, 0.01, round_to=8) == {"conv1": 0, "conv2": 8}


def test_regularizer_structures_expand_by_their_alive_counts():
    model = ConcatNet()
    x = torch.randn(1, 3, 17, 19)
    reg = morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=0.45)
    assert morphnet.expand_structure(model, reg, x, 2.0) == {"conv1": 14, "conv2": 22, "conv3": 20, "conv4": 34}


@pytest.mark.parametrize("resource", ["flops", "size", "latency"])
@pytest.mark.parametrize("round_to", [None, 8])
def test_width_multiplier_meets_the_target_within_one_percent(resnet, resnet_structure, resource, round_to):
    seed_cost = {"flops": lambda m: counted_flops(m, X32), "size": weight_count,
                 "latency": lambda m: morphnet.GammaLatencyRegularizer(
                     m, X32, gamma_threshold=0.0, hardware="V100").get_cost().item()}[resource]
    target = 0.8 * seed_cost(resnet)  # the structure costs less: the multiplier is above 1
    factor, counts = morphnet.find_width_multiplier(resnet, resnet_structure, X32, target, resource=resource,
                                                    hardware="V100", round_to=round_to)
    assert factor > 1
    if round_to:
        assert all(v % round_to == 0 for v in counts.values())
    slim = morphnet.apply_structure(resnet, counts, X32)
    assert abs(seed_cost(slim) - target) <= 0.01 * target


def test_targets_above_the_seed_build_wider_layers(resnet, resnet_structure):
    target = 1.5 * counted_flops(resnet, X32)
    _, counts = morphnet.find_width_multiplier(resnet, resnet_structure, X32, target)
    assert any(v > 512 for k, v in counts.items() if k.startswith("layer4"))
    assert abs(counted_flops(morphnet.apply_structure(resnet, counts, X32), X32) - target) <= 0.01 * target


def test_unreachable_targets_are_clear_errors():
    model = ConcatNet()
    x = torch.randn(1, 3, 17, 19)
    with pytest.raises(ValueError, match="within 1%"):
        morphnet.find_width_multiplier(model, {"conv1": 7}, x, 10.0)
    with pytest.raises(ValueError, match="out of reach"):
        morphnet.find_width_multiplier(model, {}, x, 1e12)
    with pytest.raises(ValueError, match="round_to=8 makes the steps coarse"):
        morphnet.find_width_multiplier(model, {"conv1": 7}, x, 1.2e6, round_to=8)


def test_tolerance_none_takes_the_closest_cost_the_widths_allow():
    model, x = ConcatNet(), torch.randn(1, 3, 17, 19)
    with pytest.raises(ValueError, match="round_to=8"):
        morphnet.find_width_multiplier(model, {"conv1": 7}, x, 1.2e6, round_to=8)
    _, counts = morphnet.find_width_multiplier(model, {"conv1": 7}, x, 1.2e6, round_to=8, tolerance=None)
    got = morphnet.compute_cost(morphnet.apply_structure(model, counts, x), x)
    # no other expansion by one factor (rounded to 8) comes closer to the target
    others = [morphnet.compute_cost(morphnet.apply_structure(
        model, morphnet.expand_structure(model, {"conv1": 7}, x, f / 16, round_to=8), x), x) for f in range(1, 65)]
    assert abs(got - 1.2e6) <= min(abs(c - 1.2e6) for c in others)
    assert abs(got - 1.2e6) > 0.01 * 1.2e6


@pytest.mark.parametrize("call,message", [
    (lambda m, x: morphnet.expand_structure(m, {"conv1": 7}, x, -1.0), "factor must be"),
    (lambda m, x: morphnet.expand_structure(m, {"conv1": 7}, x, 2.0, round_to=0), "round_to must be"),
    (lambda m, x: morphnet.find_width_multiplier(m, {"conv1": 7}, x, 1e6, resource="memory"), "resource must be"),
    (lambda m, x: morphnet.find_width_multiplier(m, {"conv1": 7}, x, 1e6, resource="latency"), "needs hardware"),
    (lambda m, x: morphnet.find_width_multiplier(m, {"conv1": 7}, x, -5.0), "target_cost must be"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call(ConcatNet(), torch.randn(1, 3, 17, 19))


def test_equal_layers_that_round_up_together_step_up_one_at_a_time():
    layers = [torch.nn.Conv2d(3, 16, 3, padding=1)]
    for _ in range(5):
        layers += [torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1)]
    model = torch.nn.Sequential(*layers, torch.nn.ReLU(), torch.nn.Conv2d(16, 2, 1))
    x = torch.randn(1, 3, 8, 8)
    names = [str(i) for i in range(0, 11, 2)]
    # every expansion of {all: 8} with round_to=8 has all widths 8 or all 16; the target lies between
    mixed = dict(zip(names, [16, 16, 16, 8, 8, 8]))
    target = counted_flops(morphnet.apply_structure(model, mixed, x), x)
    factor, counts = morphnet.find_width_multiplier(model, dict.fromkeys(names, 8), x, target, round_to=8)
    assert counts == mixed and 1 < factor <= 2
    assert morphnet.expand_structure(model, dict.fromkeys(names, 8), x, factor, round_to=8) == dict.fromkeys(names, 16)


def test_fit_to_budget_leaves_a_structure_within_tolerance_and_scales_one_outside_it(resnet, resnet_structure):
    """The pipeline's landing: learned widths within 1% are not rescaled for a residual; others
    get the one factor that lands within 1%. ``target`` <= 1 is a fraction of the model's cost."""
    seed = counted_flops(resnet, X32)
    learned = counted_flops(morphnet.apply_structure(resnet, resnet_structure, X32), X32)
    assert morphnet.fit_to_budget(resnet, resnet_structure, X32, 1.005 * learned) == (None, resnet_structure)
    factor, counts = morphnet.fit_to_budget(resnet, resnet_structure, X32, 0.25)
    assert factor < 1 and counts == morphnet.find_width_multiplier(resnet, resnet_structure, X32, 0.25 * seed)[1]
    assert abs(counted_flops(morphnet.apply_structure(resnet, counts, X32), X32) / (0.25 * seed) - 1) <= 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lands within 1%: no warning
        factor, counts = morphnet.fit_to_budget(resnet, resnet_structure, X32, 0.5, round_to=8)
    assert all(v % 8 == 0 for v in counts.values())
    assert abs(counted_flops(morphnet.apply_structure(resnet, counts, X32), X32) / (0.5 * seed) - 1) <= 0.01


def test_fit_to_budget_takes_the_closest_factor_with_a_warning_when_the_steps_are_coarse():
    model, x = ConcatNet(), torch.randn(1, 3, 17, 19)
    with pytest.warns(UserWarning, match=r"fit_to_budget: no width multiplier .* took the closest, x[0-9.]+ \(\+|-"):
        factor, counts = morphnet.fit_to_budget(model, {"conv1": 7}, x, 1.2e6, round_to=8)
    assert counts == morphnet.find_width_multiplier(model, {"conv1": 7}, x, 1.2e6, round_to=8, tolerance=None)[1]
    with pytest.raises(ValueError, match="out of reach"):
        morphnet.fit_to_budget(model, {}, x, 1e12)
    with pytest.raises(ValueError, match="target must be positive"):
        morphnet.fit_to_budget(model, {}, x, 0)
