"""Property: whatever the analysis calls dead, removing it does not change what the model computes.

Small random nets mix the patterns where a naive analysis goes wrong: a BatchNorm on one branch
only (the raw value also added), a raw block input read by a shortcut conv next to a pre-norm
(MaxViT's MBConv), pre-activation residuals, squeeze-excitation, a reduction over channels, a
concat of normalized and raw tensors, depthwise convs (with or without a bias) between a BatchNorm
and its reader or between a raw conv and its BatchNorm, and heads that pool raw conv outputs. Random channels are
killed exactly (BatchNorm gamma and beta; weight rows with or without their biases; gate logits),
both whole groups and single channels; the slim model rebuilt with ``keep_weights=True`` must
compute the original's output, and most examples must remove a channel (keeping every channel
would pass the first check too).
"""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import morphnet
from nets import assert_most_examples_pruned, kill_groups, weight_count

KINDS = ("post", "one_branch_bn", "raw_shortcut", "preact", "se", "mixed_cat", "channel_reduce", "shuffle", "separable",
         "dw_then_bn")
HEADS = ("pool", "norm_pool", "flatten", "raw_pool")


def norm(c, bn):
    return nn.BatchNorm2d(c) if bn else nn.Identity()


class Block(nn.Module):
    def __init__(self, kind, c, w, bn, bias):
        super().__init__()
        self.kind = kind
        conv = lambda i, o, k=3: nn.Conv2d(i, o, k, padding=k // 2, bias=bias)  # noqa: E731
        if kind == "post":
            self.conv, self.bn = conv(c, w), norm(w, bn)
        elif kind == "one_branch_bn":  # relu(bn(y)) + y: the raw y is read past the BatchNorm
            self.conv, self.bn = conv(c, w, 1), norm(w, bn)
        elif kind == "raw_shortcut":  # MBConv: pre_norm on the main branch, raw x into the shortcut conv
            self.pre, self.conv, self.bn, self.short = norm(c, bn), conv(c, w), norm(w, bn), conv(c, w, 1)
        elif kind == "preact":  # x + conv(relu(bn(x))): the raw stream is read only by BatchNorms and adds
            self.bn, self.conv = norm(c, bn), conv(c, c)
            w = c
        elif kind == "se":
            self.conv, self.bn = conv(c, w), norm(w, bn)
            self.fc1, self.fc2 = nn.Conv2d(w, 2, 1), nn.Conv2d(2, w, 1)
        elif kind == "mixed_cat":  # cat(normalized, raw)
            self.conv, self.bn, self.raw = conv(c, w), norm(w, bn), conv(c, w + 1, 1)
            w = 2 * w + 1
        elif kind == "channel_reduce":  # spatial attention: a mean over channels reads every channel
            self.conv, self.bn = conv(c, w), norm(w, bn)
        elif kind == "separable":  # Xception / NASNet: relu(bn(x)) -> depthwise (multiplier 2) -> pointwise
            self.pre, self.dw = norm(c, bn), nn.Conv2d(c, 2 * c, 3, padding=1, groups=c, bias=bias)
            self.conv, self.bn = conv(2 * c, w, 1), norm(w, bn)
        elif kind == "dw_then_bn":  # a raw conv output through a depthwise conv (reflect, dilated), then BN
            self.conv, self.bn = conv(c, w, 1), norm(w, bn)
            self.dw = nn.Conv2d(w, w, 3, padding=2, dilation=2, groups=w, bias=bias, padding_mode="reflect")
        else:  # shuffle: pixel_unshuffle / pixel_shuffle and the aten channel shuffle
            self.conv, self.bn = conv(c, 4 * w, 1), norm(4 * w, bn)
            self.shuffle = nn.ChannelShuffle(2)
        self.out_channels = w

    def forward(self, x):
        k = self.kind
        if k == "post":
            return torch.relu(self.bn(self.conv(x)))
        if k == "one_branch_bn":
            y = self.conv(x)
            return torch.relu(self.bn(y)) + y
        if k == "raw_shortcut":
            return self.bn(self.conv(torch.relu(self.pre(x)))) + self.short(x)
        if k == "preact":
            return x + self.conv(torch.relu(self.bn(x)))
        if k == "separable":
            return torch.relu(self.bn(self.conv(torch.relu(self.dw(torch.relu(self.pre(x)))))))
        if k == "dw_then_bn":
            return torch.relu(self.bn(self.dw(self.conv(x))))
        y = torch.relu(self.bn(self.conv(x)))
        if k == "se":
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
            return y * s
        if k == "mixed_cat":
            return torch.cat([y, self.raw(x)], 1)
        if k == "channel_reduce":
            return y * torch.sigmoid(y.mean(1, keepdim=True))
        y = nn.functional.pixel_shuffle(self.shuffle(y), 2)  # 4w channels at 6x6 -> w at 12x12
        return nn.functional.avg_pool2d(y, 2)


class TrickyNet(nn.Module):
    def __init__(self, kinds, head, bn, bias):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 4, 3, padding=1, bias=bias), norm(4, bn)
        c, blocks = 4, []
        for kind, width in kinds:
            blocks.append(Block(kind, c, width, bn, bias))
            c = blocks[-1].out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head_kind = head
        if head == "raw_pool":  # pooled raw conv output next to its normalized version
            self.tail, self.tail_bn = nn.Conv2d(c, 5, 1, bias=bias), norm(5, bn)
            self.fc = nn.Linear(10, 3)
        else:
            self.final_bn = norm(c, bn and head == "norm_pool")  # pre-activation nets end with one
            self.fc = nn.Linear(c * 36 if head == "flatten" else c, 3)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem_bn(self.stem(x))))
        if self.head_kind == "raw_pool":
            y = self.tail(x)
            return self.fc(torch.cat([torch.relu(self.tail_bn(y)).mean((2, 3)), y.mean((2, 3))], 1))
        if self.head_kind == "norm_pool":
            x = torch.relu(self.final_bn(x))
        return self.fc(x.flatten(1) if self.head_kind == "flatten" else x.mean((2, 3)))


