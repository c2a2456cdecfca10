"""The target-cost controller lives in :mod:`morphnet.control`; these names stay importable here."""

from morphnet.control.strength import Candidate, StrengthController, resolve_target, select_candidate

__all__ = ["Candidate", "StrengthController", "resolve_target", "select_candidate"]
