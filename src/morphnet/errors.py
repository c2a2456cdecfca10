"""Errors raised by torch-morphnet."""


class UnsupportedGraphError(ValueError):
    """The model contains an op whose channel semantics the analysis does not know.

    The message names the op and the module it sits in. Put the module behind an
    ``input_boundary`` / ``output_boundary`` to exclude it from the analysis.
    """
