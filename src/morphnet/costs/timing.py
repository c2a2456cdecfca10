"""Timing ops and whole models on a device: warm-up, interleaved rounds, medians and their spread.

A *timer* takes a list of ``TimingCase``s and returns one ``TimingStats`` per case. Each case
allocates its own tensors when built (``build()`` returns the call to time), so only one case's
tensors are alive at a time, whatever the batch size. ``DeviceTimer`` is the real one: every case
is warmed up, then timed once per round, the rounds going through all cases in a new shuffled
order, so load that drifts over the measurement hits every case alike; a sample is the mean of
enough back-to-back calls to last ``min_seconds``; a case's time is the median of its samples and
its spread (slowest - fastest sample) / median. On CUDA every sample is bracketed by events and
synchronized. Tests pass a timer that computes synthetic times from ``TimingCase.info`` instead.
"""

from __future__ import annotations

import copy
import math
import random
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn


@dataclass
class TimingCase:
    """One thing to time: ``build()`` allocates its inputs and returns the call to time; ``info``
    says what it is (kind, widths), for reports and for synthetic timers."""

    build: Callable[[], Callable[[], Any]]
    info: dict = field(default_factory=dict)


@dataclass
class TimingStats:
    """Seconds per call: the median over rounds, the spread (max - min) / median and every round's sample."""

    median: float
    spread: float
    samples: list[float]

    @classmethod
    def of(cls, samples: list[float]) -> "TimingStats":
        mid = float(statistics.median(samples))
        spread = (max(samples) - min(samples)) / mid if mid > 0 else 0.0
        return cls(mid, spread, [float(s) for s in samples])


class Timer(Protocol):
    def measure(self, cases: list[TimingCase]) -> list[TimingStats]: ...

    def describe(self) -> dict: ...


class DeviceTimer:
    """Times cases on ``device`` (see the module docstring); ``seed`` fixes the shuffled order."""

    def __init__(self, device: torch.device | str = "cpu", *, warmup: int = 3, rounds: int = 5,
                 min_seconds: float = 5e-4, max_calls: int = 1000, seed: int = 0):
        if rounds < 1 or warmup < 0 or min_seconds < 0 or max_calls < 1:
            raise ValueError("DeviceTimer: rounds and max_calls must be >= 1, warmup and min_seconds >= 0")
        self.device = torch.device(device)
        self.warmup, self.rounds, self.min_seconds, self.max_calls = warmup, rounds, min_seconds, max_calls
        self.seed = seed

    def describe(self) -> dict:
        return {"timer": "device", "warmup_calls": self.warmup, "rounds": self.rounds,
                "min_seconds_per_sample": self.min_seconds,
                "statistic": "median over rounds of the mean time per call in a round",
                "spread": "(slowest - fastest round) / median", "order": "shuffled every round",
                "clock": "CUDA events, synchronized" if self.device.type == "cuda" else "time.perf_counter"}

    def measure(self, cases: list[TimingCase]) -> list[TimingStats]:
        rng = random.Random(self.seed)
        calls: list[int | None] = [None] * len(cases)
        samples: list[list[float]] = [[] for _ in cases]
        order = list(range(len(cases)))
        with _timing_context(self.device):
            for _ in range(self.rounds):
                rng.shuffle(order)
                for i in order:
                    run = cases[i].build()
                    if calls[i] is None:
                        for _ in range(self.warmup):
                            run()
                        once = self._time(run, 1)
                        calls[i] = max(1, min(self.max_calls, math.ceil(self.min_seconds / max(once, 1e-9))))
                    else:
                        run()  # fresh tensors: one call to bring them into cache, as in the network
                    samples[i].append(self._time(run, calls[i]))
                    del run
        return [TimingStats.of(s) for s in samples]

    def _time(self, run: Callable[[], Any], calls: int) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            for _ in range(calls):
                run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
        start_time = time.perf_counter()
        for _ in range(calls):
            run()
        return (time.perf_counter() - start_time) / calls


@contextmanager
def _timing_context(device: torch.device) -> Iterator[None]:
    """Inference mode, and on CPU denormals flushed to zero: an op replayed in place many times
    (``x.mul_(0.5)``) would otherwise reach denormal numbers and time 10-100x slower than in the model."""
    flushed = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        with torch.inference_mode():
            yield
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def batched_inputs(example_inputs, batch_size: int, device: torch.device, dtype: torch.dtype,
                   channels_last: bool = False) -> tuple:
    """``example_inputs`` as a tuple with its first example repeated ``batch_size`` times (every
    tensor whose first dim is the batch of the first tensor), moved to ``device``; floating
    tensors cast to ``dtype`` and, with ``channels_last``, 4-D ones in that memory format."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    batch = tensors[0].shape[0] if tensors and tensors[0].dim() else None
    out = []
    for t in inputs:
        if isinstance(t, torch.Tensor):
            if batch is not None and t.dim() and t.shape[0] == batch:
                t = t[:1].expand(batch_size, *t.shape[1:])
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).contiguous()
            if channels_last and t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
        out.append(t)
    return tuple(out)


def prepared_model(model: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool = False) -> nn.Module:
    """A copy of ``model`` in eval mode on ``device`` and ``dtype`` (and channels_last), for timing."""
    model = copy.deepcopy(model).eval().to(device=device, dtype=dtype)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def model_case(model: nn.Module, inputs: tuple, name: str = "model") -> TimingCase:
    """A whole forward of ``model`` (prepared with ``prepared_model``) on ``inputs``."""
    return TimingCase(build=lambda: (lambda: model(*inputs)), info={"kind": "model", "name": name})


def time_models(models: dict[str, nn.Module], example_inputs, *, device=None, dtype: torch.dtype = torch.float32,
                batch_size: int = 1, channels_last: bool = False, timer: Timer | None = None) -> dict[str, TimingStats]:
    """Forward latency of each model (eval mode, inference mode) at ``batch_size``, timed in the
    same interleaved rounds so that they are comparable: ``{name: TimingStats}`` in seconds."""
    device = torch.device(device or "cpu")
    timer = timer or DeviceTimer(device)
    inputs = batched_inputs(example_inputs, batch_size, device, dtype, channels_last)
    cases = [model_case(prepared_model(m, device, dtype, channels_last), inputs, name) for name, m in models.items()]
    return dict(zip(models, timer.measure(cases)))
