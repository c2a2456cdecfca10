"""Latency in a run: the measured table every cost of the run shares, and the end-of-run check.

- ``prepare``: with ``--hardware measured`` the latency table is measured once (or reused from the
  cache) on the run's device at ``--latency-batch-size``, by rank 0 and broadcast, and made the table
  that ``hardware="measured"`` means for the rest of the run (learning, rebuild, costs in the summary).
- ``measure_run``: every run ends by timing what it promised: the seed, the slim network and the
  uniform network of the same cost (the seed with every width scaled by one factor; built, not
  trained), in the same interleaved rounds on the run's device and batch size.
- ``notes``: the warnings that go with it (the slim network not faster than the seed; widths that
  are not multiples of 8 on a CUDA target).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

import morphnet
from morphnet.costs.latency_ops import Setting
from morphnet.costs.measured import (MEASURED, LatencyTable, activate, deactivate, describe_source, is_cuda_target,
                                     latency_key)
from morphnet.costs.timing import DeviceTimer, Timer, time_models
from morphnet.pipeline.rebuild import EXPANDABLE, Rebuilt, rebuild

#: Width multiple of tensor-core kernels: the default ``--round-to`` on CUDA targets.
CUDA_ALIGNMENT = 8
#: The timer of the run's measurements, None for the device's own (tests set a synthetic one).
TIMER: Timer | None = None


def prepare(session) -> LatencyTable | None:
    """Measure (or reuse) the run's latency table when ``--hardware measured``; None otherwise."""
    cfg, ctx = session.cfg, session.ctx
    if cfg.hardware != MEASURED:
        return None
    data, table = None, None
    if ctx.is_main:
        seed = session.new_seed().to(ctx.device)
        table = morphnet.measure_latency(seed, session.example.to(ctx.device), batch_size=cfg.latency_batch_size,
                                         timer=TIMER)
        session.log(describe_source(table))
        data = table.to_dict()
    data = ctx.broadcast(data)
    if not ctx.is_main:
        table = LatencyTable.from_dict(data)
    session.latency_token = activate(table)
    session.latency_table = table
    return table


def release(session) -> None:
    """End the run's latency table scope (``prepare``)."""
    token = getattr(session, "latency_token", None)
    if token is not None:
        deactivate(token)
        session.latency_token = None


def round_to_default(hardware: str | None, device: str, finetune: bool) -> int | None:
    """The ``--round-to`` a run gets when none is given: multiples of 8 on a CUDA target (a GPU
    entry of the roofline table, or latency measured on a CUDA device), except with ``--finetune``,
    which keeps the learned widths."""
    if finetune or hardware is None:
        return None
    return CUDA_ALIGNMENT if is_cuda_target(hardware, device) else None


def measure_run(session, summary: dict[str, Any], seed_widths: dict[str, int], slim: nn.Module) -> dict | None:
    """Time the seed, the slim network and the uniform network of the slim network's cost on the run's
    device at ``--latency-batch-size`` (rank 0; None elsewhere or with ``--no-latency-check``)."""
    cfg, ctx = session.cfg, session.ctx
    if not cfg.latency_check or not ctx.is_main:
        return None
    models = {"seed": session.start_seed(), "slim": copy.deepcopy(slim).cpu()}
    uniform = _uniform(session, seed_widths, summary["slim"]["cost"])
    if uniform is not None:
        models["uniform"] = uniform.model
    device, batch = ctx.device, cfg.latency_batch_size
    timer = TIMER or DeviceTimer(device)
    session.log(f"timing the seed, slim and uniform networks on {device} at batch {batch}")
    stats = time_models(models, session.example, device=device, dtype=torch.float32, batch_size=batch, timer=timer)
    key = latency_key(Setting(device, torch.float32, batch))
    out: dict[str, Any] = {"device": key["device_name"], "device_type": device.type, "batch_size": batch,
                           "dtype": "float32", "timing": timer.describe(), "threads": key["threads"]}
    for name, s in stats.items():
        out[name] = {"median_ms": s.median * 1e3, "spread": s.spread, "rounds_ms": [x * 1e3 for x in s.samples]}
    seed_ms = out["seed"]["median_ms"]
    for name in ("slim", "uniform"):
        if name in out and seed_ms > 0:
            out[name]["ratio"] = out[name]["median_ms"] / seed_ms
    if uniform is not None:
        out["uniform"].update(widths=uniform.counts, width_multiplier=uniform.width_multiplier)
    table = getattr(session, "latency_table", None)
    if table is not None:  # the latency model the run learned against, and where it came from
        out["table"] = {"name": table.name, "source": table.source, "path": str(table.path) if table.path else None,
                        "op_shapes": len(table.ops), "timing": table.timing}
    return out


