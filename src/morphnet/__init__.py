"""torch-morphnet: MorphNet for PyTorch.

Learn how wide each layer of a network should be under a resource budget: add a
cost-weighted sparsity penalty to the training loss, export the alive channels as JSON,
rebuild the slimmer network and retrain it.
"""

from morphnet.control import TargetCost, TargetMissedWarning
from morphnet.costs.hardware import Hardware, register_hardware
from morphnet.costs.measured import LatencyTable, measure_latency, set_uniform_shrink
from morphnet.errors import UnsupportedGraphError
from morphnet.evaluation import compute_cost, cost_table
from morphnet.export import StructureExporter
from morphnet.gates import LogisticSigmoidGate, add_gates, fold_gates, remove_gates
from morphnet.monitoring import write_summaries
from morphnet.regularizers import (
    GammaActivationRegularizer, GammaFlopsRegularizer, GammaLatencyRegularizer, GammaModelSizeRegularizer,
    GroupLassoActivationRegularizer, GroupLassoFlopsRegularizer, GroupLassoLatencyRegularizer,
    GroupLassoModelSizeRegularizer, NetworkRegularizer, ProximalStep,
)
from morphnet.regularizers.logistic_sigmoid import (
    LogisticSigmoidFlopsRegularizer, LogisticSigmoidLatencyRegularizer, LogisticSigmoidModelSizeRegularizer,
)
from morphnet.surgery import (
    apply_structure, expand_structure, find_width_multiplier, fit_to_budget, load_slim, save_slim,
)

__version__ = "0.1.0"

# a recipe on top of the names above (it imports them), so it comes last
from morphnet.recipes import compress, recalibrate_batchnorm  # noqa: E402
from morphnet.recipes.compress import shrink_uniformly as _shrink_uniformly  # noqa: E402

set_uniform_shrink(_shrink_uniformly)  # measured latency's second calibration point: the uniform half

__all__ = [
    "UnsupportedGraphError", "NetworkRegularizer", "ProximalStep",
    "GammaFlopsRegularizer", "GroupLassoFlopsRegularizer", "GammaModelSizeRegularizer",
    "GroupLassoModelSizeRegularizer", "GammaLatencyRegularizer", "GroupLassoLatencyRegularizer",
    "GammaActivationRegularizer", "GroupLassoActivationRegularizer",
    "LogisticSigmoidFlopsRegularizer", "LogisticSigmoidModelSizeRegularizer", "LogisticSigmoidLatencyRegularizer",
    "LogisticSigmoidGate", "add_gates", "remove_gates", "fold_gates",
    "StructureExporter", "TargetCost", "TargetMissedWarning", "write_summaries", "register_hardware", "Hardware",
    "compute_cost", "cost_table", "measure_latency", "LatencyTable",
    "apply_structure", "expand_structure", "find_width_multiplier", "fit_to_budget", "save_slim", "load_slim",
    "compress", "recalibrate_batchnorm",
]
