"""Hugging Face models built from small configs (nothing downloaded): costs equal FlopCounterMode's,
a random quarter of the regularized groups killed then removed computes the same function, and a causal
LM rebuilt from its structure still generates the same tokens.

All four prune attention heads (their attention classes are in the table): BERT's and ViT's, GPT-2's
(its packed q / k / v projection split by a size attribute the rebuild updates) and Llama's grouped-query
heads (a key / value head with the query heads that read it), and their MLP widths.
"""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import morphnet  # noqa: E402
from nets import counted_flops, kill_groups, random_dead_groups  # noqa: E402


def bert(attn):
    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, attn_implementation=attn)
    return transformers.BertModel(config), torch.randint(0, 96, (2, 12))


def vit(attn):
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, attn_implementation=attn)
    return transformers.ViTModel(config), torch.randn(2, 3, 32, 32)


def gpt2(attn):
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return transformers.GPT2LMHeadModel(config), torch.randint(0, 96, (2, 12))


def llama(attn):
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return transformers.LlamaForCausalLM(config), torch.randint(0, 96, (2, 12))


MODELS = {"bert": bert, "vit": vit, "gpt2": gpt2, "llama": llama}
HEADS = {"bert": ("self.query.weight", 4), "vit": ("attention.q_proj.weight", 4),
         "llama": ("self_attn.q_proj.weight", 2), "gpt2": ("attn.c_attn.weight", 4)}
# the query weight, and its groups per layer (Llama: one per key / value head)


def _query_widths(model):
    """Query widths of the attention modules (head width 8)."""
    widths = []
    for m in model.modules():
        if type(m).__name__ == "GPT2Attention":
            widths.append(m.c_attn.weight.shape[1] // 3)  # Conv1D: [in, out], out = q, k and v
        elif type(m).__name__ in ("BertSelfAttention", "ViTAttention", "LlamaAttention"):
            widths.append((m.query if hasattr(m, "query") else m.q_proj).weight.shape[0])
    return widths


def _heads(model):
    """Head counts of BERT's and ViT's attention modules, as their forward sees them."""
    return [m.num_attention_heads for m in model.modules()
            if type(m).__name__ in ("BertSelfAttention", "ViTAttention")]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_small_hf_models_cost_exactly_and_rebuild_to_the_same_function(name, attn):
    torch.manual_seed(0)
    model, x = MODELS[name](attn)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6)
    assert reg.get_cost().item() == counted_flops(model, x)
    counts = morphnet.StructureExporter(reg).get_alive_counts()
    assert any("mlp" in n or "intermediate" in n for n in counts), sorted(counts)
    dead, _ = random_dead_groups(reg, 0)
    if name in HEADS:  # one group per head (Llama: per key / value head), regularized
        a = reg.analysis
        suffix, count = HEADS[name]
        for query in (w for w in a.weights if w.endswith(suffix)):
            groups = a.group_of[a.weights[query].out_ids]
            assert len(set(groups.tolist())) == count and reg.grouping.regularized[groups].all()
            dead[groups] = False
            dead[groups[0]] = True  # one head of every layer (none loses all: GPT-2 would keep one, unpriced)
    kill_groups(model, reg, dead, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slim = morphnet.apply_structure(model, reg, x, keep_weights=True).eval()
    with torch.no_grad():
        want, got = model(x)[0], slim(x)[0]
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert counted_flops(slim, x) == reg.get_cost().item() < counted_flops(model, x)
    if name in HEADS:
        assert _query_widths(model) == [32, 32] and sum(_query_widths(slim)) < 64
    if name in ("bert", "vit"):
        assert _query_widths(slim) == [8 * h for h in _heads(slim)]
    if name == "gpt2":
        assert [m.split_size for m in slim.modules() if hasattr(m, "split_size")] == _query_widths(slim)
    if name == "llama":  # a key / value head goes with both of its query heads
        attn = [m for m in slim.modules() if type(m).__name__ == "LlamaAttention"]
        assert [2 * m.k_proj.weight.shape[0] for m in attn] == [m.q_proj.weight.shape[0] for m in attn]
    if name in ("gpt2", "llama"):  # a causal LM rebuilt from a structure still generates, the same tokens
        prompt = x[:1, :4]
        with torch.no_grad():
            kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert torch.equal(slim.generate(prompt, **kw), model.generate(prompt, **kw))


def test_a_gpt2_block_that_loses_every_head_keeps_one_and_the_same_function():
    torch.manual_seed(0)
    model, x = gpt2("eager")
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6)
    a = reg.analysis
    dead = a.group_of[a.weights["transformer.h.0.attn.c_attn.weight"].out_ids]
    mask = torch.zeros(a.num_groups, dtype=torch.bool).numpy()
    mask[dead] = True
    kill_groups(model, reg, mask, 0)
    with pytest.warns(UserWarning, match="cannot have zero"):
        slim = morphnet.apply_structure(model, reg, x, keep_weights=True).eval()
    assert [m.num_heads for m in slim.modules() if hasattr(m, "split_size")] == [1, 4]
    with torch.no_grad():
        want, got = model(x)[0], slim(x)[0]
        assert ((got - want).norm() / want.norm()).item() < 1e-5
        kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(slim.generate(x[:1, :4], **kw), model.generate(x[:1, :4], **kw))
