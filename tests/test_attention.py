"""Attention heads and channel splits: costs equal FlopCounterMode's (attention matmuls included),
and a random quarter of heads and MLP units killed then removed gives the same function.

Small configurations of torchvision's VisionTransformer and SwinTransformer and of timm's ViT
(fused and unfused attention) and Swin, all randomly initialized.
"""

import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

import morphnet
from morphnet.channels import analyze_model
from nets import counted_flops, random_dead_groups
from test_rebuild_zoo import kill_quarter


def kill_heads_and_units(model, reg, heads, seed=0, others=True):
    """Zero a random quarter of the heads of every attention module (at least one) and, with ``others``,
    of the other regularized groups."""
    a = reg.analysis
    dead, rng = random_dead_groups(reg, seed)
    if not others:
        dead[:] = False
    for module, count in heads.items():
        groups = list(dict.fromkeys(a.group_of[a.weights[_qkv(a, module)].out_ids].tolist()))
        dead[groups] = False
        dead[rng.choice(groups, max(1, count // 4), replace=False)] = True
    with torch.no_grad():
        for info in a.weights.values():
            module = model.get_submodule(info.module)
            kill = torch.as_tensor(dead[a.group_of[info.out_ids]])
            getattr(module, info.name.rpartition(".")[2]).movedim(info.out_dim, 0)[kill] = 0
            bias = getattr(module, "in_proj_bias" if info.name.endswith("in_proj_weight") else "bias", None)
            if isinstance(bias, torch.Tensor) and bias.shape == kill.shape:
                bias[kill] = 0
    return dead


def _qkv(a, module):
    return f"{module}.in_proj_weight" if f"{module}.in_proj_weight" in a.weights else f"{module}.qkv.weight"


def tv_vit():
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initializes it
    return model


def tv_swin():  # 8x8 tokens in windows of 4: the first stage's second block shifts its windows
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4],
                                              window_size=[4, 4], num_classes=10)


def timm_vit(fused):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    return model


def timm_swin():
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=24,
                             depths=(2, 2), num_heads=(2, 4), num_classes=10)


MODELS = {"torchvision_vit": tv_vit, "torchvision_swin": tv_swin, "timm_vit_fused": lambda: timm_vit(True),
          "timm_vit_unfused": lambda: timm_vit(False), "timm_swin": timm_swin}


def _heads(model):
    return {n: m.num_heads for n, m in model.named_modules() if hasattr(m, "num_heads") and hasattr(m, "qkv")
            or isinstance(m, nn.MultiheadAttention)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_heads_are_groups_costs_match_and_killed_heads_rebuild_exactly(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6)
    assert reg.get_cost().item() == counted_flops(model, x)  # q.k^T and attn x v included
    heads = _heads(model)
    a = reg.analysis
    for module, count in heads.items():  # one channel group per head, regularized
        groups = set(a.group_of[a.weights[_qkv(a, module)].out_ids].tolist())
        assert len(groups) == count and not a.fixed_group[list(groups)].any()
    kill_heads_and_units(model, reg, heads)
    slim = morphnet.apply_structure(model, reg, x, keep_weights=True)
    with torch.no_grad():
        want, got = model(x), slim.eval()(x)
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    assert counted_flops(slim, x) == reg.get_cost().item() < counted_flops(model, x)
    slim_heads = _heads(slim)
    uncovered = set(reg.coverage_summary()["uncovered_layers"])
    # the zeros of a killed head reach every reader (packed q/k/v split, q.k^T, a position bias, attn x v,
    # the merge into the output projection), so group lasso proves heads dead
    assert not any(n in uncovered or f"{n}.qkv" in uncovered for n in heads), sorted(uncovered)
    assert sum(slim_heads.values()) < sum(heads.values())
    assert all(isinstance(slim.get_submodule(n), type(model.get_submodule(n))) for n in heads)


def test_the_attention_scale_stays_the_original_one():
    model = timm_vit(False).eval()
    x = torch.randn(1, 3, 32, 32)
    reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6)
    kill_heads_and_units(model, reg, _heads(model), seed=3)
    slim = morphnet.apply_structure(model, reg, x, keep_weights=True)
    for name, m in model.named_modules():
        if isinstance(m, timm.layers.Attention):
            pruned = slim.get_submodule(name)
            assert pruned.scale == m.scale and pruned.head_dim == m.head_dim
            assert pruned.attn_dim == pruned.num_heads * m.head_dim == pruned.proj.in_features


