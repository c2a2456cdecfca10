"""Cross-attention: ``nn.MultiheadAttention`` whose query is not its key / value projects them with parts of
its packed weight (``w.split([E, 2E])`` or ``w.chunk(3)``, then one ``F.linear`` each). Those parts are
the parameter's own rows: its heads are groups, costs equal FlopCounterMode's, a quarter of the heads
killed then removed gives the same function, and the slim model (``SlimMultiheadAttention``, whose
cross-attention reads ``chunk(3)`` parts) costs what was predicted and is analysed and pruned again.

A parameter cut elsewhere keeps the width of the dim it is cut along (the sizes are constants in the
code), except into equal ``chunk(n)`` parts, which follow a narrowed parameter; a part read in a way
the analysis does not follow keeps the parameter whole.
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nets import counted_flops, kill_groups, random_dead_groups
from test_attention import kill_heads_and_units
from torch import nn

import morphnet
from morphnet.channels import analyze_model
from morphnet.surgery.attention import SlimMultiheadAttention


class Decoder(nn.Module):
    """Self-attention over the target, cross-attention to a memory (key is value, or a distinct value)."""

    def __init__(self, batch_first: bool, distinct_value: bool, width: int = 32, heads: int = 4):
        super().__init__()
        self.memory = nn.Linear(8, width)
        self.target = nn.Linear(8, width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=batch_first)
        self.cross = nn.MultiheadAttention(width, heads, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(width, 64), nn.GELU(), nn.Linear(64, width))
        self.head = nn.Linear(width, 5)
        self.distinct_value = distinct_value

    def forward(self, x, m):
        mem = self.memory(m)
        h = self.target(x)
        h = h + self.self_attn(h, h, h, need_weights=False)[0]
        value = torch.relu(mem) if self.distinct_value else mem
        h = h + self.cross(h, mem, value, need_weights=False)[0]
        return self.head(h + self.mlp(h))


def _inputs(batch_first: bool):
    x, m = torch.randn(2, 6, 8), torch.randn(2, 9, 8)
    return (x, m) if batch_first else (x.transpose(0, 1).contiguous(), m.transpose(0, 1).contiguous())


def _reg(model, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return morphnet.GroupLassoFlopsRegularizer(model, inputs, threshold=1e-6)


def _head_groups(reg, module: str) -> list[int]:
    a = reg.analysis
    return sorted(set(a.group_of[a.weights[f"{module}.in_proj_weight"].out_ids].tolist()))


def _rebuild_exactly(model, reg, inputs, modules, seed):
    """Kill a quarter of the heads of ``modules`` (at least one each) and of the other groups; the rebuilt
    model computes the same function and its counted FLOPs are the predicted cost."""
    kill_heads_and_units(model, reg, {m: model.get_submodule(m).num_heads for m in modules}, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slim = morphnet.apply_structure(model, reg, inputs, keep_weights=True).eval()
    with torch.no_grad():
        want, got = model(*inputs), slim(*inputs)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert counted_flops(slim, *inputs) == reg.get_cost().item() < counted_flops(model, *inputs)
    return slim


@pytest.mark.parametrize("distinct_value", [False, True], ids=["key_is_value", "distinct_value"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
def test_cross_attention_heads_are_pruned_exactly_and_the_slim_model_costs_what_was_predicted(batch_first,
                                                                                              distinct_value):
    torch.manual_seed(0)
    model, inputs = Decoder(batch_first, distinct_value).eval(), _inputs(batch_first)
    reg = _reg(model, inputs)
    assert reg.get_cost().item() == counted_flops(model, *inputs)
    a = reg.analysis
    for module in ("self_attn", "cross"):  # one group per head, regularized (the bias goes with its rows)
        groups = _head_groups(reg, module)
        assert len(groups) == 4 and reg.grouping.regularized[groups].all()
        assert a.biases[f"{module}.in_proj_weight"] == f"{module}.in_proj_bias"
    # the memory's width is read by the key / value rows: the same columns as the query's
    columns = a.alignments[("cross.in_proj_weight", 1)]
    assert np.array_equal(a.group_of[columns], a.group_of[a.weights["memory.weight"].out_ids])

    slim = _rebuild_exactly(model, reg, inputs, ("self_attn", "cross"), 0)
    assert isinstance(slim.cross, SlimMultiheadAttention) and slim.cross.num_heads < 4
    assert slim.cross.in_proj_weight.shape[0] == 3 * slim.cross.num_heads * slim.cross.head_dim

    # the slim model is analysed like its seed: exact costs, its heads again groups, pruned again
    again = _reg(slim, inputs)
    assert again.get_cost().item() == reg.get_cost().item() == counted_flops(slim, *inputs)
    for module in ("self_attn", "cross"):
        groups = _head_groups(again, module)
        assert len(groups) == slim.get_submodule(module).num_heads and again.grouping.regularized[groups].all()
    slimmer = _rebuild_exactly(slim, again, inputs, ("cross",), 1)
    assert slimmer.cross.num_heads < slim.cross.num_heads


def test_a_transformer_decoder_layer_prunes_the_heads_of_both_attentions_exactly():
    torch.manual_seed(0)
    model = nn.TransformerDecoderLayer(32, 4, dim_feedforward=64, batch_first=True).eval()
    inputs = (torch.randn(2, 6, 32), torch.randn(2, 9, 32))
    reg = _reg(model, inputs)
    assert reg.get_cost().item() == counted_flops(model, *inputs)
    for module in ("self_attn", "multihead_attn"):
        groups = _head_groups(reg, module)
        assert len(groups) == 4 and reg.grouping.regularized[groups].all()
    slim = _rebuild_exactly(model, reg, inputs, ("self_attn", "multihead_attn"), 0)
    assert slim.multihead_attn.num_heads < 4
    assert _reg(slim, inputs).get_cost().item() == counted_flops(slim, *inputs)


class Halves(nn.Module):
    """One parameter, two linear layers: its rows cut by ``cut`` (constant sizes, or ``chunk(2)``)."""

    def __init__(self, cut: str):
        super().__init__()
        self.inp = nn.Linear(8, 12)
        self.weight = nn.Parameter(torch.randn(16, 12) * 0.3)
        self.bias = nn.Parameter(torch.randn(16) * 0.1)
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)
        self.cut = cut

    def forward(self, x):
        h = torch.relu(self.inp(x))
        if self.cut == "chunk":
            (w1, w2), (b1, b2) = self.weight.chunk(2), self.bias.chunk(2)
        elif self.cut == "split":
            (w1, w2), (b1, b2) = self.weight.split(8), self.bias.split(8)
        else:
            w1, w2, b1, b2 = self.weight[:8], self.weight[8:], self.bias[:8], self.bias[8:]
        return self.a(torch.relu(F.linear(h, w1, b1))) + self.b(torch.relu(F.linear(h, w2, b2)))


@pytest.mark.parametrize("cut", ["split", "slice"])
def test_a_parameter_cut_at_constant_sizes_keeps_the_width_of_that_dim(cut):
    torch.manual_seed(0)
    model, x = Halves(cut).eval(), torch.randn(3, 8)
    reg = _reg(model, x)
    a = reg.analysis
    assert reg.get_cost().item() == counted_flops(model, x)
    assert a.fixed_group[a.group_of[a.alignments[("weight", 0)]]].all()
    assert not a.fixed_group[a.group_of[a.alignments[("weight", 1)]]].any()  # its columns still follow inp
    dead, _ = random_dead_groups(reg, 0, fraction=0.5)
    kill_groups(model, reg, dead, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slim = morphnet.apply_structure(model, reg, x, keep_weights=True).eval()
    assert slim.weight.shape[0] == 16 and slim.weight.shape[1] < 12
    with torch.no_grad():
        assert torch.allclose(slim(x), model(x), atol=1e-6)
    assert counted_flops(slim, x) == reg.get_cost().item()


def test_a_parameter_cut_into_equal_chunks_narrows_every_chunk_alike():
    torch.manual_seed(0)
    model, x = Halves("chunk").eval(), torch.randn(3, 8)
    reg = _reg(model, x)
    a = reg.analysis
    rows = a.group_of[a.alignments[("weight", 0)]]
    assert np.array_equal(rows[:8], rows[8:]) and reg.grouping.regularized[rows].all()
    assert a.biases["weight"] == "bias" and np.array_equal(a.group_of[a.alignments[("bias", 0)]], rows)
    dead, _ = random_dead_groups(reg, 0)
    assert dead[rows].any()
    kill_groups(model, reg, dead, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slim = morphnet.apply_structure(model, reg, x, keep_weights=True).eval()
    assert slim.weight.shape[0] == 2 * slim.a.in_features == 2 * (8 - int(dead[rows[:8]].sum()))
    with torch.no_grad():
        assert torch.allclose(slim(x), model(x), atol=1e-6)
    assert counted_flops(slim, x) == reg.get_cost().item() < counted_flops(model, x)


def test_a_part_of_a_parameter_read_otherwise_keeps_the_parameter_whole():
    class Peek(Halves):
        def forward(self, x):
            w1, w2 = self.weight.chunk(2)
            return self.a(torch.relu(F.linear(torch.relu(self.inp(x)), w1))) * w2.abs().mean()

    torch.manual_seed(0)
    model, x = Peek("chunk").eval(), torch.randn(3, 8)
    a = analyze_model(model, x)  # (the mean of a part changes if the part narrows)
    assert "weight" in a.opaque_states and a.fixed_group[a.group_of[a.alignments[("weight", 0)]]].all()
