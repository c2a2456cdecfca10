"""Stage 4: resource functions (FLOPs, model size, activations, memory, latency) as cost programs;
latency from a roofline entry or measured on the device."""

from morphnet.costs.hardware import HARDWARE, Hardware, get_hardware, register_hardware
from morphnet.costs.measured import LatencyTable, is_cuda_target, measure_latency, resolve_latency_hardware
from morphnet.costs.resources import RESOURCES, CostProgram, build_cost_program

__all__ = ["HARDWARE", "Hardware", "get_hardware", "register_hardware", "RESOURCES", "CostProgram",
           "build_cost_program", "LatencyTable", "measure_latency", "resolve_latency_hardware", "is_cuda_target"]