class MaskedAttention(nn.Module):
    """nn.MultiheadAttention (sequence first) with a causal and a padding mask."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 24)
        self.attn = nn.MultiheadAttention(24, 6)
        self.out = nn.Linear(24, 3)

    def forward(self, x, padding):
        h = self.embed(x)
        causal = torch.ones(x.shape[0], x.shape[0], dtype=torch.bool).triu(1)
        return self.out(self.attn(h, h, h, key_padding_mask=padding, attn_mask=causal, need_weights=False)[0])


def test_multihead_attention_with_masks_keeps_its_function_after_head_pruning():
    model = MaskedAttention().eval()
    x = torch.randn(7, 2, 5)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    reg = morphnet.GroupLassoFlopsRegularizer(model, (x, padding), threshold=1e-6)
    kill_heads_and_units(model, reg, {"attn": 6}, seed=1)
    slim = morphnet.apply_structure(model, reg, (x, padding), keep_weights=True)
    assert isinstance(slim.attn, nn.MultiheadAttention) and slim.attn.num_heads < 6
    assert slim.attn.in_proj_weight.shape[0] == 3 * slim.attn.num_heads * 4  # the query width may shrink too
    with torch.no_grad():
        want, got = model(x, padding), slim(x, padding)
    assert torch.allclose(got, want, atol=1e-5)


def test_multihead_attention_with_extra_key_biases_keeps_its_heads():
    class BiasKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True)
            self.out = nn.Linear(16, 2)

        def forward(self, x):
            return self.out(self.attn(x, x, x, need_weights=False)[0])

    model = BiasKV()
    reg = morphnet.GroupLassoFlopsRegularizer(model, torch.randn(1, 5, 16), threshold=1e-6)
    a = reg.analysis
    assert a.fixed_group[a.group_of[a.weights["attn.in_proj_weight"].out_ids]].all()


class DataDependent(nn.Module):
    """Runs for real during capture (``.item()``), so the fused CPU attention kernel is recorded."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        h = self.embed(x)
        if h.abs().sum().item() >= 0:
            h = self.attn(h, h, h, need_weights=False)[0]
        return self.out(h.mean(1))


def test_fused_cpu_attention_is_counted_with_the_sdpa_formula_and_prunes_heads():
    model = DataDependent()
    x = torch.randn(2, 5, 6)
    reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6)
    assert any("flash_attention" in n.name for n in reg.analysis.graph.nodes)
    assert reg.get_cost().item() == counted_flops(model, x)
    kill_heads_and_units(model, reg, {"attn": 4}, seed=2)
    slim = morphnet.apply_structure(model, reg, x, keep_weights=True)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(slim.eval()(x), model(x), atol=1e-5)
    assert counted_flops(slim, x) == reg.get_cost().item()


def _shuffle(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBlock(nn.Module):
    """ShuffleNetV2-style: chunk, a branch, concat and shuffle, twice."""

    def __init__(self, split=None, norm=True):
        super().__init__()
        norm = nn.BatchNorm2d if norm else lambda c: nn.Identity()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.branch1 = nn.Sequential(nn.Conv2d(8, 8, 1), norm(8), nn.ReLU())
        self.branch2 = nn.Sequential(nn.Conv2d(8, 8, 1), norm(8), nn.ReLU())
        self.head = nn.Conv2d(16, 2, 1)
        self.split = split

    def _part(self, x):
        return x.split(self.split, dim=1) if self.split else x.chunk(2, dim=1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for branch in (self.branch1, self.branch2):
            a, b = self._part(x)
            x = _shuffle(torch.cat([a, branch(b)], 1), 2)
        return self.head(x)


def test_chunk_and_channel_shuffle_are_followed_and_rebuild_exactly():
    model = ShuffleBlock(norm=False).eval()  # group lasso is evidence only where no BatchNorm shifts the zeros
    x = torch.randn(2, 3, 6, 6)
    reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6)
    a = reg.analysis
    stem = a.group_of[a.weights["stem.weight"].out_ids]
    assert not a.fixed_group[stem].any() and len(set(stem.tolist())) < 16  # tied through chunks and shuffles
    kill_quarter(model, reg, "group_lasso", seed=4)
    slim = morphnet.apply_structure(model, reg, x, keep_weights=True)
    assert slim.stem.out_channels < 16
    with torch.no_grad():
        assert torch.allclose(slim.eval()(x), model(x), atol=1e-5)
    assert counted_flops(slim, x) == reg.get_cost().item()


def test_a_shuffle_that_mixes_a_batchnormed_branch_into_a_raw_channel_is_not_pruned_by_group_lasso():
    # The shuffle ties raw stem channel j with the branch's BatchNorm output j: zero conv rows do not make
    # the BatchNorm's output zero (its shift), so removing the group would change the function. Before the
    # coverage pass followed views by position (the shuffle's carrier id is channel j's alone), this block
    # was pruned to 12 stem channels with a relative output error of 0.72.
    torch.manual_seed(0)
    model = ShuffleBlock().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.copy_(torch.randn(8) * 0.5 + 1.0)
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="Nothing is left to regularize"):
        reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6)
    assert not reg.grouping.regularized.any()
    assert {"stem", "branch1.0", "branch2.0"} <= set(reg.coverage_summary()["uncovered_layers"])


