"""The per-layer and per-attention-module tables of a run's summary: seed, learned and slim widths
side by side (the report and ``format_summary`` print them)."""

from __future__ import annotations

import torch
from torch import nn

import morphnet
from morphnet.surgery.attention import head_counts


def layer_table(seed: nn.Module, slim: nn.Module | None, learned: dict[str, int], example: torch.Tensor) -> list[dict]:
    """Per conv / linear layer: seed, learned and slim widths, seed and slim FLOPs, and the
    layer's share of the slim network's FLOPs (of the seed's when there is no slim network)."""
    seed_rows = [r for r in morphnet.cost_table(seed.cpu(), example) if r.get("channels")]
    slim_rows = {r["name"]: r for r in morphnet.cost_table(slim.cpu(), example)} if slim is not None else {}
    total = sum(r["flops"] for r in (slim_rows.values() if slim is not None else seed_rows)) or 1.0
    table = []
    for row in seed_rows:
        name, thin = row["name"], slim_rows.get(row["name"], {})
        flops = thin.get("flops", 0.0) if slim is not None else row["flops"]
        table.append({"name": name, "seed": row["channels"], "learned": learned.get(name, row["channels"]),
                      "slim": thin.get("channels", 0) if slim is not None else None,
                      "seed_flops": row["flops"], "slim_flops": thin.get("flops", 0.0) if slim is not None else None,
                      "share": flops / total})
    return table


def _block_of(module: str, attention: list[str], regularized: list[str]) -> tuple[str, list[str]]:
    """The block of attention ``module``: its closest ancestor that holds a regularized layer outside
    the module (the MLP of a ViT / BERT block), without holding another attention module; and
    those layers. (The parent and no layers when there is none.)"""

    def inside(name: str, outer: str) -> bool:
        return outer == "" or name.startswith(outer + ".")

    parts = module.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        block = ".".join(parts[:depth])
        if any(inside(other, block) for other in attention if other != module):
            break
        layers = [n for n in regularized if inside(n, block) and n != module and not inside(n, module)]
        if layers:
            return block, layers
    return ".".join(parts[:-1]), []


def attention_table(seed: nn.Module, learned: nn.Module | None, slim: nn.Module | None, seed_widths: dict[str, int],
                    learned_counts: dict[str, int], slim_counts: dict[str, int] | None) -> list[dict]:
    """Per attention module (any module with a head count, see ``morphnet.surgery.attention.head_counts``):
    its block, head width, seed / learned / slim head counts and the widths of the block's other
    regularized layers (its MLP). The counts are read from the models themselves (the seed, the
    learned structure rebuilt, the slim model). Empty for a model without attention."""
    seed_heads = head_counts(seed)
    if not seed_heads:
        return []
    learned_heads = head_counts(learned) if learned is not None else {}
    slim_heads = head_counts(slim) if slim is not None else {}
    table = []
    for module, (heads, head_dim) in seed_heads.items():
        block, layers = _block_of(module, list(seed_heads), list(seed_widths))
        table.append({
            "module": module, "block": block, "head_dim": head_dim, "seed": heads,
            "learned": learned_heads.get(module, (None,))[0], "slim": slim_heads.get(module, (None,))[0],
            "mlp": [{"name": name[len(block) + 1:] if block else name, "seed": seed_widths[name],
                     "learned": learned_counts.get(name, seed_widths[name]),
                     "slim": None if slim_counts is None else slim_counts.get(name, seed_widths[name])}
                    for name in layers],
        })
    return table


def learned_model(seed: nn.Module, counts: dict[str, int], example: torch.Tensor,
                   slim: nn.Module | None = None, slim_counts: dict[str, int] | None = None) -> nn.Module | None:
    """The seed rebuilt with the learned ``counts`` (the slim model when it has them), for reading its
    head counts; None for a model without attention (nothing to read, so nothing rebuilt)."""
    if not head_counts(seed):
        return None
    if slim is not None and slim_counts == counts:
        return slim
    with torch.random.fork_rng(devices=[]):  # its fresh weights must not shift the run's random stream
        return morphnet.apply_structure(seed, counts, example)


