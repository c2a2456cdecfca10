"""Whole-model and per-layer costs, measured with the public regularizers.

A group-lasso regularizer with threshold 0 counts every channel whose weights are not all zero as
alive, which is every channel of a freshly built network, so its ``get_cost`` is the cost of the
network as it stands, and ``get_cost(modules=[name])`` the share of one layer.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_COUNTERS = {
    "flops": "GroupLassoFlopsRegularizer",
    "size": "GroupLassoModelSizeRegularizer",
    "latency": "GroupLassoLatencyRegularizer",
    "activation": "GroupLassoActivationRegularizer",
}


def _counter(model: nn.Module, example_inputs: Any, resource: str, hardware: str | None):
    import morphnet

    if resource not in _COUNTERS:
        raise ValueError(f"unknown resource '{resource}'; known: {', '.join(_COUNTERS)}")
    kwargs: dict[str, Any] = {"threshold": 0.0}
    if resource == "latency":
        if not hardware:
            raise ValueError("latency needs --hardware NAME (for example V100, T4, H100)")
        kwargs["hardware"] = hardware
    return getattr(morphnet, _COUNTERS[resource])(model, example_inputs, **kwargs)


def model_cost(model: nn.Module, example_inputs: Any, resource: str = "flops", hardware: str | None = None) -> float:
    """The cost of ``model`` with all its channels: FLOPs per example, weights, latency (ns) or activations."""
    return float(_counter(model, example_inputs, resource, hardware).get_cost())


def cost_table(model: nn.Module, example_inputs: Any, hardware: str | None = None) -> list[dict[str, Any]]:
    """One row per convolution / linear layer: name, output channels, FLOPs, weights and, with
    ``hardware``, roofline latency in ns (that of the layer's own op only)."""
    resources = ["flops", "size"] + (["latency"] if hardware else [])
    counters = {r: _counter(model, example_inputs, r, hardware) for r in resources}
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            channels = module.out_channels
        elif isinstance(module, nn.Linear):
            channels = module.out_features
        else:
            continue
        row = {"name": name, "channels": channels}
        for resource, counter in counters.items():
            key = "latency_ns" if resource == "latency" else resource
            row[key] = float(counter.get_cost([name]))
        rows.append(row)
    return rows
