"""LogisticSigmoid (FiGS) network regularizers: cost-weighted penalties on probabilistic gates.

The source is every ``LogisticSigmoidGate`` of the model (insert them with
``morphnet.add_gates``): its sampled mask (``regularize_on_mask=True``) or its probability
sigmoid(logit) is the regularization vector; a channel is alive when the mask
(``mask_as_alive_vector=True``) or the probability is >= ``alive_threshold``. Channels tied
together combine as 1 - prod(1 - p), the probability that at least one of them is on.
Costs, exporter and rebuild are those of every other regularizer::

    morphnet.add_gates(model, x)                      # before creating the optimizer
    reg = morphnet.LogisticSigmoidFlopsRegularizer(model, x)
    ...                                               # loss + strength * reg.get_regularization_term()
    model.eval()                                      # alive = the gates' inference masks
    same = morphnet.fold_gates(morphnet.apply_structure(model, reg, x, keep_weights=True))
    fresh = morphnet.apply_structure(morphnet.remove_gates(model), counts, x)   # to retrain from scratch

In training mode the alive channels follow the masks sampled in the last forward pass (as
in the original), so exported counts fluctuate where gates are undecided.

Attention heads: ``add_gates`` gives each attention module whose heads the analysis prunes one
``LogisticSigmoidHeadGate`` (a logit per head, on the output projection's input), so a head is
one entry of the vector: its penalty is its probability (or mask) times the head's cost (q, k, v
rows, output-projection columns, its share of the attention products), and the learned
structure keeps or drops whole heads.
"""

from __future__ import annotations

from morphnet.gates.source import LogisticSigmoidSource
from morphnet.regularizers.network import NetworkRegularizer


class _LogisticSigmoid(NetworkRegularizer):
    source_name = "LogisticSigmoid"

    def __init__(self, model, example_inputs, *, regularize_on_mask: bool = True, alive_threshold: float = 0.1,
                 mask_as_alive_vector: bool = True, **kw):
        if not 0.0 <= alive_threshold <= 1.0:
            raise ValueError(f"alive_threshold must be in [0, 1], got {alive_threshold}")
        self.regularize_on_mask = regularize_on_mask
        self.alive_threshold = alive_threshold
        self.mask_as_alive_vector = mask_as_alive_vector
        super().__init__(model, example_inputs, **kw)

    def _make_source(self, model):
        return LogisticSigmoidSource(model, self.analysis, alive_threshold=self.alive_threshold,
                                     regularize_on_mask=self.regularize_on_mask,
                                     mask_as_alive_vector=self.mask_as_alive_vector)

    def _no_source_message(self) -> str:
        return (super()._no_source_message() + " LogisticSigmoid regularizers penalize LogisticSigmoidGate modules: "
                "insert them with morphnet.add_gates(model, example_inputs) before building the regularizer (and "
                "before creating the optimizer, so that it trains the gates).")


class LogisticSigmoidFlopsRegularizer(_LogisticSigmoid):
    """Probabilistic gates weighted by FLOPs."""

    def __init__(self, model, example_inputs, regularize_on_mask: bool = True, alive_threshold: float = 0.1,
                 mask_as_alive_vector: bool = True, **kw):
        super().__init__(model, example_inputs, regularize_on_mask=regularize_on_mask, alive_threshold=alive_threshold,
                         mask_as_alive_vector=mask_as_alive_vector, resource="flops", **kw)


class LogisticSigmoidModelSizeRegularizer(_LogisticSigmoid):
    """Probabilistic gates weighted by weight count."""

    def __init__(self, model, example_inputs, regularize_on_mask: bool = True, alive_threshold: float = 0.1,
                 mask_as_alive_vector: bool = True, **kw):
        super().__init__(model, example_inputs, regularize_on_mask=regularize_on_mask, alive_threshold=alive_threshold,
                         mask_as_alive_vector=mask_as_alive_vector, resource="size", **kw)


class LogisticSigmoidLatencyRegularizer(_LogisticSigmoid):
    """Probabilistic gates weighted by latency on ``hardware`` (as ``GammaLatencyRegularizer``)."""

    def __init__(self, model, example_inputs, hardware, batch_size: int | None = None, regularize_on_mask: bool = True,
                 alive_threshold: float = 0.1, mask_as_alive_vector: bool = True, **kw):
        super().__init__(model, example_inputs, regularize_on_mask=regularize_on_mask, alive_threshold=alive_threshold,
                         mask_as_alive_vector=mask_as_alive_vector, resource="latency", hardware=hardware,
                         batch_size=batch_size, **kw)
