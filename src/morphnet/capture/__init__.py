"""Stage 1: turn ``model`` + ``example_inputs`` into a graph of aten ops with shapes and owners."""

from morphnet.capture.graph import Graph, LeafOp, OpNode, Value, capture_graph

__all__ = ["Graph", "LeafOp", "OpNode", "Value", "capture_graph"]
