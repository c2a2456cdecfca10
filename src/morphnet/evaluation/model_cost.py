"""Costs of a whole model with every channel alive: one number, or a per-layer table.

It evaluates a cost program, so it sits in the evaluation stage, above ``costs``."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from morphnet.channels import analyze_model
from morphnet.costs.hardware import get_hardware
from morphnet.costs.resources import build_cost_program
from morphnet.evaluation.evaluator import CostEvaluator


def compute_cost(model: nn.Module, example_inputs, resource: str = "flops", hardware=None,
                 batch_size: int = 1) -> float:
    """Cost of ``model`` per example (FLOPs, weights, ...; latency in ns for ``batch_size``)."""
    analysis = analyze_model(model, example_inputs)
    program = build_cost_program(analysis, resource, hardware=get_hardware(hardware) if hardware else None,
                                 batch_size=batch_size)
    evaluator = CostEvaluator(program, analysis.group_of, analysis.num_groups)
    cost, _ = evaluator.evaluate(torch.ones(analysis.num_groups, dtype=torch.float64), None)
    return float(cost)


def cost_table(model: nn.Module, example_inputs, hardware="V100", batch_size: int = 1) -> list[dict]:
    """One row per conv / linear module: FLOPs, weights, roofline latency (ns), output channels.

    ``prunable`` says whether the layer's output width can change. A last row, named
    ``(other ops)``, holds the latency of the memory-bound ops (BatchNorm, activations,
    element-wise, pooling, concat) that belong to no conv / linear layer.
    """
    analysis = analyze_model(model, example_inputs)
    hw = get_hardware(hardware)
    rows: dict[str, dict] = {}
    for info in analysis.weights.values():
        fixed = analysis.fixed_group[analysis.group_of[info.out_ids]].all()
        n_in, n_out = len(info.in_ids), len(info.out_ids)
        size = info.kernel * n_out if info.depthwise else info.kernel * n_in * n_out // info.groups
        rows[info.module] = {"name": info.module, "flops": 0.0, "size": int(size), "latency_ns": 0.0,
                             "channels": n_out, "prunable": not bool(fixed)}
    for call in analysis.layer_calls:
        if analysis.graph.training_only(analysis.graph.nodes[call.node].module) or call.module not in rows:
            continue
        n_in, n_out = len(call.in_ids), len(call.out_ids)
        flops = call.flop_coef * (n_out if call.depthwise else n_in * n_out / call.groups)
        weights = call.kernel * (n_out if call.depthwise else n_in * n_out / call.groups)
        memory = 4 * ((call.in_numel * n_in + call.out_numel * n_out) * batch_size + weights)
        row = rows[call.module]
        row["flops"] += flops
        row["latency_ns"] += max(flops * batch_size / hw.peak_compute, memory / hw.memory_bandwidth)
    total_latency = compute_cost(model, example_inputs, "latency", hw, batch_size)
    table = sorted(rows.values(), key=lambda r: list(rows).index(r["name"]))
    other = total_latency - sum(r["latency_ns"] for r in table)
    table.append({"name": "(other ops)", "flops": 0.0, "size": 0, "latency_ns": float(np.maximum(other, 0.0)),
                  "channels": 0, "prunable": False})
    return table
