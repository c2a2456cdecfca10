"""Rebuild representative torchvision models with a quarter of their channel groups exactly dead.

For each model: kill a random quarter of the prunable channel groups (BatchNorm weight and
bias to zero for Gamma models; the output-channel weights and biases of every conv / linear
layer for GroupLasso models), rebuild with ``keep_weights=True`` and check that the slim model
computes the same outputs, that ``FlopCounterMode`` counts what ``get_cost()`` predicted, and
that something was pruned.
"""

import pytest
import torch
import torchvision

import morphnet
from nets import counted_flops, random_dead_groups

# (name, input size, source, extra constructor arguments)
ZOO = [
    ("resnet18", 64, "gamma", {}), ("resnext50_32x4d", 64, "gamma", {}), ("mobilenet_v2", 64, "gamma", {}),
    ("mobilenet_v3_small", 64, "gamma", {}),
    ("efficientnet_b0", 64, "gamma", {}), ("mnasnet0_5", 64, "gamma", {}), ("densenet121", 64, "gamma", {}),
    ("googlenet", 64, "gamma", {"aux_logits": True, "init_weights": False}),
    ("inception_v3", 299, "gamma", {"aux_logits": True, "init_weights": False}),
    ("shufflenet_v2_x0_5", 64, "gamma", {}), ("squeezenet1_1", 64, "group_lasso", {}),
    ("vgg11", 32, "group_lasso", {}), ("vgg11_bn", 32, "gamma", {}), ("alexnet", 64, "group_lasso", {}),
    ("regnet_y_400mf", 64, "gamma", {}),
    ("convnext_tiny", 64, "group_lasso", {}), ("vit_b_32", 64, "group_lasso", {"image_size": 64}),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def build(name, **kwargs):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10, **kwargs)
    if name.startswith("vit"):  # torchvision zero-initializes the head: outputs would all be 0
        torch.nn.init.normal_(model.heads.head.weight)
    return model


def kill_quarter(model, reg, source, seed=0):
    """Make a random quarter of the regularized groups exactly zero; return the dead mask."""
    a = reg.analysis
    dead, rng = random_dead_groups(reg, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if source == "gamma":
            for name, ids in a.gamma_sources.items():
                bn = model.get_submodule(name.rpartition(".")[0])
                bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) + 0.5)
                bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen) * 0.1)
                bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen) * 0.1)
                bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
                kill = torch.as_tensor(dead[a.group_of[ids]])
                bn.weight[kill] = 0
                bn.bias[kill] = 0
        else:
            for info in a.weights.values():
                module = model.get_submodule(info.module)
                kill = torch.as_tensor(dead[a.group_of[info.out_ids]])
                weight = getattr(module, info.name.rpartition(".")[2])
                weight.movedim(info.out_dim, 0)[kill] = 0
                bias = getattr(module, "bias", None)
                if isinstance(bias, torch.Tensor) and bias.shape == kill.shape:
                    bias[kill] = 0
    return dead


def regularizer(model, x, source):
    if source == "gamma":
        return morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=1e-3)
    return morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6)


@pytest.mark.parametrize("name,size,source,kwargs", ZOO, ids=[z[0] for z in ZOO])
def test_dead_channels_rebuild_to_the_same_function_and_predicted_flops(name, size, source, kwargs):
    model = build(name, **kwargs).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    reg = regularizer(model, x, source)
    kill_quarter(model, reg, source)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slim = morphnet.apply_structure(model, reg, x, keep_weights=True)
    assert type(slim) is type(model) and slim is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the input model must be untouched"
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        want = model(x)
    got_flops = counted_flops(slim, x)
    with torch.no_grad():
        got = slim.eval()(x)
    assert got.shape == want.shape
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    assert got_flops == reg.get_cost().item() < counted_flops(model, x)


@pytest.mark.parametrize("name,size", [("googlenet", 64), ("inception_v3", 299)])
def test_pruned_models_with_auxiliary_heads_run_a_training_step(name, size):
    model = build(name, aux_logits=True, init_weights=False)
    x = torch.randn(1, 3, size, size)
    reg = regularizer(model, x, "gamma")
    kill_quarter(model, reg, "gamma")
    counts = morphnet.expand_structure(model, reg, x, 0.5)  # half of the survivors: a cheap training step
    slim = morphnet.apply_structure(model, counts, x).train()
    aux = [n for n, _ in slim.named_modules() if n.lower().startswith("aux") and n.count(".") == 0]
    for head in aux:  # the training-only heads were narrowed with the rest
        assert sum(p.numel() for p in slim.get_submodule(head).parameters()) < sum(
            p.numel() for p in model.get_submodule(head).parameters())
    opt = torch.optim.SGD(slim.parameters(), lr=0.01)
    outputs = slim(torch.randn(2, 3, size, size))
    assert aux and len(outputs) == len(aux) + 1
    loss = sum(torch.nn.functional.cross_entropy(o, torch.tensor([1, 2])) for o in outputs)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for h in aux
               for p in slim.get_submodule(h).parameters())
    opt.step()
    assert slim.eval()(x).shape == (1, 10)


def test_maxvit_mbconv_raw_shortcut_is_not_pruned_by_its_pre_norm():
    """MBConv reads its input raw (projection shortcut) and through pre_norm (a BatchNorm): a zero
    pre_norm scale is no evidence for the shortcut. Kill a quarter of every BatchNorm's channels, the
    stem's included: the rebuild must still compute the same function (it was 7.5% off before)."""
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(0)
    model = MaxVit(input_size=(64, 64), stem_channels=16, partition_size=2, block_channels=[16, 32],
                   block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    reg = regularizer(model, x, "gamma")
    assert reg.coverage_summary()["uncovered_layers"] == ["stem.1.0"]  # its raw output feeds the shortcut
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                kill = torch.rand(m.weight.shape, generator=gen) < 0.25
                m.weight[kill], m.bias[kill] = 0.0, 0.0
    slim = morphnet.apply_structure(model, reg, x, keep_weights=True)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    assert slim.stem[1][0].out_channels == 16  # the uncovered stem output keeps its width
    with torch.no_grad():
        want, got = model(x), slim.eval()(x)
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    assert counted_flops(slim, x) == reg.get_cost().item()
