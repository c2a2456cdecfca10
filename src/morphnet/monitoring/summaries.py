"""Write the regularization loss, the cost and alive counts to a TensorBoard SummaryWriter."""

from __future__ import annotations


def write_summaries(writer, regularizer, step: int, *, alive_counts: bool = False) -> dict[str, float]:
    """Log ``RegularizationLoss`` and the cost under ``regularizer.cost_name``; returns the values.

    With ``alive_counts=True`` also logs ``alive/<module>`` for every regularized layer.
    """
    values = {
        "RegularizationLoss": float(regularizer.get_regularization_term().detach()),
        regularizer.cost_name: float(regularizer.get_cost()),
    }
    for tag, value in values.items():
        writer.add_scalar(tag, value, step)
    if alive_counts:
        for name, count in regularizer.alive_counts().items():
            writer.add_scalar(f"alive/{name}", count, step)
    return values
