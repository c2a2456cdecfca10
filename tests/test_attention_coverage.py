"""Killed attention heads: group lasso proves them dead only where their zeros reach every reader.

The coverage pass (``channels/coverage.py``) follows a head's zeros through the packed q/k/v
projection (its bias too), the split into heads, q.k^T, softmax, attn x v (unfused ``bmm`` or a fused
kernel) and the merge into the output projection. The property: whatever is killed (whole heads,
only q, k or v rows, rows without their bias, single rows), the model rebuilt with
``keep_weights=True`` computes what the killed original computes. The unit tests pin the rules:
a head is dead where its v is zero, not where only q or k is.
"""

import warnings

import numpy as np
import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import morphnet
from morphnet.channels import analyze_model
from morphnet.channels.coverage import covered_groups, view_positions
from morphnet.channels.handlers import attention as attention_table
from nets import assert_most_examples_pruned, weight_count


class VResidual(timm.layers.Attention):
    """timm attention whose v is also read past the attention (``attn @ v + v``)."""

    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v + v).transpose(1, 2).reshape(b, n, self.attn_dim))


class QkvSide(timm.layers.Attention):
    """timm attention whose packed q/k/v output is also read by another layer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.side = nn.Linear(3 * self.attn_dim, self.attn_dim)

    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, _ = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj(y) + self.side(qkv)


class Net(nn.Module):
    """embed -> attention (+ residual) -> out; ``kind`` picks the attention."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.embed = nn.Linear(6, 16)
        if kind.startswith("mha"):
            self.attn = nn.MultiheadAttention(16, 4, batch_first=kind == "mha_batch_first")
        elif kind == "v_residual":
            self.attn = VResidual(16, 4, qkv_bias=True)
        elif kind == "qkv_side":
            self.attn = QkvSide(16, 4, qkv_bias=True)
        else:
            self.attn = timm.layers.Attention(16, 4, qkv_bias=True, gated=kind == "timm_gated")
            self.attn.fused_attn = kind in ("timm_fused", "timm_fused_kernel")
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        if self.kind == "mha":  # sequence first, with a causal mask
            h = h.transpose(0, 1)
            mask = torch.ones(h.shape[0], h.shape[0], dtype=torch.bool).triu(1)
            h = h + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
            return self.out(h.mean(0))
        if self.kind == "mha_batch_first":
            return self.out((h + self.attn(h, h, h, need_weights=False)[0]).mean(1))
        if self.kind == "timm_fused_kernel" and h.abs().sum().item() < 0:  # data-dependent: captured for real,
            h = -h  # so the fused CPU attention kernel is recorded, not its decomposition
        return self.out((h + self.attn(h)).mean(1))


KINDS = ("mha", "mha_batch_first", "timm_fused", "timm_fused_kernel", "timm_unfused", "timm_gated", "v_residual",
         "qkv_side")
PARTS = ("head", "rows_only", "q", "k", "v", "v_rows", "qk", "none")


def _qkv(model):
    attn = model.attn
    if isinstance(attn, nn.MultiheadAttention):
        return attn.in_proj_weight, attn.in_proj_bias, attn.num_heads
    return attn.qkv.weight, attn.qkv.bias, attn.num_heads


def kill_heads(model, choices, rng):
    """Per head, zero the q/k/v rows (and biases) that ``choices`` names; also a few single rows."""
    weight, bias, heads = _qkv(model)
    width = weight.shape[0] // 3
    d = width // heads
    with torch.no_grad():
        for h, part in enumerate(choices):
            rows = {"head": "qkv", "rows_only": "qkv", "q": "q", "k": "k", "v": "v", "v_rows": "v",
                    "qk": "qk", "none": ""}[part]
            for which in rows:
                at = slice("qkv".index(which) * width + h * d, "qkv".index(which) * width + (h + 1) * d)
                weight[at] = 0
                if part not in ("rows_only", "v_rows"):
                    bias[at] = 0
            gate = getattr(model.attn, "gate", None)
            if part == "head" and gate is not None:  # the gate's rows of the head are in its group too
                gate.weight[h * d:(h + 1) * d] = 0
                gate.bias[h * d:(h + 1) * d] = 0
        single = torch.as_tensor(rng.random(weight.shape[0]) < 0.05)
        weight[single] = 0


def rebuild(kind, choices, seed):
    torch.manual_seed(seed)
    model = Net(kind).eval()
    with torch.no_grad():
        for m in model.modules():  # biases that are not zero by accident
            for name in ("bias", "in_proj_bias"):
                b = getattr(m, name, None)
                if isinstance(b, torch.Tensor):
                    b.copy_(torch.randn(b.shape) * 0.3)
    x = torch.randn(2, 5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6)
        kill_heads(model, choices, np.random.default_rng(seed))
        slim = morphnet.apply_structure(model, reg, x, keep_weights=True).eval()
    with torch.no_grad():
        want, got = model(x), slim(x)
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-5, f"{kind} {choices}: relative error {err:.2e}"
    return model, reg, slim


def test_killed_heads_never_rebuild_to_another_function():
    """Heads killed in part rightly stay, so "most examples prune" counts the examples with a whole
    head killed (keeping every head would also give the same function)."""
    pruned = []

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(st.sampled_from(KINDS), st.lists(st.sampled_from(PARTS), min_size=4, max_size=4), st.integers(0, 1000))
    def check(kind, choices, seed):
        model, _, slim = rebuild(kind, choices, seed)
        if "head" in choices:
            pruned.append(weight_count(slim) < weight_count(model))

    check()
    assert_most_examples_pruned(pruned)


