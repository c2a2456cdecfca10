"""Stage 7: the end-to-end MorphNet job on top of the public ``morphnet`` API.

``run_pipeline(RunConfig(...))`` learns the structure, rebuilds the slim network, retrains it and
the seed with the same recipe, evaluates both and writes a report; the ``morphnet`` CLI is a thin
layer over these functions.
"""

from morphnet.pipeline.config import RunConfig
from morphnet.pipeline.files import RunExists
from morphnet.pipeline.controller import StrengthController, select_candidate
from morphnet.pipeline.regularizers import make_regularizer, register_regularizer, regularizer_names
from morphnet.pipeline.cost import cost_only, cost_report
from morphnet.pipeline.run import learn_only, rebuild_only, run_pipeline

__all__ = [
    "RunConfig",
    "RunExists",
    "StrengthController",
    "cost_only",
    "cost_report",
    "learn_only",
    "make_regularizer",
    "rebuild_only",
    "register_regularizer",
    "regularizer_names",
    "run_pipeline",
    "select_candidate",
]
