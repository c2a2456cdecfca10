"""Small networks shared by the tests: the golden cases of tests/test_golden_costs.py and helpers."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torch.utils import flop_counter


class ConcatNet(nn.Module):
    """The canonical concat net of the golden cases (input 1x3x17x19): two branches concatenated,
    read by two convs with a head each. BatchNorm scales chosen so that 7, 11, 10, 17 channels
    are above 0.45."""

    def __init__(self, gammas: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 13, (7, 5), padding=(3, 2), bias=False)
        self.bn1 = nn.BatchNorm2d(13)
        self.conv2 = nn.Conv2d(3, 23, 1)
        self.bn2 = nn.BatchNorm2d(23)
        self.conv3 = nn.Conv2d(36, 29, 3, stride=2, padding=1)
        self.bn3 = nn.BatchNorm2d(29)
        self.conv4 = nn.Conv2d(36, 31, 1)
        self.bn4 = nn.BatchNorm2d(31)
        self.head3 = nn.Conv2d(29, 2, 1)
        self.head4 = nn.Conv2d(31, 2, 1)
        if gammas:
            with torch.no_grad():
                self.bn1.weight.copy_(torch.tensor([0.8] * 7 + [0.2] * 6))
                self.bn2.weight.copy_(torch.tensor([-0.7] * 11 + [0.1] * 12))
                self.bn3.weight.copy_(torch.tensor([0.6] * 10 + [-0.3] * 19))
                self.bn4.weight.copy_(torch.tensor([-0.5] * 17 + [-0.4] * 14))

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv1(x)))
        b = torch.relu(self.bn2(self.conv2(x)))
        c = torch.cat([a, b], 1)
        d3 = torch.relu(self.bn3(self.conv3(c)))
        d4 = torch.relu(self.bn4(self.conv4(c)))
        return self.head3(d3), self.head4(d4)


class DepthwiseConcatNet(nn.Module):
    """The original MorphNet's depthwise test network without BatchNorm after the depthwise convs
    (``GammaFlopLossWithDepthwiseConvNoBatchNormTest`` in morph-net's flop_regularizer_test.py), input
    1x3x17x19: dw1 -> conv1 -> bn1 and conv2 -> bn2 -> dw2, concatenated, read by conv3 -> bn3. Every
    conv and depthwise conv is followed by a ReLU, as slim's layers are. The same scales as ConcatNet:
    7, 11 and 10 of 13, 23 and 29 channels above 0.45. ``dw_bias``: slim's separable conv without a
    normalizer adds a (zero-initialized) bias, which the original ignored."""

    def __init__(self, dw_bias: bool = False):
        super().__init__()
        self.dw1 = nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=dw_bias)
        self.conv1 = nn.Conv2d(3, 13, (7, 5), padding=(3, 2), bias=False)
        self.bn1 = nn.BatchNorm2d(13)
        self.conv2 = nn.Conv2d(3, 23, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(23)
        self.dw2 = nn.Conv2d(23, 23, 5, padding=2, groups=23, bias=dw_bias)
        self.conv3 = nn.Conv2d(36, 29, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(29)
        with torch.no_grad():
            self.bn1.weight.copy_(torch.tensor([0.8] * 7 + [0.2] * 6))
            self.bn2.weight.copy_(torch.tensor([-0.7] * 11 + [0.1] * 12))
            self.bn3.weight.copy_(torch.tensor([0.6] * 10 + [-0.3] * 19))

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv1(torch.relu(self.dw1(x)))))
        b = torch.relu(self.dw2(torch.relu(self.bn2(self.conv2(x)))))
        return torch.relu(self.bn3(self.conv3(torch.cat([a, b], 1))))


class ResidualNet(nn.Module):
    """x0 = conv0(x); x1 = conv1(relu(bn0(x0))); out = head(relu(bn1(x0 + x1)))."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv0 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.head = nn.Conv2d(width, 4, 1)

    def forward(self, x):
        x0 = self.conv0(x)
        x1 = self.conv1(torch.relu(self.bn0(x0)))
        return self.head(torch.relu(self.bn1(x0 + x1)))


LAYER_OPS = ("convolution", "addmm", "mm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu")


def random_dead_groups(reg, seed: int = 0, fraction: float = 0.25):
    """A random ``fraction`` of the regularized channel groups of ``reg``, as a bool mask over groups."""
    import numpy as np

    rng = np.random.default_rng(seed)
    candidates = np.nonzero(reg.grouping.regularized)[0]
    dead = np.zeros(reg.analysis.num_groups, dtype=bool)
    dead[rng.choice(candidates, int(len(candidates) * fraction), replace=False)] = True
    return dead, rng


# FlopCounterMode does not count the fused CPU attention kernel: the same formula as its other SDPA kernels
FUSED_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                   lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v)}