def test_a_split_by_a_constant_size_keeps_its_channels():
    x = torch.randn(2, 3, 6, 6)
    chunked, split = analyze_model(ShuffleBlock(), x), analyze_model(ShuffleBlock(split=8), x)
    assert not chunked.fixed_group[chunked.group_of[chunked.weights["stem.weight"].out_ids]].any()
    # split(8) reads the same channels as chunk(2), but its size is a constant of the code
    assert split.fixed_group[split.group_of[split.weights["stem.weight"].out_ids]].all()


def test_a_view_with_a_constant_inner_size_is_caught_by_the_rebuild():
    class InnerConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            n, c, h, w = y.shape
            y = y.view(n, -1, 4, h, w).transpose(1, 2).reshape(n, c, h, w)  # the group width 4 is a constant
            return self.head(y)

    model = InnerConstant()
    x = torch.randn(1, 3, 4, 4)
    reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6)
    assert morphnet.StructureExporter(reg).get_alive_counts() == {"conv": 8}
    with pytest.raises(RuntimeError, match="splits channels differently"):
        morphnet.apply_structure(model, {"conv": 4}, x)


@pytest.mark.parametrize("name", ["torchvision_vit", "torchvision_swin", "timm_vit_unfused"])
def test_prune_normalized_makes_the_residual_width_prunable_and_the_rebuild_says_it_is_not_exact(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(2, 3, 32, 32)
    exact = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6)
    reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6, prune_normalized=True)
    assert reg.get_cost().item() == counted_flops(model, x)
    assert reg.grouping.regularized.sum() > exact.grouping.regularized.sum()
    none_alive = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=float("inf"), prune_normalized=True)
    assert none_alive.get_cost().item() == 0.0  # every width, the residual stream's included, can go
    kill_quarter(model, reg, "group_lasso", seed=5)
    with pytest.warns(UserWarning, match=r"not function-preserving: relative output deviation [0-9.e-]+"):
        slim = morphnet.apply_structure(model, reg, x, keep_weights=True)
    assert counted_flops(slim, x) == reg.get_cost().item() < counted_flops(model, x)


def test_prune_normalized_rebuild_that_keeps_the_normalized_channels_is_exact_and_silent(recwarn):
    model = timm_vit(False).eval()
    x = torch.randn(2, 3, 32, 32)
    reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6, prune_normalized=True)
    kill_heads_and_units(model, reg, _heads(model), seed=6, others=False)  # heads only: the residual stays
    slim = morphnet.apply_structure(model, reg, x, keep_weights=True)
    assert not any("not function-preserving" in str(w.message) for w in recwarn)
    assert sum(_heads(slim).values()) < sum(_heads(model).values())
    with torch.no_grad():
        assert torch.allclose(slim.eval()(x), model(x), atol=1e-5)


@pytest.mark.parametrize("name", ["torchvision_vit", "torchvision_swin", "timm_vit_fused", "timm_swin"])
def test_a_block_that_loses_every_head_rebuilds_exactly(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(2, 3, 32, 32)
    reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6)
    first = next(iter(_heads(model)))
    kill_heads_and_units(model, reg, {first: 4 * _heads(model)[first]}, others=False)  # all of its heads
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slim = morphnet.apply_structure(model, reg, x, keep_weights=True)
    kept = _heads(slim)[first]
    if name == "timm_swin":  # its forward infers the head width with -1: one head stays, with a warning
        assert kept == 1 and any("cannot have zero" in str(w.message) for w in caught)
    else:
        assert kept == 0
    with torch.no_grad():
        assert torch.allclose(slim.eval()(x), model(x), atol=1e-5)


class HandWrittenAttention(nn.Module):
    """Heads split by code the attention table does not know: the split is not merged back at once."""

    def __init__(self, heads=4, head_dim=8):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv, self.proj, self.out = nn.Linear(16, 3 * heads * head_dim), nn.Linear(heads * head_dim, 16), \
            nn.Linear(16, 2)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(-1)
        return self.out(self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1)))


def test_heads_split_by_unknown_code_keep_their_width_and_costs_still_count_the_matmuls():
    model = HandWrittenAttention()
    x = torch.randn(2, 5, 16)
    reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6)
    a = reg.analysis
    assert a.fixed_group[a.group_of[a.weights["qkv.weight"].out_ids]].all()
    assert reg.get_cost().item() == counted_flops(model, x)
    assert set(morphnet.StructureExporter(reg).get_alive_counts()) == {"proj"}