@pytest.mark.parametrize("kind", KINDS)
def test_whole_heads_are_removed_and_heads_killed_in_part_stay(kind):
    choices = ["head", "rows_only", "q", "v_rows"]
    model, reg, slim = rebuild(kind, choices, seed=3)
    # only the first head is dead: the second outputs its bias, the third its k and v, the fourth its v bias
    assert slim.attn.num_heads == 3, (kind, reg.coverage_summary())


def test_rows_whose_bias_lives_on_keep_their_head():
    """nn.MultiheadAttention adds in_proj_bias after the product: the head stays alive through it."""
    model, reg, slim = rebuild("mha_batch_first", ["rows_only"] * 4, seed=5)
    assert slim.attn.num_heads == 4
    assert reg.analysis.biases["attn.in_proj_weight"] == "attn.in_proj_bias"
    with torch.no_grad():
        model.attn.in_proj_bias.zero_()
    assert morphnet.StructureExporter(reg).get_alive_counts()["attn"] == 0


class SeparateProjections(nn.Module):
    """Heads from separate q / k / v projections (each its own zero point)."""

    def __init__(self, heads=4, d=4, fused=False):
        super().__init__()
        self.heads, self.head_dim, self.fused = heads, d, fused
        self.q, self.k, self.v = (nn.Linear(8, heads * d) for _ in range(3))
        self.o = nn.Linear(heads * d, 8)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.fused and x.abs().sum().item() >= 0:  # data-dependent: the fused CPU kernel is captured
            y = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            y = ((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5).softmax(-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


class Outer(nn.Module):
    def __init__(self, fused):
        super().__init__()
        self.attn = SeparateProjections(fused=fused)

    def forward(self, x):
        return self.attn(x)


@pytest.fixture(params=[False, True], ids=["bmm", "fused_kernel"])
def separate_heads(monkeypatch, request):
    key = f"{SeparateProjections.__module__}.{SeparateProjections.__qualname__}"
    monkeypatch.setitem(attention_table.ATTENTION_MODULES, key, lambda m: m.head_dim)
    model = Outer(request.param)
    x = torch.randn(2, 5, 8)
    a = analyze_model(model, x)
    assert any("flash_attention" in n.name for n in a.graph.nodes) == request.param
    return model, x, a


@pytest.mark.parametrize("zeroed,dead", [("v", True), ("q", False), ("k", False), ("qk", False), ("qkv", True)])
def test_a_head_is_dead_where_its_v_is_zero_not_where_its_q_or_k_is(separate_heads, zeroed, dead):
    model, x, a = separate_heads
    heads = a.group_of[a.weights["attn.q.weight"].out_ids]
    assert len(set(heads.tolist())) == 4 and not a.fixed_group[heads].any()
    points = [v for p in zeroed for v in a.zero_points[f"attn.{p}.weight"]]
    assert covered_groups(a, points)[heads].all() == dead
    # and the function agrees: a head whose v is zero can be sliced away, one with only q zero cannot
    with torch.no_grad():
        for p in zeroed:
            layer = getattr(model.attn, p)
            layer.weight[:4] = 0
            layer.bias[:4] = 0
        want = model(x)
        for p in "qkv":
            layer = getattr(model.attn, p)
            layer.weight.data, layer.bias.data = layer.weight[4:].clone(), layer.bias[4:].clone()
        model.attn.o.weight.data = model.attn.o.weight[:, 4:].clone()
        model.attn.heads = 3
        got = model(x)
    assert torch.allclose(got, want, atol=1e-6) == dead


class Contracted(nn.Module):
    """Channels contracted between two activations (no heads): a @ b^T."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(5, 2)

    def forward(self, x):
        return self.o(self.a(x) @ self.b(x).transpose(1, 2))


def test_a_contracted_channel_is_read_only_where_both_sides_are_non_zero():
    model, x = Contracted(), torch.randn(2, 5, 6)
    a = analyze_model(model, x)
    groups = a.group_of[a.weights["a.weight"].out_ids]
    assert (groups == a.group_of[a.weights["b.weight"].out_ids]).all() and not a.fixed_group[groups].any()
    assert not covered_groups(a, [])[groups].any()
    for side in ("a", "b"):  # zero on one side: the channel adds nothing to a @ b^T, whatever the other holds
        assert covered_groups(a, a.zero_points[f"{side}.weight"])[groups].all()
    with torch.no_grad():
        model.a.weight[:3] = 0
        model.a.bias[:3] = 0
        want = model(x)
        got = model.o(model.a(x)[..., 3:] @ model.b(x)[..., 3:].transpose(1, 2))
    assert torch.allclose(got, want, atol=1e-6)


def test_a_split_view_is_followed_by_position_not_by_element_id():
    # [.., 3 * 8] -> [.., 3, 2, 4] with the head dim (2) carrying: head h holds q, k and v entries of h
    where = view_positions((5, 24), (5, 3, 2, 4), 1, 2)
    assert where.shape == (2, 12)
    assert sorted(where[0].tolist()) == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]
    merged = view_positions((5, 2, 4), (5, 8), 1, 1)  # heads merged back: each entry comes from one head
    assert merged[:, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert view_positions((4, 6), (4, 2, 3), 0, 2) is None  # not reshaped together: no claim
    for old, new, dim, out_dim in (((4, 6), (6, 4), 0, 1), ((2, 12, 5), (2, 3, 4, 5), 1, 2),
                                   ((6, 2, 4), (12, 4), 1, 0)):  # against the elements themselves
        where = view_positions(old, new, dim, out_dim)
        index = torch.arange(old[dim]).reshape([-1 if d == dim else 1 for d in range(len(old))]).expand(old)
        landed = index.reshape(new).movedim(out_dim, 0)
        assert [set(w.tolist()) for w in where] == [set(r.flatten().tolist()) for r in landed]
