"""Stage 1: turn ``model`` + ``example_inputs`` into a graph of aten ops with shapes and owners."""

from morphnet.capture.graph import Graph, OpNode, Value, capture_graph

__all__ = ["Graph", "OpNode", "Value", "capture_graph"]
