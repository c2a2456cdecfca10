"""Stage 5: evaluate cost programs and regularization terms with a fixed number of tensor ops, and
the costs of a whole model with every channel alive."""

from morphnet.evaluation.evaluator import CostEvaluator
from morphnet.evaluation.model_cost import compute_cost, cost_table

__all__ = ["CostEvaluator", "compute_cost", "cost_table"]
