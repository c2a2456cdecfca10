"""The proximal (soft-threshold) step: it shrinks exactly by lr x strength x the term's weights,
stops at zero, scales with SGD momentum, refuses what it cannot do, and the pipeline learns with it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import morphnet
from morphnet.cli.main import main
from morphnet.seeds import create_seed

pytestmark = pytest.mark.usefixtures("one_thread")


def resnet14():
    torch.manual_seed(0)
    model = create_seed("resnet14", num_classes=10, in_channels=3)
    with torch.no_grad():  # spread the scales so a single step kills some and only shrinks others
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.empty_like(m.weight).uniform_(-1, 1))
    return model, torch.randn(1, 3, 16, 16)


def term_gradients(reg, params):
    return torch.autograd.grad(reg.get_regularization_term(), params, allow_unused=True)


def test_gamma_step_is_the_soft_threshold_of_each_scale_by_its_cost_weight():
    model, x = resnet14()
    reg = morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=0.01)
    prox = morphnet.ProximalStep(reg)
    params = prox._params
    before = [p.detach().clone() for p in params]
    grads = term_gradients(reg, params)
    lr = 0.05
    strength = 0.6 / (lr * max(float(g.abs().max()) for g in grads if g is not None))  # shrinks up to 0.6
    prox.step(strength, lr)
    killed = shrunk = 0
    for p, old, g in zip(params, before, grads):
        expected = old.sign() * (old.abs() - lr * strength * g.abs()).clamp_min(0)
        torch.testing.assert_close(p.detach(), expected)
        killed += int(((p == 0) & (old != 0)).sum())
        shrunk += int(((p.abs() < old.abs()) & (p != 0)).sum())
        assert bool((p.sign() * old.sign() >= 0).all())  # never crosses zero
    assert killed > 0 and shrunk > 0  # the step both kills and shrinks: the test exercises both cases


def test_group_lasso_step_shrinks_each_row_norm_and_keeps_its_direction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight.mul_(torch.linspace(0.05, 2.0, 8).view(8, 1, 1, 1))
    reg = morphnet.GroupLassoFlopsRegularizer(model, torch.randn(1, 3, 8, 8), threshold=0.01)
    prox = morphnet.ProximalStep(reg)
    old = model[0].weight.detach().clone()
    (grad,) = term_gradients(reg, [model[0].weight])
    strength = 1.0 / float(reg.get_cost())
    prox.step(strength, 1.0)
    new = model[0].weight.detach()
    old_norms, new_norms = old.flatten(1).norm(dim=1), new.flatten(1).norm(dim=1)
    expected = (old_norms - strength * grad.flatten(1).norm(dim=1)).clamp_min(0)
    torch.testing.assert_close(new_norms, expected)
    assert (new_norms == 0).any() and (new_norms > 0).any()
    alive = new_norms > 0
    torch.testing.assert_close(new.flatten(1)[alive] / new_norms[alive, None],
                               old.flatten(1)[alive] / old_norms[alive, None])


def test_group_lasso_step_shrinks_a_channels_bias_with_its_rows_and_zeroes_both():
    """Zero rows with a bias still output the bias, so a channel is dead only with both at zero: the bias
    is part of its channel's group norm and the step shrinks it by the rows' factor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.mul_(torch.linspace(0.02, 2.0, 8).view(8, 1))
        model[0].bias.copy_(torch.linspace(0.5, 0.01, 8))
    reg = morphnet.GroupLassoFlopsRegularizer(model, torch.randn(1, 6), threshold=1e-3)
    prox = morphnet.ProximalStep(reg)
    w_old, b_old = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    prox.step(10.0 / float(reg.get_cost()), 1.0)
    w_new, b_new = model[0].weight.detach(), model[0].bias.detach()
    factor = w_new.norm(dim=1) / w_old.norm(dim=1)
    torch.testing.assert_close(b_new, b_old * factor)  # same shrink factor for the bias as for its row
    dead = factor == 0
    assert dead.any() and (~dead).any()
    assert (b_new[dead] == 0).all() and (w_new[dead] == 0).all()
    alive = morphnet.StructureExporter(reg).get_alive_counts()
    assert alive == {"0": int((~dead).sum())}


def test_sgd_momentum_scales_the_step_to_what_the_loss_term_would_move():
    model, x = resnet14()
    reg = morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=0.01)
    plain = [p.detach().clone() for p in morphnet.ProximalStep(reg)._params]
    twin, _ = resnet14()
    reg_twin = morphnet.GammaFlopsRegularizer(twin, x, gamma_threshold=0.01)
    strength = 0.1 / float(reg.get_cost())
    morphnet.ProximalStep(reg).step(strength, 0.5)
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    morphnet.ProximalStep(reg_twin).step(strength, optimizer)  # 0.05 / (1 - 0.9) = 0.5
    for p, q, old in zip(morphnet.ProximalStep(reg)._params, morphnet.ProximalStep(reg_twin)._params, plain):
        moved_plain, moved_momentum = (old.abs() - p.detach().abs()), (old.abs() - q.detach().abs())
        both = (p != 0) & (q != 0)
        assert bool((moved_plain[both] > 0).any())
        torch.testing.assert_close(moved_momentum[both], moved_plain[both])


def learned_scales(proximal: bool) -> torch.Tensor:
    model, x = resnet14()
    reg = morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=0.01)
    prox = morphnet.ProximalStep(reg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    strength = 0.5 / float(reg.get_cost())
    torch.manual_seed(1)
    for _ in range(30):
        xb, yb = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        (loss if proximal else loss + strength * reg.get_regularization_term()).backward()
        optimizer.step()
        if proximal:
            prox.step(strength, optimizer)
    return torch.cat([p.detach() for p in prox._params])


def test_learning_with_the_proximal_step_leaves_exact_zeros_where_the_loss_term_oscillates():
    with_prox, in_loss = learned_scales(True), learned_scales(False)
    assert int((in_loss == 0).sum()) == 0  # momentum carries the scales through zero and back
    assert int((with_prox == 0).sum()) >= 5
    # the two push equally hard: they kill a similar number of channels
    assert abs(int((with_prox.abs() <= 0.01).sum()) - int((in_loss.abs() <= 0.01).sum())) <= 6


def test_what_the_step_cannot_do_is_refused_with_the_reason():
    model, x = resnet14()
    with pytest.raises(TypeError, match="LogisticSigmoid.*add its term to the loss"):
        gated = morphnet.add_gates(model, x)
        morphnet.ProximalStep(morphnet.LogisticSigmoidFlopsRegularizer(gated, x))
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    plain(torch.randn(1, 3, 6, 6))
    with pytest.raises(ValueError, match="l1_fraction"):
        morphnet.ProximalStep(morphnet.GroupLassoFlopsRegularizer(plain, torch.randn(1, 3, 6, 6), threshold=0.01,
                                                                  l1_fraction=0.5))
    reg = morphnet.GammaFlopsRegularizer(*resnet14(), gamma_threshold=0.01)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="does not hold the regularizer's source parameters"):
        morphnet.ProximalStep(reg).step(1.0, other)
    with pytest.raises(ValueError, match="strength"):
        morphnet.ProximalStep(reg).step(-1.0, 0.1)


def test_run_proximal_learns_to_the_target_and_records_the_option(tmp_path):
    assert main(["learn", "--proximal", "--target-cost", "0.5", "--steps", "300", "--out", str(tmp_path),
                 "--quiet"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["proximal"] is True
    assert abs(summary["learned"]["cost"] / (summary["seed"]["cost"] / 2) - 1) <= 0.05
