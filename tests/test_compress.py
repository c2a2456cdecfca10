"""morphnet.compress: a trained network to a budget in one call, on budget, the input left alone."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphnet
from morphnet.control.landing import LandingController
from morphnet.pipeline.training import count_flops


class SmallNet(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)) + x)
        return self.fc(x.mean((2, 3)))


def _data(n_batches: int = 4, size: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, size, size, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n_batches)]


def _trained(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    model = SmallNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.0)  # a trained network's scales: far above the alive threshold
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("target, learn_fraction", [(0.5, 0.5), (0.25, 0.0)])
def test_compress_lands_within_two_percent_of_the_budget_by_pytorchs_own_counter(target, learn_fraction):
    """A CIFAR ResNet-20 (the benchmark's seed): on budget, never above, as FlopCounterMode counts it."""
    torch.manual_seed(0)
    model = morphnet.seeds.create_seed("resnet20")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.0)
    x = torch.randn(1, 3, 16, 16)
    data = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(2)]
    report: dict = {}
    slim = morphnet.compress(model, x, target, data=data, steps=4, bn_batches=1, log=None, report=report,
                             learn_fraction=learn_fraction)
    seed_flops, flops = count_flops(model, x), count_flops(slim, x)
    assert 0.98 * target * seed_flops <= flops <= target * seed_flops
    assert flops == pytest.approx(report["cost"])  # MorphNet's prediction is what PyTorch counts
    assert type(slim) is type(model) and type(slim.layer2[0].bn1) is nn.BatchNorm2d
    assert slim.layer2[0].conv1.out_channels == report["widths"]["layer2.0.conv1"]
    learn = round(4 * learn_fraction)
    assert report["steps"] == {"learn": learn, "finetune": 4 - learn, "batchnorm_batches": 1}
    assert [h["step"] for h in report["history"]] == ([learn] if learn else [])
    assert report["function_check"] < 1e-5  # the landed network is the original with the cut channels zeroed


def test_compress_keeps_the_classes_and_the_landing_is_maximal():
    """No cut channel group would still fit: the landing keeps as much as the budget allows."""
    model = _trained()
    x = torch.randn(1, 3, 8, 8)
    report: dict = {}
    slim = morphnet.compress(model, x, 0.5, data=_data(), steps=12, bn_batches=2, log=None, report=report,
                             learn_fraction=0.5)
    assert type(slim) is SmallNet and type(slim.bn2) is nn.BatchNorm2d
    assert slim.conv2.out_channels == slim.bn2.num_features == report["widths"]["conv2"] < 32
    assert count_flops(slim, x) == pytest.approx(report["cost"]) and report["cost"] <= 0.5 * report["seed_cost"]
    assert report["steps"] == {"learn": 6, "finetune": 6, "batchnorm_batches": 2}
    reg = morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=0.01)
    target = 0.3 * float(reg.get_cost())
    cost = reg.land_on_cost(target)
    alive = reg.alive_groups()
    assert cost <= target
    for group in torch.nonzero(~alive & torch.as_tensor(reg.grouping.regularized)).flatten().tolist():
        reg.revived[group] = True
        assert float(reg.get_cost()) > target
        reg.revived[group] = False
    reg.reset_landing()
    assert reg.alive_groups().all()


def test_compress_leaves_the_model_it_was_given_untouched():
    model = _trained().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slim = morphnet.compress(model, torch.randn(1, 3, 8, 8), 0.5, data=_data(), steps=6, bn_batches=1, log=None)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and slim.training
    model.eval()
    assert not morphnet.compress(model, torch.randn(1, 3, 8, 8), 0.5, data=_data(), steps=2, bn_batches=0,
                                 log=None).training


def test_an_impossible_target_is_refused_before_any_training_naming_the_lowest_cost():
    model = _trained()
    seen = []

    def data():
        for batch in itertools.cycle(_data()):
            seen.append(batch)
            yield batch

    with pytest.raises(ValueError, match="below the lowest cost this structure allows"):
        morphnet.compress(model, torch.randn(1, 3, 8, 8), 0.001, data=data(), steps=10, log=None)
    assert not seen
    with pytest.raises(ValueError, match="not below the model's"):
        morphnet.compress(model, torch.randn(1, 3, 8, 8), 1.0, data=_data(), steps=10, log=None)