def counted_flops(model: nn.Module, *inputs) -> int:
    """FLOPs per example of the conv, linear and attention ops FlopCounterMode counts (eval mode)."""
    was = model.training
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    # FlopCounterMode's module tracker fails on a parameter passed straight into a module (PiT's class
    # token) while it requires grad; the counts do not depend on it
    needs_grad = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in needs_grad:
            p.requires_grad_(False)
        with FlopCounterMode(display=False, custom_mapping=FUSED_ATTENTION) as counter, torch.no_grad():
            model(*inputs)
    finally:
        for p in needs_grad:
            p.requires_grad_(True)
        torch.backends.mha.set_fastpath_enabled(True)
        model.train(was)
    total = sum(c for op, c in counter.get_flop_counts()["Global"].items() if str(op).split(".")[1] in LAYER_OPS)
    batch = inputs[0].shape[0]
    assert total % batch == 0
    return total // batch


def weight_count(model: nn.Module) -> int:
    """Number of conv / linear weights (no bias, no norm parameters), packed projections included."""
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                               nn.ConvTranspose3d, nn.Linear)):
            total += module.weight.numel()
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            total += module.in_proj_weight.numel()
    return total


def assert_most_examples_pruned(pruned: list[bool], fraction: float = 2 / 3) -> None:
    """A rebuild that keeps every channel computes the original function too, so a property test of
    "never prunes wrongly" also requires that most of its examples removed a channel."""
    assert pruned and sum(pruned) >= fraction * len(pruned), (
        f"only {sum(pruned)} of {len(pruned)} examples removed a channel")


def kill_groups(model: nn.Module, reg, dead, seed: int = 0) -> None:
    """Make the channel groups ``dead`` (bool per group) exactly dead for ``reg``'s source, in place.

    Gamma: every BatchNorm gets random statistics and scales, then gamma and beta of dead
    channels are zero. GroupLasso: the weight rows and biases of dead output channels are
    zero. Gates (LogisticSigmoid): the logits of dead channels are -5, the others +5, so
    the eval-mode masks are exactly 0 and 1.
    """
    import numpy as np

    a = reg.analysis
    gen = torch.Generator().manual_seed(seed)
    source = type(reg.source).__name__
    state = dict(model.named_parameters()) | dict(model.named_buffers())

    def rows(name, dim):
        ids = a.alignments[(name, dim)]
        return torch.as_tensor(np.asarray(dead[a.group_of[ids]]))

    with torch.no_grad():
        if source == "GammaSource":
            for name in a.gamma_sources:
                bn = model.get_submodule(name.rpartition(".")[0])
                bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) + 0.5)
                if bn.bias is not None:
                    bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen) * 0.1)
                if getattr(bn, "running_mean", None) is not None:
                    bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen) * 0.1)
                    bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
                kill = rows(name, 0)
                bn.weight[kill] = 0
                if bn.bias is not None:
                    bn.bias[kill] = 0
        elif source == "GroupLassoSource":
            for name, info in a.weights.items():
                if (name, info.out_dim) not in a.alignments or name in a.opaque_states:
                    continue
                state[name].movedim(info.out_dim, 0)[rows(name, info.out_dim)] = 0
                for bias, _ in a.bias_parts(name):  # one bias, or each part of a joined one
                    if (bias, 0) in a.alignments:
                        state[bias][rows(bias, 0)] = 0
        else:
            for gate in reg.source.names:
                logits = f"{gate}.logits" if gate else "logits"
                state[logits].copy_(torch.where(rows(logits, 0), -5.0, 5.0))


def spy_host_reads(monkeypatch) -> list[str]:
    """Record every tensor method that copies a value to the host (a sync on a GPU): the names of the
    calls land in the returned list, which the test may clear between steps."""
    host_reads: list[str] = []
    for name in ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            host_reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return host_reads
