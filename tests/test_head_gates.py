"""Per-head FiGS gates (issue 12): ``add_gates`` puts one logit per attention head on the input of the
output projection, so LogisticSigmoid regularizers learn head counts.

With a random quarter of the head gates forced off, rebuilding with the regularizer and folding the
gates removes exactly those heads, the slim model computes what the gated one does (eval mode), and
FlopCounterMode counts what the regularizer predicts. Small, randomly initialized torchvision and timm
ViTs, timm's Swin, Hugging Face BERT (whose output projection is a sibling of its attention module)
and Llama (grouped-query: one gate per key / value head and its query heads), and
``nn.MultiheadAttention`` in both layouts.
"""

import copy
import warnings

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

import morphnet
from morphnet.gates import GatedMultiheadAttention, LogisticSigmoidHeadGate, gated_modules
from morphnet.gates.gate import ChannelScale
from morphnet.seeds.vit import vit_tiny
from morphnet.surgery.attention import head_counts
from nets import counted_flops


def tv_vit():
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initializes it
    return model, torch.randn(2, 3, 32, 32)


def timm_vit(fused=True):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    nn.init.normal_(model.head.weight)
    return model, torch.randn(2, 3, 32, 32)


def timm_swin():
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=24,
                              depths=(2, 2), num_heads=(2, 4), num_classes=10)
    nn.init.normal_(model.head.fc.weight)
    return model, torch.randn(2, 3, 32, 32)


def hf_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, attn_implementation="eager")
    return transformers.BertModel(config), torch.randint(0, 96, (2, 12))


