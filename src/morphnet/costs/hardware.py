"""Roofline hardware table: peak compute (GFLOP/s) and memory bandwidth (GB/s).

FLOPs / (GFLOP/s) and bytes / (GB/s) are both nanoseconds. The first eight entries are
the original MorphNet table, kept exactly. Modern entries state the figure used and
where it comes from; register your own device with ``register_hardware``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_compute: float  # GFLOP/s
    memory_bandwidth: float  # GB/s
    gpu: bool = False  # a CUDA GPU: its tensor-core kernels want widths in multiples of 8


HARDWARE: dict[str, Hardware] = {}


def register_hardware(name: str, peak_compute: float, memory_bandwidth: float, *, overwrite: bool = False,
                      gpu: bool = False) -> Hardware:
    """Add a device to the table (GFLOP/s, GB/s; ``gpu=True`` for a CUDA GPU, whose exported widths
    are then rounded to multiples of 8 by default); returns it."""
    if peak_compute <= 0 or memory_bandwidth <= 0:
        raise ValueError(f"hardware '{name}': peak_compute and memory_bandwidth must be positive")
    if name in HARDWARE and not overwrite:
        raise ValueError(f"hardware '{name}' is already registered; pass overwrite=True to replace it")
    hw = Hardware(name, float(peak_compute), float(memory_bandwidth), bool(gpu))
    HARDWARE[name] = hw
    return hw


def get_hardware(hardware: str | Hardware) -> Hardware:
    if isinstance(hardware, Hardware):
        return hardware
    if hardware not in HARDWARE:
        raise ValueError(f"unknown hardware {hardware!r}; known: {', '.join(sorted(HARDWARE))}, 'measured' (timed "
                         f"on your device) or a saved latency table (.json). Add a roofline entry with "
                         f"morphnet.register_hardware(name, peak_gflops, bandwidth_gbps)")
    return HARDWARE[hardware]


# The original MorphNet table (morph_net/network_regularizers/resource_function.py), unchanged.
for _name, _peak, _bw in [
    ("K80", 8740, 480), ("P4", 5500, 192), ("T4", 8100, 300), ("P100", 9300, 732),
    ("V100", 125000, 900), ("TPUv2", 22500, 300),
    ("FLOP_LATENCY", 1, 1e20),  # infinite memory bandwidth: latency = FLOPs
    ("MEMORY_LATENCY", 1e20, 1),  # infinite compute: latency = bytes
]:
    register_hardware(_name, _peak, _bw, gpu=_name in ("K80", "P4", "T4", "P100", "V100"))

# Current GPUs: dense BF16 tensor-core peak (no sparsity), which is what mixed-precision
# training and inference of conv nets use, and HBM / GDDR bandwidth, from NVIDIA's data sheets.
# A100 SXM 80GB: 312 TFLOPS BF16, 2039 GB/s (NVIDIA A100 Tensor Core GPU data sheet).
register_hardware("A100", 312_000, 2039, gpu=True)
# H100 SXM: 989.4 TFLOPS BF16 dense (1979 with sparsity), 3350 GB/s (NVIDIA H100 data sheet).
register_hardware("H100", 989_400, 3350, gpu=True)
# H200 SXM: 989.4 TFLOPS BF16 dense, 4800 GB/s (NVIDIA H200 data sheet).
register_hardware("H200", 989_400, 4800, gpu=True)
# L4: 121 TFLOPS BF16 dense (242 with sparsity), 300 GB/s (NVIDIA L4 data sheet).
register_hardware("L4", 121_000, 300, gpu=True)
# FP32 (no tensor cores) variants for float32 workloads: A100 19.5, H100 SXM 67, L4 30.3 TFLOPS.
register_hardware("A100_FP32", 19_500, 2039, gpu=True)
register_hardware("H100_FP32", 67_000, 3350, gpu=True)
register_hardware("L4_FP32", 30_300, 300, gpu=True)