def randomize(model, gen):
    """Non-trivial BatchNorm statistics and biases, so that nothing is zero by accident."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)


def make_regularizer(source, model, x):
    if source == "gamma":
        return morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=1e-3)
    if source == "group_lasso":
        return morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6)
    return morphnet.LogisticSigmoidFlopsRegularizer(model, x, alive_threshold=0.5)


def kill(model, reg, rng, kill_biases):
    """Kill whole candidate groups (regularized or not: uncovered ones too) and single channels."""
    g = reg.grouping
    dead = (g.regularized | g.uncovered) & (rng.random(len(g.regularized)) < 0.4)
    kill_groups(model, reg, dead, seed=int(rng.integers(1 << 30)))
    a = reg.analysis
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        if type(reg.source).__name__ == "GammaSource":
            for name in a.gamma_sources:
                hit = torch.as_tensor(rng.random(state[name].shape[0]) < 0.2)
                state[name][hit] = 0
                state[name.rpartition(".")[0] + ".bias"][hit] = 0
        elif type(reg.source).__name__ == "GroupLassoSource":
            for name, info in a.weights.items():
                if (name, info.out_dim) not in a.alignments:
                    continue
                hit = torch.as_tensor(rng.random(state[name].shape[info.out_dim]) < 0.2)
                state[name].movedim(info.out_dim, 0)[hit] = 0
                parts = a.bias_parts(name)  # one bias, or the parts of a joined one, each with its rows
                if kill_biases and sum(state[bias].shape[0] for bias, _ in parts) == len(hit):
                    for bias, start in parts:
                        state[bias][hit[start:start + state[bias].shape[0]]] = 0
            if not kill_biases:  # zero rows whose bias lives on: a constant the next layer reads
                gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
                for bias in sorted({bias for name in a.biases for bias, _ in a.bias_parts(name)}):
                    state[bias].copy_(torch.randn(state[bias].shape, generator=gen) * 0.3)
        else:
            for gate in reg.source.names:
                logits = state[f"{gate}.logits"]
                logits[torch.as_tensor(rng.random(len(logits)) < 0.2)] = -5.0


def check_rebuild(kinds, head, source, bn, bias, kill_biases, seed) -> bool | None:
    """Kill channels, rebuild with their weights and compare outputs; whether the rebuild removed a
    channel (None when the net has nothing to regularize)."""
    torch.manual_seed(seed)
    model = TrickyNet(kinds, head, bn, bias)
    x = torch.randn(1, 3, 6, 6)
    randomize(model, torch.Generator().manual_seed(seed))
    if source == "gates":
        model = morphnet.add_gates(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            reg = make_regularizer(source, model, x)
        except ValueError as e:
            assert "nothing to regularize" in str(e)
            return None
        kill(model.eval(), reg, np.random.default_rng(seed), kill_biases)
        slim = morphnet.apply_structure(model, reg, x, keep_weights=True)
    with torch.no_grad():
        want, got = model.eval()(x), slim.eval()(x)
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-4, f"{kinds} head={head} source={source} bn={bn} bias={bias}: relative error {err:.2e}"
    return weight_count(slim) < weight_count(model)


blocks = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(2, 4)), min_size=1, max_size=3)

# Each property runs inside a plain test that then requires most examples to have removed a channel.


def test_gamma_never_prunes_a_channel_a_reader_still_sees():
    pruned = []

    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(blocks, st.sampled_from(HEADS), st.booleans(), st.integers(0, 1000))
    def check(kinds, head, bias, seed):
        pruned.append(bool(check_rebuild(kinds, head, "gamma", True, bias, True, seed)))

    check()
    assert_most_examples_pruned(pruned)


def test_group_lasso_never_prunes_a_channel_a_reader_still_sees():
    """Zero rows read through a BatchNorm, or whose bias lives on, are rightly kept: only the examples
    without either count towards "most examples prune"."""
    pruned = []

    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(blocks, st.sampled_from(HEADS), st.booleans(), st.booleans(), st.booleans(), st.integers(0, 1000))
    def check(kinds, head, bn, bias, kill_biases, seed):
        removed = check_rebuild(kinds, head, "group_lasso", bn, bias, kill_biases, seed)
        if not bn and (kill_biases or not bias):
            pruned.append(bool(removed))

    check()
    assert_most_examples_pruned(pruned)


def test_gates_never_prune_a_channel_a_reader_still_sees():
    pruned = []

    @settings(max_examples=15, deadline=None, derandomize=True)
    @given(blocks, st.sampled_from(HEADS), st.booleans(), st.integers(0, 1000))
    def check(kinds, head, bn, seed):
        pruned.append(bool(check_rebuild(kinds, head, "gates", bn, True, True, seed)))

    check()
    assert_most_examples_pruned(pruned)


# ---- the patterns one by one: what is covered, what is not ----------------------------------------


def coverage(kind, head="pool", source="gamma", bn=True, bias=False):
    model = TrickyNet([(kind, 3)], head, bn, bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = make_regularizer(source, model, torch.randn(1, 3, 6, 6))
    s = reg.coverage_summary()
    return {n for n in morphnet.StructureExporter(reg).get_alive_counts()}, set(s["uncovered_layers"])


def test_raw_shortcut_next_to_a_pre_norm_is_not_covered_by_gamma():
    model = TrickyNet([("raw_shortcut", 3), ("raw_shortcut", 3)], "norm_pool", True, False)
    reg = make_regularizer("gamma", model, torch.randn(1, 3, 6, 6))
    # blocks.0's output (bn(conv) + short, a raw conv) is read raw by blocks.1.short, next to blocks.1.pre
    assert reg.coverage_summary()["uncovered_layers"] == ["blocks.0.conv", "blocks.0.short"]
    # blocks.1's output is read only by final_bn: covered, like the stem's (read through relu(stem_bn))
    assert set(morphnet.StructureExporter(reg).get_alive_counts()) == {"stem", "blocks.1.conv", "blocks.1.short"}


def test_pre_activation_and_post_activation_residuals_stay_prunable():
    for kind, head in (("preact", "norm_pool"), ("post", "pool"), ("se", "pool"), ("mixed_cat", "norm_pool")):
        prunable, uncovered = coverage(kind, head)
        assert "stem" in prunable and not uncovered, kind
    prunable, uncovered = coverage("preact", "pool")  # the raw sum pooled into the head: not covered
    assert uncovered == {"stem", "blocks.0.conv"} and not prunable


def test_batchnorm_on_one_branch_only_is_not_evidence():
    prunable, uncovered = coverage("one_branch_bn")
    assert "blocks.0.conv" in uncovered and "blocks.0.conv" not in prunable


def test_group_lasso_needs_the_bias_below_the_threshold_too():
    model = TrickyNet([("post", 3)], "pool", False, True)
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        model.blocks[0].conv.weight.zero_()
    reg = make_regularizer("group_lasso", model, x)
    assert morphnet.StructureExporter(reg).get_alive_counts()["blocks.0.conv"] == 3  # biases keep them alive
    with torch.no_grad():
        model.blocks[0].conv.bias.zero_()
    assert morphnet.StructureExporter(reg).get_alive_counts()["blocks.0.conv"] == 0


def test_pixel_and_channel_shuffles_are_mapped_exactly():
    model = TrickyNet([("shuffle", 2)], "pool", True, False)
    x = torch.randn(1, 3, 6, 6)
    reg = make_regularizer("gamma", model, x)
    assert not morphnet.StructureExporter(reg).get_alive_counts().keys() - {"stem", "blocks.0.conv"}
    groups = reg.analysis.group_of[reg.analysis.module_out_ids["blocks.0.conv"]]
    # 8 channels, shuffled in 2 groups ([0, 4, 1, 5, 2, 6, 3, 7]), then 4 per output pixel-shuffle channel
    assert [sorted(np.nonzero(groups == g)[0].tolist()) for g in np.unique(groups)] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    with torch.no_grad():
        model.blocks[0].bn.weight[[0, 1, 4]] = 0
    assert morphnet.StructureExporter(reg).get_alive_counts()["blocks.0.conv"] == 8
    with torch.no_grad():
        model.blocks[0].bn.weight[5] = 0
    assert morphnet.StructureExporter(reg).get_alive_counts()["blocks.0.conv"] == 4


@pytest.mark.parametrize("kind", ["raw_shortcut", "one_branch_bn"])
def test_the_rebuild_stays_exact_where_gamma_is_no_evidence(kind):
    model = TrickyNet([(kind, 3)], "pool", True, False)
    x = torch.randn(1, 3, 6, 6)
    randomize(model, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight[0], m.bias[0] = 0.0, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = make_regularizer("gamma", model, x)
        slim = morphnet.apply_structure(model.eval(), reg, x, keep_weights=True)
    with torch.no_grad():
        assert torch.allclose(slim.eval()(x), model(x), rtol=1e-4, atol=1e-6)