def hf_llama():
    """Grouped-query attention: 4 query heads of width 8 on 2 key / value heads, one gate per pair."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    return transformers.LlamaModel(config), torch.randint(0, 96, (2, 12))


class MHANet(nn.Module):
    """Self-attention on a prunable stream (no LayerNorm): the residual width is gated too."""

    def __init__(self, batch_first=False):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.out = nn.Linear(32, 5)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.mha(h, h, h, need_weights=False)
        return self.out(torch.relu(a + h))


def mha(batch_first):
    return MHANet(batch_first), torch.randn(2, 6, 8) if batch_first else torch.randn(6, 2, 8)


MODELS = {"torchvision_vit": tv_vit, "timm_vit_fused": lambda: timm_vit(True),
          "timm_vit_unfused": lambda: timm_vit(False), "timm_swin": timm_swin, "hf_bert": hf_bert, "hf_llama": hf_llama,
          "mha": lambda: mha(False), "mha_batch_first": lambda: mha(True)}
HOSTS = {"torchvision_vit": ("encoder.layers.encoder_layer_0.self_attention.out_proj", 4, 16),
         "timm_vit_fused": ("blocks.0.attn.proj", 3, 64), "timm_vit_unfused": ("blocks.0.attn.proj", 3, 64),
         "timm_swin": ("layers.1.blocks.0.attn.proj", 4, 12),
         "hf_bert": ("encoder.layer.0.attention.output.dense", 4, 8),
         "hf_llama": ("layers.0.self_attn.o_proj", 2, 16),
         "mha": ("mha.out_proj", 4, 8), "mha_batch_first": ("mha.out_proj", 4, 8)}


def output(y):
    return y if isinstance(y, torch.Tensor) else y.last_hidden_state


def head_gates(model):
    return {n: g for n, g in gated_modules(model).items() if isinstance(g, LogisticSigmoidHeadGate)}


def kill_quarter_of_heads(model, seed=0):
    """Force a random quarter of every head gate's heads off (head 0 stays: keep_first_channel_alive)."""
    rng = np.random.default_rng(seed)
    killed = {}
    with torch.no_grad():
        for name, gate in head_gates(model).items():
            dead = rng.choice(np.arange(1, gate.num_heads), max(1, gate.num_heads // 4), replace=False)
            gate.logits[torch.as_tensor(dead)] = -20.0
            killed[name.rpartition(".")[0]] = sorted(dead.tolist())
    return killed


# ---- where the gates go -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_gate_per_head_before_the_output_projection(name):
    torch.manual_seed(0)
    model, x = MODELS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every attention module here takes head gates: no fallback warning
        morphnet.add_gates(model, x)
    host, heads, head_dim = HOSTS[name]
    gate = model.get_submodule(host).head_gate
    assert isinstance(gate, LogisticSigmoidHeadGate) and (gate.num_heads, gate.head_dim) == (heads, head_dim)
    assert gate.logits.shape == (heads,) and gate.num_channels == heads * head_dim
    # the q / k / v projections get no per-channel gates: the head gate switches their channels
    projections = ("qkv", "query", "key", "value", "q_proj", "k_proj", "v_proj")
    assert not [n for n in gated_modules(model) if n.endswith(tuple(f"{p}.gate" for p in projections))]
    reg = morphnet.LogisticSigmoidFlopsRegularizer(model, x)
    a = reg.analysis
    assert reg.coverage_summary()["uncovered"] == 0
    for gate_name, gate in head_gates(model).items():
        groups = a.group_of[a.alignments[(f"{gate_name}.logits", 0)]]
        assert len(set(groups.tolist())) == gate.num_heads  # one channel group per logit
        assert reg.grouping.regularized[groups[1:]].all()  # a head is regularized (head 0 stays alive)
        # the head's group: its output-projection columns, its q, k and v rows
        host_weight = a.weights[f"{gate_name.rpartition('.')[0]}.weight"]
        columns = a.group_of[host_weight.in_ids].reshape(gate.num_heads, gate.head_dim)
        assert (columns == groups[:, None]).all()
    assert reg.get_cost().item() == counted_flops(morphnet.remove_gates(copy.deepcopy(model)), x)


def test_multihead_attention_gets_a_forward_that_calls_its_output_projection():
    model, x = mha(False)
    morphnet.add_gates(model, x)
    assert type(model.mha) is GatedMultiheadAttention and isinstance(model.mha, nn.MultiheadAttention)
    assert type(morphnet.remove_gates(model).mha) is nn.MultiheadAttention
    assert not [m for m in model.modules() if m._forward_pre_hooks or m._forward_hooks]


def test_multihead_attention_returning_its_weights_keeps_its_heads_and_class():
    class Weights(MHANet):
        def forward(self, x):
            h = self.inp(x)
            a, w = self.mha(h, h, h)  # weights averaged over heads: the heads stay
            return self.out(torch.relu(a + h)), w

    model = morphnet.add_gates(Weights(), torch.randn(6, 2, 8))
    assert type(model.mha) is nn.MultiheadAttention and not head_gates(model)


def test_heads_false_keeps_per_channel_gates_on_the_qkv_projection():
    model, x = timm_vit()
    morphnet.add_gates(model, x, heads=False)
    assert not head_gates(model) and "blocks.0.attn.qkv.gate" in gated_modules(model)


def test_where_selects_head_gates_by_their_attention_module():
    model, x = timm_vit()
    morphnet.add_gates(model, x, where=r"blocks\.0\.attn$")
    assert sorted(gated_modules(model)) == ["blocks.0.attn.proj.head_gate"]


def test_attention_whose_projection_no_hook_reaches_falls_back_with_a_warning():
    """torchvision's Swin passes its projections' weights to functional code: no head gate."""
    model = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4],
                                               window_size=[4, 4], num_classes=10)
    with pytest.warns(UserWarning, match="'features.1.0.attn'.*no per-head gate.*functional code"):
        morphnet.add_gates(model, torch.randn(2, 3, 32, 32))
    assert not head_gates(model) and gated_modules(model)