def test_data_that_runs_out_is_an_error_and_a_list_is_reused():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="data ran out"):
        morphnet.compress(_trained(), x, 0.5, data=iter(_data(2)), steps=6, bn_batches=0, log=None)
    morphnet.compress(_trained(), x, 0.5, data=_data(2), steps=6, bn_batches=3, log=None)  # cycles the list


def test_a_batch_the_default_loss_cannot_read_names_loss_fn():
    with pytest.raises(ValueError, match="loss_fn"):
        morphnet.compress(_trained(), torch.randn(1, 3, 8, 8), 0.5, data=[{"x": torch.randn(2, 3, 8, 8)}],
                          steps=2, log=None)


def test_a_custom_loss_and_batches_of_any_shape_work():
    data = [{"pixels": x, "label": y} for x, y in _data()]
    slim = morphnet.compress(_trained(), torch.randn(1, 3, 8, 8), 0.5, data=data, steps=4, bn_batches=2, log=None,
                             loss_fn=lambda model, batch: F.cross_entropy(model(batch["pixels"]), batch["label"]))
    assert slim(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_a_channels_last_model_is_compressed_and_stays_channels_last():
    model = _trained().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 8, 8).to(memory_format=torch.channels_last)
    data = [(a.to(memory_format=torch.channels_last), b) for a, b in _data()]
    slim = morphnet.compress(model, x, 0.5, data=data, steps=4, bn_batches=1, log=None)
    assert slim.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert count_flops(slim, x) <= 0.5 * count_flops(model, x) * 1.0001


def test_validation_scores_are_taken_after_every_stage():
    calls = []
    report: dict = {}
    morphnet.compress(_trained(), torch.randn(1, 3, 8, 8), 0.5, data=_data(), steps=4, bn_batches=1, log=None,
                      val_fn=lambda m: calls.append(m.training) or 0.5, report=report)
    assert list(report["scores"]) == ["seed", "landed", "recalibrated", "finetuned"]  # no learning by default
    assert calls == [False] * 4  # scored in eval mode
    morphnet.compress(_trained(), torch.randn(1, 3, 8, 8), 0.5, data=_data(), steps=4, bn_batches=1, log=None,
                      val_fn=lambda m: 0.5, report=report, learn_fraction=0.5)
    assert list(report["scores"]) == ["seed", "learned", "landed", "recalibrated", "finetuned"]


