"""Stage 5: evaluate cost programs and regularization terms with a fixed number of tensor ops."""

from morphnet.evaluation.evaluator import CostEvaluator

__all__ = ["CostEvaluator"]
