"""Monitoring helpers (TensorBoard summaries), as the original recommends."""

from morphnet.monitoring.summaries import write_summaries

__all__ = ["write_summaries"]
