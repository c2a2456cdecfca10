"""LogisticSigmoid (FiGS) regularizers: golden costs, probabilistic grouping, alive rule, gradients, rebuild."""

import pytest
import torch
import torchvision
from torch import nn

import morphnet
from morphnet.gates import gated_modules
from nets import ConcatNet, ResidualNet, counted_flops, random_dead_groups

X_CONCAT = torch.zeros(1, 3, 17, 19)
ON = {"bn1": 7, "bn2": 11, "bn3": 10, "bn4": 17}


def gated_concat_net():
    """The concat golden net with a gate after every BatchNorm: +10 for the alive channels, -10 for the rest."""
    model = morphnet.add_gates(ConcatNet(gammas=False), X_CONCAT)
    with torch.no_grad():
        for name, alive in ON.items():
            gate = model.get_submodule(name).gate
            gate.logits.copy_(torch.tensor([10.0] * alive + [-10.0] * (gate.num_channels - alive)))
    return model


@pytest.mark.parametrize("cls,costs", [
    (morphnet.LogisticSigmoidFlopsRegularizer, [474810, 21318, 291600, 197676]),
    (morphnet.LogisticSigmoidModelSizeRegularizer, [735, 33, 1620, 306]),
])
def test_concat_golden_costs_match_the_gamma_version(cls, costs):
    reg = cls(gated_concat_net(), X_CONCAT)
    assert [reg.get_cost([f"conv{i}"]).item() for i in range(1, 5)] == costs
    assert reg.get_cost(["conv3", "conv4"]).item() == costs[2] + costs[3]
    assert morphnet.StructureExporter(reg).get_alive_counts() == {"conv1": 7, "conv2": 11, "conv3": 10, "conv4": 17}
    assert reg.name == cls.__name__.removesuffix("Regularizer") and reg.cost_name in ("FLOPs", "ModelSize")


def test_gamma_costs_of_the_golden_net_agree():
    gamma = morphnet.GammaFlopsRegularizer(ConcatNet(), X_CONCAT, gamma_threshold=0.45)
    gated = morphnet.LogisticSigmoidFlopsRegularizer(gated_concat_net(), X_CONCAT)
    assert gated.get_cost().item() == gamma.get_cost().item()


def test_group_regularizer_is_the_probability_that_some_gate_is_on():
    """ResidualNet: conv0, bn0, conv1 and bn1 gates all gate one group: R = 1 - prod(1 - p)."""
    x = torch.randn(2, 3, 8, 8)
    model = morphnet.add_gates(ResidualNet(width=4), x, keep_first_channel_alive=False)
    gates = [model.conv0.gate, model.bn0.gate, model.conv1.gate, model.bn1.gate]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for g in gates:
            g.logits.copy_(torch.randn(4, generator=gen) * 2)
    reg = morphnet.LogisticSigmoidFlopsRegularizer(model, x, regularize_on_mask=False)
    alive_g, reg_g = reg._group_vectors(reg.source.values(), with_reg=True)
    p = torch.stack([torch.sigmoid(g.logits.detach().double()) for g in gates])
    groups = reg.analysis.group_of[reg.analysis.alignments[("bn1.gate.logits", 0)]]
    assert torch.allclose(reg_g[groups], 1 - (1 - p).prod(0))
    assert torch.equal(alive_g[groups] > 0.5, (p >= 0.1).any(0))


def test_alive_is_at_or_above_the_threshold():
    model = gated_concat_net()
    with torch.no_grad():
        model.bn1.gate.logits[:7] = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0])
    p = torch.sigmoid(model.bn1.gate.logits.detach())
    for i in range(1, 7):
        reg = morphnet.LogisticSigmoidFlopsRegularizer(model, X_CONCAT, alive_threshold=p[i].item(),
                                                       mask_as_alive_vector=False)
        assert morphnet.StructureExporter(reg).get_alive_counts()["conv1"] == 7 - i + 1  # channel 0 kept alive


def test_term_gradients_reach_only_the_gate_logits():
    model = gated_concat_net()
    reg = morphnet.LogisticSigmoidFlopsRegularizer(model, X_CONCAT, regularize_on_mask=False)
    reg.get_regularization_term().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.endswith("gate.logits"), name
    assert model.bn3.gate.logits.grad.abs().sum() > 0


def test_training_alive_follows_the_mask_the_network_sampled():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 17, 19)
    model = gated_concat_net()
    with torch.no_grad():
        model.bn2.gate.logits.zero_()  # on with probability 1/2
    reg = morphnet.LogisticSigmoidFlopsRegularizer(model, x)
    exporter = morphnet.StructureExporter(reg)
    seen = set()
    i = reg.source.names.index("bn2.gate")
    offset = sum(g.num_channels for g in reg.source.gates[:i])
    for _ in range(4):
        applied = {}

        def record(module, args, out):
            applied["mask"] = out.abs().sum((0, 2, 3)) / args[0].abs().sum((0, 2, 3))

        hook = model.bn2.gate.register_forward_hook(record)
        model.train()(x)
        hook.remove()
        mask = reg.source.masks()[offset:offset + 23]
        assert torch.allclose(mask, applied["mask"], atol=1e-5)
        assert exporter.get_alive_counts()["conv2"] == int((applied["mask"] >= 0.1).sum())
        seen.add(exporter.get_alive_counts()["conv2"])
    assert len(seen) > 1  # resampled every step
    model.eval()
    assert exporter.get_alive_counts()["conv2"] == 1  # inference: logit 0 is off; channel 0 is kept


