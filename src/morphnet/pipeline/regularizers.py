"""Which network regularizer ``--regularizer NAME --target RESOURCE`` builds: a small registry.

A factory takes ``(model, example_inputs, threshold, hardware)`` and returns a network regularizer;
``threshold=None`` means the factory's own default. New families (for example probabilistic
gates) register one factory per resource with :func:`register_regularizer`.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

import morphnet

RegularizerFactory = Callable[[nn.Module, Any, "float | None", "str | None"], Any]
_REGISTRY: dict[str, dict[str, RegularizerFactory]] = {}

#: Resource names of ``--target``, with the unit each one is counted in.
UNITS = {"flops": "FLOPs", "size": "weights", "latency": "ns", "activations": "channels"}


def register_regularizer(name: str, target: str, factory: RegularizerFactory) -> None:
    """Make ``factory`` the regularizer for ``--regularizer name --target target``."""
    if target not in UNITS:
        raise ValueError(f"unknown target '{target}'; known: {', '.join(UNITS)}")
    _REGISTRY.setdefault(name, {})[target] = factory


def regularizer_names() -> list[str]:
    """Names accepted by ``--regularizer``."""
    return sorted(_REGISTRY)


def regularizer_targets(name: str) -> list[str]:
    """The ``--target`` values regularizer ``name`` supports (empty for an unknown name)."""
    return sorted(_REGISTRY.get(name, {}))


def make_regularizer(
    name: str, target: str, model: nn.Module, example_inputs: Any, *,
    threshold: float | None = None, hardware: str | None = None, min_layer_fraction: float = 0.0,
):
    """Build the network regularizer for ``name`` and ``target`` on ``model`` (with a per-layer
    floor of ``min_layer_fraction`` of every layer's width when it is above 0)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown regularizer '{name}'; choose one of {', '.join(regularizer_names())}")
    if target not in _REGISTRY[name]:
        raise ValueError(
            f"regularizer '{name}' has no '{target}' target; it supports {', '.join(sorted(_REGISTRY[name]))}"
        )
    if target == "latency" and not hardware:
        raise ValueError("--target latency needs --hardware NAME (for example V100, T4, H100)")
    reg = _REGISTRY[name][target](model, example_inputs, threshold, hardware)
    if min_layer_fraction:
        reg.set_min_layer_fraction(min_layer_fraction)
    return reg


def _core(class_name: str, threshold_arg: str, default_threshold: float | None, **options: Any) -> RegularizerFactory:
    """A factory for one of morphnet's own regularizer classes (``options`` go to its constructor;
    ``default_threshold=None``: the class's own default)."""

    def build(model: nn.Module, example_inputs: Any, threshold: float | None, hardware: str | None):
        kwargs = {threshold_arg: default_threshold if threshold is None else threshold, **options}
        if "Latency" in class_name:
            kwargs["hardware"] = hardware
        return getattr(morphnet, class_name)(model, example_inputs, **kwargs)

    return build


for _target, _suffix in [("flops", "Flops"), ("size", "ModelSize"), ("latency", "Latency"), ("activations", "Activation")]:
    register_regularizer("gamma", _target, _core(f"Gamma{_suffix}Regularizer", "gamma_threshold", 1e-2))
    # group lasso: the API's default (None), alive above 0.1 x each layer's initial channel-norm scale;
    # --threshold T is relative too (T x that scale), whatever the layer's initialization
    register_regularizer("group-lasso", _target, _core(f"GroupLasso{_suffix}Regularizer", "threshold", None,
                                                       relative_threshold=True))


def _gated(class_name: str) -> RegularizerFactory:
    """A LogisticSigmoid (FiGS) factory: inserts gates into ``model`` (in place) unless it has some."""
    core = _core(class_name, "alive_threshold", 0.1)

    def build(model: nn.Module, example_inputs: Any, threshold: float | None, hardware: str | None):
        if not morphnet.gates.gated_modules(model):
            morphnet.add_gates(model, example_inputs)
        return core(model, example_inputs, threshold, hardware)

    return build


for _target, _suffix in [("flops", "Flops"), ("size", "ModelSize"), ("latency", "Latency")]:
    register_regularizer("logistic-sigmoid", _target, _gated(f"LogisticSigmoid{_suffix}Regularizer"))