def test_distillation_is_on_with_the_default_loss_and_pulls_towards_the_original():
    """The default fine-tuning distills the original model: with the labels' weight at 0 a pruned network
    moves towards the original's outputs, which plain cross-entropy on random labels would not do."""
    model = _trained().eval()
    x = torch.randn(1, 3, 8, 8)
    report: dict = {}
    data = _data(8)
    batch = torch.cat([b for b, _ in data])
    start = morphnet.compress(model, x, 0.5, data=data, steps=1, bn_batches=4, log=None)
    taught = morphnet.compress(model, x, 0.5, data=data, steps=40, bn_batches=4, log=None, distill_weight=1.0,
                               lr=0.05, report=report)
    assert report["distill"] is True
    with torch.no_grad():
        gap = lambda m: F.kl_div(F.log_softmax(m.eval()(batch), 1), F.softmax(model(batch), 1), reduction="batchmean")
        assert gap(taught) < 0.5 * gap(start)
    with pytest.raises(ValueError, match="distill=True works with the default"):
        morphnet.compress(model, x, 0.5, data=data, steps=2, log=None, distill=True,
                          loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    morphnet.compress(model, x, 0.5, data=data, steps=2, log=None, report=report,
                      loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    assert report["distill"] is False  # a loss of the user's own: no distillation unless asked for


def test_the_landed_network_keeps_the_strongest_channels_exactly():
    """Landing keeps the trained weights of the channels it keeps: with the cut channels' BatchNorm zeroed in
    the original, the slim network (before fine-tuning) computes the same outputs."""
    model = _trained().eval()
    x = torch.randn(1, 3, 8, 8)
    reg = morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=0.01)
    scale = reg.threshold_scale_for_cost(0.4 * float(reg.get_cost()))
    reg.set_threshold_scale(scale)
    slim = morphnet.apply_structure(model, reg, x, keep_weights=True).eval()
    alive = reg.alive_groups()  # a residual group stays when any of its BatchNorms keeps it
    keep = {name.removesuffix(".weight"): alive[torch.as_tensor(reg.analysis.group_of[ids])]
            for name, ids in reg.analysis.gamma_sources.items()}
    assert not all(k.all() for k in keep.values())
    masked = _zero_channels(model, keep)
    batch = torch.randn(4, 3, 8, 8)
    assert torch.allclose(slim(batch), masked(batch), atol=1e-5)


def _zero_channels(model: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
    import copy

    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in keep.items():
            bn = masked.get_submodule(name)
            bn.weight[~mask] = 0
            bn.bias[~mask] = 0
    return masked


def test_threshold_scale_for_cost_is_the_smallest_scale_on_budget():
    model = _trained()
    x = torch.randn(1, 3, 8, 8)
    reg = morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=0.01)
    seed = float(reg.get_cost())
    for fraction in (0.9, 0.5, 0.2):
        scale = reg.threshold_scale_for_cost(fraction * seed)
        assert reg.threshold_scale == 1.0  # the search leaves the scale as it was
        reg.set_threshold_scale(scale)
        assert float(reg.get_cost()) <= fraction * seed
        reg.set_threshold_scale(scale * (1 - 1e-6))  # just below: more channels alive, over budget
        assert float(reg.get_cost()) > fraction * seed
        reg.set_threshold_scale(1.0)
    with pytest.raises(ValueError, match="positive"):
        reg.set_threshold_scale(0.0)


def test_the_landing_controller_pushes_while_the_channels_to_cut_lag_and_backs_off_below():
    c = LandingController(initial_scale=30.0, initial_strength=1.0, ramp_steps=100)
    assert c.reference(0) == pytest.approx(30.0) and c.reference(100) == pytest.approx(0.5)
    assert c.reference(50) == pytest.approx((30.0 + 0.5) / 2)  # linear: an even push all along
    up = [c.update(step, 30.0, steps=10) for step in range(10, 110, 10)]  # nothing moves: push harder
    assert all(b > a for a, b in zip(up, up[1:]))
    down = c.update(110, 0.05, steps=10)  # far below the reference: cut at once
    assert down < up[-1] / 5
    state = c.state_dict()
    twin = LandingController(initial_scale=1.0, initial_strength=2.0, ramp_steps=5)
    twin.load_state_dict(state)
    assert twin.strength == c.strength and twin.update(120, 1.0, 10) == c.update(120, 1.0, 10)


def test_recalibrate_batchnorm_averages_the_batches_and_restores_momentum():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    batches = iter([torch.randn(16, 3) * 2 + 1 for _ in range(4)])
    stack = []
    count = morphnet.recalibrate_batchnorm(bn.eval(), batches, 4, lambda m, b: stack.append(b) or m(b))
    assert count == 1 and bn.momentum == 0.1 and not bn.training
    assert torch.allclose(bn.running_mean, torch.stack([b.mean(0) for b in stack]).mean(0), atol=1e-6)


def _zoo(name: str) -> nn.Module:
    if name.startswith("timm:"):
        timm = pytest.importorskip("timm")
        return timm.create_model(name[5:], pretrained=False, num_classes=10)
    import torchvision

    return getattr(torchvision.models, name)(num_classes=10)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "timm:mobilenetv3_small_050"])
def test_a_torchvision_or_timm_model_is_compressed_in_one_call(name):
    """Issue 25: a user's torchvision / timm model, as constructed, in one call: on budget by
    FlopCounterMode, the same class, and the landed network is the original with the cut channels zeroed
    (residual joins, depthwise convolutions and squeeze-excitation included)."""
    torch.manual_seed(0)
    model = _zoo(name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.0)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    data = [(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))]
    report: dict = {}
    slim = morphnet.compress(model, x, 0.5, data=data, steps=1, bn_batches=1, log=None, report=report)
    seed_flops, flops = count_flops(model, x), count_flops(slim, x)
    assert 0.98 * 0.5 * seed_flops <= flops <= 0.5 * seed_flops
    assert type(slim) is type(model)
    assert report["function_check"] < 1e-4
    assert slim(x).shape == (1, 10)