def _uniform(session, seed_widths: dict[str, int], cost: float) -> Rebuilt | None:
    """The seed shrunk by one width multiplier to ``cost`` (the target's unit), freshly initialized."""
    cfg = session.cfg
    if cfg.target not in EXPANDABLE:
        return None
    with torch.random.fork_rng(devices=[]):  # its fresh weights must not shift the run's random stream
        try:
            rebuilt = rebuild(session.new_seed(), seed_widths, session.example, resource=cfg.target, budget=cost,
                              hardware=cfg.hardware, round_to=cfg.round_to, tolerance=None)
        except ValueError as error:
            session.log(f"no uniform network to time: {error}")
            return None
    return rebuilt


def notes(summary: dict[str, Any]) -> list[str]:
    """Warnings about latency: a slim network that is not faster than the seed, and widths that are
    not multiples of 8 on a CUDA target."""
    out = []
    latency = summary.get("latency")
    if latency and "slim" in latency:
        seed, slim = latency["seed"], latency["slim"]
        if slim["median_ms"] >= seed["median_ms"]:
            out.append(f"the slim network is not faster than the seed on {latency['device']} at batch "
                       f"{latency['batch_size']}: {slim['median_ms']:.4g} ms against {seed['median_ms']:.4g} ms "
                       f"(median of {len(seed['rounds_ms'])} rounds, spread {slim['spread']:.0%} / "
                       f"{seed['spread']:.0%}); fewer FLOPs do not make it faster here"
                       + ("" if summary["config"]["target"] == "latency" else
                          ": try --target latency --hardware measured"))
    cfg = summary["config"]
    slim, target = summary.get("slim", {}), summary.get("target", {})
    if cfg["target"] == "latency" and slim.get("target_error") is not None and slim["target_error"] > target["tolerance"]:
        out.append(f"the target latency is out of reach: the slim network is predicted {slim['target_error']:.0%} above "
                   f"it, at {slim['cost'] / summary['seed']['cost']:.2f}x the seed, with widths of "
                   f"x{slim.get('width_multiplier') or 0:.3g}; what does not shrink with the widths (per-op fixed "
                   f"costs, the rest of the network) is most of the latency here: ask for a higher --target-cost or "
                   f"time a larger --latency-batch-size")
    widths = slim.get("widths") or {}
    if is_cuda_target(cfg.get("hardware"), cfg.get("device")) and widths:
        odd = sorted(name for name, w in widths.items() if w % CUDA_ALIGNMENT)
        if odd:
            out.append(f"{len(odd)} of {len(widths)} widths of the slim network are not multiples of "
                       f"{CUDA_ALIGNMENT} ({', '.join(odd[:3])}{', ...' if len(odd) > 3 else ''}); CUDA's "
                       f"tensor-core kernels run such widths slower: rebuild with --round-to {CUDA_ALIGNMENT}")
    return out


def cost_hardware(cfg, model: nn.Module, example) -> tuple[Any, str]:
    """``morphnet cost``: the hardware of its latency column and what the header says about it."""
    if cfg.hardware != MEASURED:
        hardware = cfg.hardware or "V100"
        return hardware, f"latency_ns on {hardware}{'' if cfg.hardware else ' (the default; --hardware to change)'}"
    from morphnet.pipeline.distributed import resolve_device

    device = resolve_device(cfg.device)
    table = morphnet.measure_latency(model.to(device), example.to(device), batch_size=cfg.latency_batch_size,
                                     timer=TIMER)
    model.cpu()
    return table, f"latency_ns {table.name}; {describe_source(table)}"


__all__ = ["prepare", "release", "measure_run", "notes", "round_to_default", "cost_hardware"]
