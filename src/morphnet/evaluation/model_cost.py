"""Costs of a whole model with every channel alive: one number, or a per-layer table.

It evaluates a cost program, so it sits in the evaluation stage, above ``costs``."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from morphnet.channels import analyze_model
from morphnet.costs.measured import LatencyTable, resolve_latency_hardware
from morphnet.costs.resources import build_cost_program
from morphnet.evaluation.evaluator import CostEvaluator


def compute_cost(model: nn.Module, example_inputs, resource: str = "flops", hardware=None,
                 batch_size: int | None = None) -> float:
    """Cost of ``model`` per example (FLOPs, weights, ...); latency in ns for a batch of ``batch_size``
    (default 1; a measured table's own batch), on ``hardware``: a roofline entry, ``"measured"`` or a
    table from ``morphnet.measure_latency``."""
    analysis = analyze_model(model, example_inputs)
    if hardware is not None and resource == "latency":
        hardware, batch_size = resolve_latency_hardware(hardware, model=model, example_inputs=example_inputs,
                                                        batch_size=batch_size, analysis=analysis, what="compute_cost")
    elif hardware is not None:
        hardware = None  # only latency reads it
    program = build_cost_program(analysis, resource, hardware=hardware, batch_size=batch_size or 1)
    evaluator = CostEvaluator(program, analysis.group_of, analysis.num_groups)
    cost, _ = evaluator.evaluate(torch.ones(analysis.num_groups, dtype=torch.float64), None)
    return float(cost)


def cost_table(model: nn.Module, example_inputs, hardware="V100", batch_size: int | None = None) -> list[dict]:
    """One row per conv / linear module: FLOPs, weights, latency (ns) on ``hardware`` (a roofline
    entry, ``"measured"`` or a measured table: then the fitted time of the module's conv / linear
    calls), output channels.

    ``prunable`` says whether the layer's output width can change. ``gamma`` says whether a
    BatchNorm scale can prune it: ``"yes"``, ``"uncovered"`` (a BatchNorm reaches its channels
    but some reader sees them raw, so a small scale is no evidence of death) or ``"no"``. A
    last row, named ``(other ops)``, holds the latency of the memory-bound ops (BatchNorm,
    activations, element-wise, pooling, concat) that belong to no conv / linear layer.
    """
    analysis = analyze_model(model, example_inputs)
    hw, batch_size = resolve_latency_hardware(hardware, model=model, example_inputs=example_inputs,
                                              batch_size=batch_size, analysis=analysis, what="cost_table")
    gamma = _gamma_coverage(model, analysis)
    rows: dict[str, dict] = {}
    for info in analysis.weights.values():
        groups = analysis.group_of[info.out_ids]
        fixed = analysis.fixed_group[groups].all()
        n_in, n_out = len(info.in_ids), len(info.out_ids)
        size = info.kernel * n_out if info.depthwise else info.kernel * n_in * n_out // info.groups
        rows[info.module] = {"name": info.module, "flops": 0.0, "size": int(size), "latency_ns": 0.0,
                             "channels": n_out, "prunable": not bool(fixed),
                             "gamma": "yes" if gamma[0][groups].any() else "uncovered" if gamma[1][groups].any()
                             else "no"}
    for call in analysis.layer_calls:
        if analysis.graph.training_only(analysis.graph.nodes[call.node].module) or call.module not in rows:
            continue
        n_in, n_out = len(call.in_ids), len(call.out_ids)
        flops = call.flop_coef * (n_out if call.depthwise else n_in * n_out / call.groups)
        weights = call.kernel * (n_out if call.depthwise else n_in * n_out / call.groups)
        memory = 4 * ((call.in_numel * n_in + call.out_numel * n_out) * batch_size + weights)
        row = rows[call.module]
        row["flops"] += flops
        if not isinstance(hw, LatencyTable):
            row["latency_ns"] += max(flops * batch_size / hw.peak_compute, memory / hw.memory_bandwidth)
    if isinstance(hw, LatencyTable):
        for op, ns in hw.op_latencies(analysis):
            if op.kind in ("conv", "linear") and op.module in rows:
                rows[op.module]["latency_ns"] += ns
    total_latency = compute_cost(model, example_inputs, "latency", hw, batch_size)
    table = sorted(rows.values(), key=lambda r: list(rows).index(r["name"]))
    other = total_latency - sum(r["latency_ns"] for r in table)
    table.append({"name": "(other ops)", "flops": 0.0, "size": 0, "latency_ns": float(np.maximum(other, 0.0)),
                  "channels": 0, "prunable": False, "gamma": "no"})
    return table


def _gamma_coverage(model: nn.Module, analysis) -> tuple[np.ndarray, np.ndarray]:
    """(regularized, uncovered) per group for BatchNorm-scale sources (see ``channels/coverage.py``)."""
    from morphnet.sources import GammaSource, SourceGrouping

    none = np.zeros(analysis.num_groups, dtype=bool)
    try:
        grouping = SourceGrouping(analysis, GammaSource(model, analysis, 0.0))
    except ValueError:  # gated models: gates and BatchNorm scales do not mix
        return none, none
    return grouping.regularized, grouping.uncovered
