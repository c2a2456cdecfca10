"""Target-cost control on top of the public regularizer API: steer the regularization strength so
the learned structure lands on a cost budget, in the pipeline or in any training loop."""

from morphnet.control.strength import Candidate, StrengthController, resolve_target, select_candidate
from morphnet.control.target_cost import TargetCost, TargetMissedWarning

__all__ = ["Candidate", "StrengthController", "TargetCost", "TargetMissedWarning", "resolve_target", "select_candidate"]