def test_eval_alive_is_the_inference_mask_exactly():
    model = gated_concat_net().eval()
    with torch.no_grad():
        model.bn1.gate.logits[1:3] = torch.tensor([-1e-4, 1e-4])
    reg = morphnet.LogisticSigmoidFlopsRegularizer(model, X_CONCAT)
    assert morphnet.StructureExporter(reg).get_alive_counts()["conv1"] == 6


def test_latency_regularizer_and_errors():
    model = gated_concat_net()
    reg = morphnet.LogisticSigmoidLatencyRegularizer(model, X_CONCAT, hardware="V100", batch_size=4)
    assert reg.name == "LogisticSigmoidLatency" and reg.get_cost().item() > 0
    assert reg.get_regularization_term().requires_grad
    with pytest.raises(ValueError, match="add_gates"):
        morphnet.LogisticSigmoidFlopsRegularizer(ConcatNet(), X_CONCAT)
    with pytest.raises(ValueError, match="alive_threshold"):
        morphnet.LogisticSigmoidFlopsRegularizer(model, X_CONCAT, alive_threshold=1.5)


def test_gates_and_batchnorm_gammas_in_one_group_are_refused():
    with pytest.raises(ValueError, match="probabilistic gate 'bn1.gate'.*fold_gates"):
        morphnet.GammaFlopsRegularizer(gated_concat_net(), X_CONCAT, gamma_threshold=0.45)


def test_a_training_step_with_the_term_moves_the_logits():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 17, 19)
    model = morphnet.add_gates(ConcatNet(gammas=False), x, temperature=0.5)
    reg = morphnet.LogisticSigmoidFlopsRegularizer(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.bn3.gate.logits.detach().clone()
    out = model(x)
    loss = sum(o.square().mean() for o in out) + reg.get_regularization_term() / reg.get_cost().item()
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.bn3.gate.logits.detach())


# ---- rebuild after gated learning ------------------------------------------------------------------

class SmallVGG(nn.Module):
    """VGG-style: conv (+ BN) + ReLU stacks, max pooling, a two-layer classifier with dropout."""

    def __init__(self, bn: bool):
        super().__init__()
        layers, c = [], 3
        for width in (16, "M", 32, 32, "M", 64):
            if width == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(c, width, 3, padding=1)] + ([nn.BatchNorm2d(width)] if bn else []) + [nn.ReLU(True)]
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 48), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(48, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


ZOO = [("resnet18", lambda: torchvision.models.resnet18(num_classes=10)),
       ("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(num_classes=10)),
       ("vgg_bn", lambda: SmallVGG(bn=True)), ("vgg", lambda: SmallVGG(bn=False))]


def learned_gates(model, reg, seed=0):
    """A stand-in for gated learning: a random quarter of the groups off everywhere, other gates random."""
    a = reg.analysis
    dead, rng = random_dead_groups(reg, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, gate in zip(reg.source.names, reg.source.gates):
            groups = a.group_of[a.alignments[(f"{name}.logits", 0)]]
            logits = torch.as_tensor(rng.uniform(-3, 3, len(groups)), dtype=torch.float32)
            logits[torch.as_tensor(dead[groups])] = -5.0
            gate.logits.copy_(logits)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("name,make", ZOO, ids=[z[0] for z in ZOO])
def test_rebuild_after_gated_learning_is_exact(name, make):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model = morphnet.add_gates(make(), x)
    reg = morphnet.LogisticSigmoidFlopsRegularizer(model, x)
    learned_gates(model, reg)
    model.eval()  # alive = the inference masks
    with torch.no_grad():
        want = model(x)
    slim = morphnet.fold_gates(morphnet.apply_structure(model, reg, x, keep_weights=True))
    assert not gated_modules(slim) and gated_modules(model)
    assert type(slim) is type(model)
    with torch.no_grad():
        got = slim.eval()(x)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert counted_flops(slim, x) == reg.get_cost().item() < counted_flops(model, x)


def test_cli_registry_builds_gates_and_the_regularizer():
    from morphnet.pipeline.regularizers import make_regularizer, regularizer_names

    assert "logistic-sigmoid" in regularizer_names()
    model = ConcatNet()
    reg = make_regularizer("logistic-sigmoid", "flops", model, X_CONCAT)
    assert isinstance(reg, morphnet.LogisticSigmoidFlopsRegularizer) and reg.source.threshold == 0.1
    assert sorted(gated_modules(model)) == ["bn1.gate", "bn2.gate", "bn3.gate", "bn4.gate"]
    again = make_regularizer("logistic-sigmoid", "latency", model, X_CONCAT, threshold=0.3, hardware="T4")
    assert len(gated_modules(model)) == 4 and again.source.threshold == 0.3  # gates are inserted once
