"""Hugging Face GPT-2 with ``prune_normalized=True``: its residual width (``n_embd``: the token and position
embeddings, every block's LayerNorms and output projections, the final LayerNorm and the tied LM head) is
prunable. A rebuild that removes a random quarter of the regularized groups, residual channels among them,
agrees with itself on every width, costs what the regularizer predicted, runs and generates, warns with
its deviation, and differs from the original only by the LayerNorms' statistics: with the mean and the
variance taken over the original width again (the removed channels as zeros), it is the same function.
"""

import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import morphnet  # noqa: E402
from morphnet.surgery.attention import head_counts  # noqa: E402
from nets import counted_flops, kill_groups, random_dead_groups  # noqa: E402

WIDTH, HEAD_DIM = 48, 12


def _gpt2(attn: str):
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=WIDTH, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return transformers.GPT2LMHeadModel(config).eval(), torch.randint(0, 64, (2, 12))


def _original_statistics(self, h):
    """LayerNorm with the mean and variance over the original width (the removed channels count as zeros)."""
    mean = h.sum(-1, keepdim=True) / WIDTH
    square = (h - mean).pow(2).sum(-1, keepdim=True) + (WIDTH - h.shape[-1]) * mean.pow(2)
    return (h - mean) * torch.rsqrt(square / WIDTH + self.eps) * self.weight + self.bias


def _layer_norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_rebuilt_without_some_residual_channels_agrees_on_widths_and_differs_only_by_the_statistic(attn):
    torch.manual_seed(0)
    model, x = _gpt2(attn)
    full = counted_flops(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6, prune_normalized=True)
    a = reg.analysis
    assert reg.get_cost().item() == full
    residual = a.group_of[a.alignments[("transformer.ln_f.weight", 0)]]
    assert len(set(residual.tolist())) == WIDTH and reg.grouping.regularized[residual].all()
    assert len(a.normalized) == 5  # ln_1 and ln_2 of both blocks, ln_f
    for name in ("transformer.wte.weight", "transformer.wpe.weight"):  # the embeddings start the residual width
        assert np.array_equal(a.group_of[a.alignments[(name, 1)]], residual)
    assert all(np.array_equal(a.group_of[ids], residual) for ids in a.normalized)

    dead, _ = random_dead_groups(reg, 0)
    killed = torch.as_tensor(dead[residual])
    assert 0 < killed.sum() < WIDTH // 2
    kill_groups(model, reg, dead, 0)
    with torch.no_grad():  # what no source zeroes: the embeddings' columns, the LayerNorms' scale and shift
        # (a removed channel's LayerNorm output, shift - scale * mean / std, is no statistic of the kept ones)
        model.transformer.wte.weight[:, killed] = 0  # tied: the LM head's columns too
        model.transformer.wpe.weight[:, killed] = 0
        for norm in _layer_norms(model):
            norm.weight[killed] = 0
            norm.bias[killed] = 0
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.warns(UserWarning, match=r"GPT2LMHeadModel is not function-preserving: "
                                         r"relative output deviation (?P<d>[0-9.e-]+)") as record:
        slim = morphnet.apply_structure(model, reg, x, keep_weights=True).eval()
    deviation = float(next(str(r.message) for r in record if "deviation" in str(r.message))
                      .split("deviation ")[1].split(" ")[0])
    with torch.no_grad():
        want = model(x).logits
        measured = ((slim(x).logits - want).norm() / want.norm()).item()
    assert deviation == pytest.approx(measured, rel=1e-2) and deviation > 1e-3

    # widths: the config and every module agree
    width = WIDTH - int(killed.sum())
    t = slim.transformer
    assert slim.config.n_embd == slim.config.hidden_size == t.embed_dim == width and model.config.n_embd == WIDTH
    assert t.wte.weight.shape == (64, width) and t.wte.embedding_dim == width
    assert t.wpe.weight.shape == (32, width) and t.wpe.embedding_dim == width
    assert slim.lm_head.weight is t.wte.weight  # still tied: one tensor
    assert slim.lm_head.in_features == width and slim.config.tie_word_embeddings
    norms = _layer_norms(slim)
    assert len(norms) == 5 and all(m.normalized_shape == m.weight.shape == m.bias.shape == (width,) for m in norms)
    heads = []
    for block in t.h:
        attn_module = block.attn
        assert attn_module.c_attn.weight.shape[0] == attn_module.c_attn.nx == attn_module.embed_dim == width
        assert attn_module.c_attn.nf == 3 * attn_module.split_size == 3 * attn_module.num_heads * HEAD_DIM
        assert attn_module.head_dim == HEAD_DIM
        assert attn_module.c_proj.weight.shape == (attn_module.split_size, width) == (attn_module.c_proj.nx,
                                                                                      attn_module.c_proj.nf)
        assert block.mlp.c_fc.weight.shape == (width, block.mlp.c_fc.nf) == (width, block.mlp.c_proj.nx)
        assert block.mlp.c_proj.nf == width
        heads.append(attn_module.num_heads)
    assert sum(heads) < 8 and all(h >= 1 for h in heads)
    assert [h for h, _ in head_counts(slim).values()] == heads

    # cost: the slim model's counted FLOPs are the predicted ones, and its own analysis says so too
    assert counted_flops(slim, x) == reg.get_cost().item() < full
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = morphnet.GroupLassoFlopsRegularizer(slim, x, threshold=0.0, prune_normalized=True)
    assert again.get_cost().item() == reg.get_cost().item()

    # it runs and generates
    with torch.no_grad():
        tokens = slim.generate(x[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert tokens.shape == (1, 9)

    # with the original statistics, the original function
    for norm in _layer_norms(slim):
        norm.forward = types.MethodType(_original_statistics, norm)
    with torch.no_grad():
        got = slim(x).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    with torch.no_grad():  # and the same tokens
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(slim.generate(x[:1, :4], **kw), model.generate(x[:1, :4], **kw))


def test_the_original_statistics_stand_in_is_layer_norm_on_the_full_width():
    """The test's LayerNorm with the original statistics is torch's LayerNorm when nothing was removed,
    and equals it on the zero-padded input when channels were."""
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(WIDTH)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    h = torch.randn(3, WIDTH)
    assert torch.allclose(_original_statistics(norm, h), norm(h), atol=1e-5)
    keep = torch.arange(WIDTH) % 4 != 0
    padded = torch.where(keep, h, 0.0)
    small = torch.nn.LayerNorm(int(keep.sum()))
    with torch.no_grad():
        small.weight.copy_(norm.weight[keep])
        small.bias.copy_(norm.bias[keep])
    want = F.layer_norm(padded, (WIDTH,), norm.weight, norm.bias, norm.eps)[:, keep]
    assert torch.allclose(_original_statistics(small, h[:, keep]), want, atol=1e-5)
