"""Stage 4: resource functions (FLOPs, model size, activations, memory, latency) as cost programs."""

from morphnet.costs.hardware import HARDWARE, Hardware, get_hardware, register_hardware
from morphnet.costs.resources import RESOURCES, CostProgram, build_cost_program

__all__ = ["HARDWARE", "Hardware", "get_hardware", "register_hardware", "RESOURCES", "CostProgram",
           "build_cost_program"]