def test_heads_read_past_the_gate_stay_alive():
    """timm's attention whose merged heads are also read by functional code that no hook reaches: the
    head gate goes on the projection, but a closed gate does not make the head dead (uncovered)."""
    from timm.layers import Attention

    class Peeking(Attention):
        def forward(self, x, attn_mask=None, is_causal=False):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            heads = (((q * self.scale) @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
            return self.proj(heads) + nn.functional.linear(heads, self.extra.weight)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Peeking(32, num_heads=4)
            self.attn.extra = nn.Linear(32, 32)
            self.norm = nn.LayerNorm(32)
            self.head = nn.Linear(32, 3)

        def forward(self, x):
            return self.head(self.norm(x + self.attn(x)).mean(1))

    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    model = morphnet.add_gates(Net(), x)
    assert sorted(gated_modules(model)) == ["attn.proj.head_gate"]
    with pytest.warns(UserWarning, match="also read where it does not zero them"):
        reg = morphnet.LogisticSigmoidFlopsRegularizer(model, x)
    assert reg.coverage_summary()["uncovered"] == 4 and not reg.grouping.regularized.any()
    with torch.no_grad():
        model.attn.proj.head_gate.logits[2] = -20.0
    model.eval()
    with torch.no_grad():
        want = model(x)
    slim = morphnet.fold_gates(morphnet.apply_structure(model, reg, x, keep_weights=True))
    assert slim.attn.num_heads == 4
    with torch.no_grad():
        assert ((slim.eval()(x) - want).norm() / want.norm()).item() < 1e-6


# ---- the gated forward of nn.MultiheadAttention computes PyTorch's --------------------------------


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("case", ["plain", "cross", "bool_masks", "float_masks", "mask_3d", "causal", "unbatched"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_gated_multihead_attention_matches_pytorch(batch_first, case, need_weights):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=batch_first, dropout=0.2).eval()
    gated = copy.deepcopy(ref)
    gated.__class__ = GatedMultiheadAttention
    n, length, source = 3, 5, 7 if case == "cross" else 5
    q = torch.randn(n, length, 16)
    k = v = q if case != "cross" else torch.randn(n, source, 16)
    kwargs = {}
    if case in ("bool_masks", "float_masks"):
        pad = torch.zeros(n, source, dtype=torch.bool)
        pad[0, -2:] = True
        mask = torch.rand(length, source) < 0.3
        mask[:, 0] = False
        kwargs = {"key_padding_mask": pad, "attn_mask": mask}
        if case == "float_masks":
            kwargs = {k_: torch.zeros(m.shape).masked_fill(m, -1e4) + 0.1 * torch.randn(m.shape)
                      for k_, m in kwargs.items()}
    elif case == "mask_3d":
        kwargs = {"attn_mask": torch.randn(n * 4, length, source)}
    elif case == "causal":
        kwargs = {"attn_mask": torch.ones(length, source, dtype=torch.bool).triu(1), "is_causal": True}
    if case == "unbatched":
        q = k = v = q[0]
    elif not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        if case != "cross":
            k = v = q
    with torch.no_grad():
        want_out, want_w = ref(q, k, v, need_weights=need_weights, **kwargs)
        got_out, got_w = gated(q, k, v, need_weights=need_weights, **kwargs)
    assert torch.allclose(got_out, want_out, atol=1e-5)
    assert (got_w is None) == (want_w is None)
    if want_w is not None:
        assert torch.allclose(got_w, want_w, atol=1e-6)


# ---- a quarter of the heads off: rebuilt exactly, cost as counted ------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_heads_switched_off_are_removed_exactly_and_cost_what_is_predicted(name):
    torch.manual_seed(0)
    model, x = MODELS[name]()
    morphnet.add_gates(model, x)
    reg = morphnet.LogisticSigmoidFlopsRegularizer(model, x)
    full = reg.get_cost().item()
    killed = kill_quarter_of_heads(model)
    original = {host: model.get_submodule(host).weight.detach().clone() for host in killed}
    model.eval()
    with torch.no_grad():
        want = output(model(x))
        ungated = output(morphnet.remove_gates(copy.deepcopy(model)).eval()(x))
    assert ((want - ungated).norm() / want.norm()).item() > 1e-3  # the closed heads did matter
    slim = morphnet.fold_gates(morphnet.apply_structure(model, reg, x, keep_weights=True))
    assert not gated_modules(slim) and head_gates(model)
    assert not [m for m in slim.modules() if type(m) is GatedMultiheadAttention]
    with torch.no_grad():
        got = output(slim.eval()(x))
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    predicted = reg.get_cost().item()
    assert counted_flops(slim, x) == predicted < full
    for host, dead in killed.items():  # exactly the closed heads are gone, the others keep their columns
        gate = model.get_submodule(host).head_gate
        kept = [h for h in range(gate.num_heads) if h not in dead]
        columns = torch.cat([torch.arange(h * gate.head_dim, (h + 1) * gate.head_dim) for h in kept])
        assert torch.equal(slim.get_submodule(host).weight, original[host][:, columns])
    if "hf" not in name:
        heads = head_counts(slim)
        for host, dead in killed.items():
            attention = host.rpartition(".")[0]
            assert heads[attention][0] == model.get_submodule(host).head_gate.num_heads - len(dead)


def test_folding_head_gates_keeps_the_eval_function_and_restores_the_class():
    torch.manual_seed(0)
    model, x = tv_vit()
    morphnet.add_gates(model, x)
    kill_quarter_of_heads(model)
    model.eval()
    with torch.no_grad():
        want = model(x)
        morphnet.fold_gates(model)
        got = model(x)
    assert not gated_modules(model) and not [m for m in model.modules() if m._forward_pre_hooks]
    assert {type(m) for m in model.modules() if isinstance(m, nn.MultiheadAttention)} == {nn.MultiheadAttention}
    assert torch.allclose(got, want, atol=1e-5)


def test_a_hand_placed_head_gate_folds_to_a_scale_of_whole_heads():
    gate = LogisticSigmoidHeadGate(3, 2, channel_dim=-1)
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([1.0, -1.0, 2.0]))
    model = nn.Sequential(nn.Linear(4, 6), gate, nn.Linear(6, 2)).eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        want = model(x)
        folded = morphnet.fold_gates(model)
    assert isinstance(folded[1], ChannelScale)
    assert folded[1].scale.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert torch.allclose(folded(x), want)
    assert "heads=3, head_dim=2" in repr(gate)
    with pytest.raises(ValueError, match="head_dim must be a positive integer"):
        LogisticSigmoidHeadGate(3, 0)


# ---- learning ---------------------------------------------------------------------------------------


def test_learning_switches_heads_off():
    """A few dozen steps with a strong FLOP penalty: some heads close, the rebuilt model has fewer heads,
    computes what the gated one does and costs what the regularizer predicts."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    model = vit_tiny(image_size=16, num_layers=2, hidden_dim=32, mlp_dim=64)
    morphnet.add_gates(model, x[:2], temperature=0.5)
    reg = morphnet.LogisticSigmoidFlopsRegularizer(model, x[:2])
    full = reg.get_cost().item()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(x), y) + 5.0 * reg.get_regularization_term() / full
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    closed = sum(int((g.inference_mask() == 0).sum()) for g in head_gates(model).values())
    assert closed > 0
    with torch.no_grad():
        want = model(x)
    slim = morphnet.fold_gates(morphnet.apply_structure(model, reg, x[:2], keep_weights=True))
    heads = head_counts(slim)
    assert sum(h for h, _ in heads.values()) == 8 - closed and all(h >= 1 for h, _ in heads.values())
    with torch.no_grad():
        assert ((slim.eval()(x) - want).norm() / want.norm()).item() < 1e-4
    assert counted_flops(slim, x[:2]) == reg.get_cost().item() < full
