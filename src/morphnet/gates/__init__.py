"""Probabilistic gating (FiGS): gates, their channel handler, their source, insertion and folding.

``add_gates`` puts a ``LogisticSigmoidGate`` after every prunable layer of a model (and a
``LogisticSigmoidHeadGate``, one logit per head, before the output projection of attention
whose heads the analysis prunes), the LogisticSigmoid regularizers
(``morphnet.regularizers.logistic_sigmoid``) penalize the gates' masks weighted by cost, and
``fold_gates`` / ``remove_gates`` take them out again before rebuilding. Importing this package
registers the gates' channel handlers.
"""

from morphnet.gates import handler  # noqa: F401  (registers the gate's channel handler)
from morphnet.gates.gate import ChannelScale, LogisticSigmoidGate, LogisticSigmoidHeadGate
from morphnet.gates.heads import GatedMultiheadAttention
from morphnet.gates.insert import add_gates, fold_gates, gated_modules, remove_gates
from morphnet.gates.source import LogisticSigmoidSource

__all__ = ["LogisticSigmoidGate", "LogisticSigmoidHeadGate", "ChannelScale", "GatedMultiheadAttention", "add_gates",
           "remove_gates", "fold_gates", "gated_modules", "LogisticSigmoidSource"]
