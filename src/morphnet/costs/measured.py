"""Latency measured on the device: a table of per-op fits that stands in for a roofline entry.

``measure_latency(model, example_inputs)`` times every op of the inference network on the device,
dtype, batch size and memory format in use, at a few widths (``costs/latency_ops.py``), and fits
each op's latency in the form the cost program already has: ``c0 + c_in A_in + c_out A_out + c_io
A_in A_out`` for convs and linears, ``c0 + k x`` for attention products (x: alive heads) and
data-moving ops (x: elements read and written), non-negative least squares weighted by 1/t. The
rest of the network (views, Python between ops, ops that cannot be replayed) is one constant, and
the ops' sum carries one scale (what an op timed alone is worth inside the network): both from two
whole-model timings, the model and its uniform half (``whole = scale x ops + rest``).

The ``LatencyTable`` it returns is usable wherever a hardware name is (``hardware=table``, or
``hardware="measured"``, which measures or reuses the cached table): its cost program is a sum of
constants, linear and bilinear terms like the FLOPs program, so the term stays a fixed number of
batched ops and its gradient has the FLOPs program's form. Tables are saved as JSON, cached per key
(device name, dtype, batch size, memory format, torch version, CPU threads) in
``$MORPHNET_LATENCY_CACHE`` (default ``~/.cache/morphnet/latency``) and reused only for that key;
they grow as other models' ops are measured. An op is keyed by its signature, not by its layer,
so a slim network rebuilt from the seed finds its ops in the seed's table.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import itertools
import json
import logging
import os
import platform
import statistics
import time
from contextvars import ContextVar, Token
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from morphnet.channels import ChannelAnalysis, analyze_model
from morphnet.costs.hardware import Hardware, get_hardware
from morphnet.costs.latency_ops import (FRACTIONS, Setting, TimedOp, group_mask, layer_case_call, layer_widths, moved,
                                        replay_call, timed_ops)
from morphnet.costs.resources import COMPUTE, CostProgram
from morphnet.costs.timing import DeviceTimer, TimingCase, Timer, time_models

logger = logging.getLogger("morphnet.latency")
#: A whole-model timing whose rounds differ by more than this (relative to their median) is flagged as busy.
BUSY_SPREAD = 0.5

FORMAT = "morphnet-latency-table"
VERSION = 1
CACHE_ENV = "MORPHNET_LATENCY_CACHE"
#: What ``hardware="measured"`` means; a path ending in .json is a saved table.
MEASURED = "measured"


class LatencyTable:
    """Per-op latency fits measured on one device, dtype, batch size and memory format (the ``key``),
    with how they were timed. Pass it as ``hardware=`` to any latency cost; save it with ``save``.

    ``source`` says where it came from ("measured", "cache" or "cache, extended") and ``path`` where
    it is cached. Latency is in nanoseconds for the whole batch.
    """

    def __init__(self, key: dict, timing: dict | None = None, ops: dict | None = None, models: dict | None = None,
                 created: str | None = None):
        self.key = dict(key)
        self.timing = dict(timing or {})
        self.ops: dict[str, dict] = dict(ops or {})
        self.models: dict[str, dict] = dict(models or {})
        self.created = created or _now()
        self.source = "measured"
        self.path: Path | None = None

    # ---- what it describes ------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return int(self.key["batch_size"])

    @property
    def device_type(self) -> str:
        return self.key["device"]

    @property
    def is_cuda(self) -> bool:
        """Measured on a CUDA device: widths should be multiples of 8 there."""
        return self.device_type == "cuda"

    @property
    def name(self) -> str:
        return (f"measured on {self.key['device_name']} ({self.key['device']}, {self.key['dtype']}, batch "
                f"{self.batch_size}, {self.key['memory_format']})")

    def __repr__(self) -> str:
        return f"LatencyTable({self.name}, {len(self.ops)} op shapes, {self.source})"

    # ---- files ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "key": self.key, "timing": self.timing, "created": self.created,
                "updated": _now(), "ops": self.ops, "models": self.models}

    @classmethod
    def from_dict(cls, data: dict) -> "LatencyTable":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (save one with LatencyTable.save or morphnet.measure_latency)")
        if data.get("version") != VERSION:
            raise ValueError(f"latency table version {data.get('version')} is not {VERSION}; measure it again")
        return cls(data["key"], data.get("timing"), data.get("ops"), data.get("models"), data.get("created"))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON (atomically); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"latency table '{path}' does not exist; measure one with morphnet.measure_latency "
                             "or hardware='measured'")
        try:
            table = cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as error:
            raise ValueError(f"latency table '{path}' is not valid JSON ({error}); delete it and measure again") from None
        table.source, table.path = "file", path
        return table

    # ---- costs ------------------------------------------------------------------------------
    def missing(self, a: ChannelAnalysis, ops: list[TimedOp] | None = None) -> list[TimedOp]:
        """Ops of the analyzed model this table has no fit for (or one measured on narrower widths)."""
        return [op for op in (ops if ops is not None else timed_ops(a)) if not self._covers(op)]

    def _covers(self, op: TimedOp) -> bool:
        entry = self.ops.get(op.signature)
        return entry is not None and _extent_within(_extent(op), entry.get("extent"))

    def cost_program(self, a: ChannelAnalysis, batch_size: int | None = None) -> CostProgram:
        """The cost program of the analyzed model in nanoseconds: every op's fitted terms, and the
        rest of the network as a constant."""
        if batch_size is not None and batch_size != self.batch_size:
            raise ValueError(f"this latency table was measured at batch {self.batch_size}, not {batch_size}; pass "
                             f"batch_size={self.batch_size} or measure at batch {batch_size}")
        ops = timed_ops(a)
        missing = self.missing(a, ops)
        if missing:
            names = ", ".join(f"{op.kind} in '{op.module or '(top level)'}'" for op in missing[:3])
            raise ValueError(f"the latency table ({self.name}) has no timing for {len(missing)} op(s) of this model "
                             f"({names}{', ...' if len(missing) > 3 else ''}); measure this model with "
                             "morphnet.measure_latency(model, example_inputs, ...) or hardware='measured'")
        p = CostProgram()
        scale = self.op_scale(a)
        for op in ops:
            entry = self.ops[op.signature]
            if entry["form"] == "unmeasured":
                continue  # its time is in the rest of the network
            layer = p.layer(op.module)
            c = [scale * v for v in entry["coef"]]
            p.const.append((layer, COMPUTE, c[0]))
            if entry["form"] == "bilinear":
                x, y = p.set_of(op.call.in_ids), p.set_of(op.call.out_ids)
                p.linear += [(layer, COMPUTE, c[1], x, -1), (layer, COMPUTE, c[2], y, -1)]
                p.bilinear.append((layer, COMPUTE, c[3], x, y))
            elif entry["form"] == "linear":
                for ids, weight in op.uses:
                    if ids is None:
                        p.const.append((layer, COMPUTE, c[1] * weight))
                    else:
                        p.linear.append((layer, COMPUTE, c[1] * weight, p.set_of(ids), p.set_of(op.z)))
        p.const.append((p.layer(""), COMPUTE, self.rest_ns(a, ops)))
        return p

    def op_latencies(self, a: ChannelAnalysis) -> list[tuple[TimedOp, float]]:
        """Every timed op of the analyzed model with its predicted latency (ns) at full width."""
        ops, scale = timed_ops(a), self.op_scale(a)
        return [(op, scale * _predict(self.ops[op.signature], op, a)) for op in ops if self._covers(op)]

    def op_scale(self, a: ChannelAnalysis) -> float:
        """What one op timed alone is worth inside the network: this model's own whole-model
        calibration when it has one, else the median over the models timed whole (1 in tables
        calibrated on one timing)."""
        own = self.models.get(fingerprint(a))
        if own is not None:
            return float(own.get("op_scale", 1.0))
        scales = [float(m.get("op_scale", 1.0)) for m in self.models.values()]
        return float(statistics.median(scales)) if scales else 1.0

    def rest_ns(self, a: ChannelAnalysis, ops: list[TimedOp] | None = None) -> float:
        """The network's time outside its timed ops: this model's own measurement when it has one,
        else the other models' median per untimed op times this model's untimed ops."""
        own = self.models.get(fingerprint(a))
        if own is not None:
            return float(own["rest_ns"])
        per_op = [m["rest_ns"] / m["untimed_ops"] for m in self.models.values() if m["untimed_ops"]]
        return float(statistics.median(per_op)) * _untimed(a, ops or timed_ops(a), self) if per_op else 0.0


# ---- fits ---------------------------------------------------------------------------------------
def nonnegative_least_squares(design: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """argmin ||W (A c - t)|| over c >= 0, exactly, by trying every support (a few unknowns only)."""
    design, target = np.asarray(design, np.float64), np.asarray(target, np.float64)
    w = np.ones(len(target)) if weights is None else np.asarray(weights, np.float64)
    a, t = design * w[:, None], target * w
    best, best_error = np.zeros(design.shape[1]), float(np.sum(t ** 2))
    for size in range(1, design.shape[1] + 1):
        for support in itertools.combinations(range(design.shape[1]), size):
            coef, *_ = np.linalg.lstsq(a[:, support], t, rcond=None)
            if np.any(coef < 0):
                continue
            error = float(np.sum((a[:, support] @ coef - t) ** 2))
            if error < best_error - 1e-12 * max(1.0, best_error):
                best, best_error = np.zeros(design.shape[1]), error
                best[list(support)] = coef
    return best


def fit_entry(op: TimedOp, points: list[dict]) -> dict:
    """The fitted entry of an op from its timed points (``ns``, and ``a_in``/``a_out`` or ``x``)."""
    times = np.array([pt["ns"] for pt in points])
    weights = 1.0 / np.maximum(times, 1e-9)
    if op.form == "bilinear":
        a_in, a_out = np.array([pt["a_in"] for pt in points], float), np.array([pt["a_out"] for pt in points], float)
        design = np.stack([np.ones_like(a_in), a_in, a_out, a_in * a_out], 1)
    elif op.form == "linear":
        x = np.array([pt["x"] for pt in points], float)
        design = np.stack([np.ones_like(x), x], 1)
    else:
        design = np.ones((len(points), 1))
    if len(points) == 1 or op.form == "constant":
        coef = np.array([float(np.median(times))] + [0.0] * (3 if op.form == "bilinear" else 1))
    else:
        coef = nonnegative_least_squares(design, times, weights)
    residual = float(np.sqrt(np.mean(((design @ coef[:design.shape[1]] - times) * weights) ** 2)))
    return {"kind": op.kind, "form": op.form, "coef": [float(c) for c in coef], "points": points,
            "residual": residual, "spread": float(np.median([pt["spread"] for pt in points])),
            "extent": _extent(op)}


def _predict(entry: dict, op: TimedOp, a: ChannelAnalysis) -> float:
    """An entry's latency (ns) for ``op`` at full width."""
    c = entry["coef"]
    if entry["form"] == "bilinear":
        n_in, n_out = len(op.call.in_ids), len(op.call.out_ids)
        return c[0] + c[1] * n_in + c[2] * n_out + c[3] * n_in * n_out
    if entry["form"] == "linear":
        return c[0] + c[1] * moved(a, op, np.ones(a.num_groups, dtype=bool))
    return c[0] if entry["form"] == "constant" else 0.0


def _extent(op: TimedOp) -> list[float]:
    """What a fit must cover: the widest (A_in, A_out) of a conv / linear, the largest x of the others."""
    if op.kind in ("conv", "linear"):
        return [float(op.extent[0]), float(op.extent[1])]
    return [float(sum(w * (len(ids) if ids is not None else 1.0) for ids, w in op.uses))]


def _extent_within(needed: list[float], measured: list[float] | None) -> bool:
    return measured is not None and len(needed) == len(measured) and all(
        n <= m * (1 + 1e-9) for n, m in zip(needed, measured))


# ---- measuring ----------------------------------------------------------------------------------
def _grid(n: int, unit: int) -> list[int]:
    """Widths at which a side of ``n`` channels is timed: shares of n in steps of ``unit``, and n."""
    points = {min(n, max(unit, round(n * q / unit) * unit)) for q in FRACTIONS} | {n}
    if len(points) == 1 and n > 1:
        points.add(max(1, n // 2))
    return sorted(points)


def _layer_cases(a: ChannelAnalysis, op: TimedOp, setting: Setting, extent: tuple[int, int]) -> list[TimingCase]:
    n_in, n_out = extent
    unit = setting.align
    if op.call.groups > 1 and not op.call.depthwise:
        unit = int(np.lcm(unit, op.call.groups))
    if op.form == "bilinear":
        pairs = [(i, o) for i in _grid(n_in, unit) for o in _grid(n_out, unit)]
    elif op.form == "linear" and op.call.depthwise:
        mult = max(1, n_out // max(1, n_in))
        pairs = [(o // mult, o) for o in _grid(n_out, int(np.lcm(unit, mult)))]
    elif op.form == "linear":
        var_in = op.uses[0][0] is op.call.in_ids
        pairs = [(i, n_out) for i in _grid(n_in, unit)] if var_in else [(n_in, o) for o in _grid(n_out, unit)]
    else:
        pairs = [(n_in, n_out)]
    cases = []
    for a_in, a_out in dict.fromkeys(layer_widths(op, i, o) for i, o in pairs):
        x = a_out if op.call.depthwise or (op.uses and op.uses[0][0] is op.call.out_ids) else a_in
        cases.append(TimingCase(build=lambda i=a_in, o=a_out: layer_case_call(a, op, setting, i, o),
                                info={"kind": op.kind, "form": op.form, "signature": op.signature,
                                      "a_in": a_in, "a_out": a_out, "x": float(x)}))
    return cases


def _replay_cases(a: ChannelAnalysis, op: TimedOp, setting: Setting) -> tuple[list[TimingCase], str | None]:
    """Cases of a product or data op, after checking that it replays; (cases, error)."""
    fractions = FRACTIONS if op.form == "linear" else (1.0,)
    masks = {}
    for f in fractions:
        alive = group_mask(a, op, f)
        masks.setdefault(moved(a, op, alive), alive)
    checked = {}
    for x, alive in sorted(masks.items()):
        try:
            with torch.inference_mode():
                replay_call(a, op, setting, alive)()
            checked[x] = alive
        except Exception as error:  # noqa: BLE001 - any op the device cannot run this way
            if x == max(masks):
                return [], f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if len(checked) < len(masks):  # runs at full width only: a constant
        op.form, checked = "constant", {max(checked): checked[max(checked)]}
    return [TimingCase(build=lambda m=alive: replay_call(a, op, setting, m),
                       info={"kind": op.kind, "form": op.form, "signature": op.signature, "x": x})
            for x, alive in checked.items()], None


def extend_table(table: LatencyTable, model: nn.Module, example_inputs, *, analysis: ChannelAnalysis | None = None,
                 timer: Timer | None = None, setting: Setting | None = None, calibrate: bool = True) -> tuple[int, bool]:
    """Time the ops of ``model`` that ``table`` lacks on the table's own setting and, with ``calibrate``,
    the whole model once (its rest of the network); returns how many op shapes were measured and
    whether the whole model was timed. Without ``calibrate`` a model the table has not timed whole
    gets the other models' rest per untimed op: its cost stays a prediction."""
    setting = setting or _setting_of(table)
    timer = timer or DeviceTimer(setting.device)
    a = analysis or analyze_model(model, example_inputs)
    ops = timed_ops(a)
    todo: dict[str, list[TimedOp]] = {}
    for op in table.missing(a, ops):
        todo.setdefault(op.signature, []).append(op)
    cases, owners, failed = [], [], {}
    for signature, members in todo.items():
        op = max(members, key=lambda m: _extent(m))
        if op.kind in ("conv", "linear"):
            extent = (max(m.extent[0] for m in members), max(m.extent[1] for m in members))
            op.extent = extent
            new = _layer_cases(a, op, setting, extent)
        else:
            new, error = _replay_cases(a, op, setting)
            if error is not None:
                failed[signature] = (op, error)
        cases += new
        owners += [op] * len(new)
    start = time.perf_counter()
    if cases:
        stats = timer.measure(cases)
        by_op: dict[int, list[dict]] = {}
        for case, op, s in zip(cases, owners, stats):
            point = {k: case.info[k] for k in ("a_in", "a_out", "x") if k in case.info}
            by_op.setdefault(id(op), []).append({**point, "ns": s.median * 1e9, "spread": s.spread})
        for op in {id(op): op for op in owners}.values():
            table.ops[op.signature] = fit_entry(op, by_op[id(op)])
    for signature, (op, error) in failed.items():
        table.ops[signature] = {"kind": op.kind, "form": "unmeasured", "coef": [0.0, 0.0], "error": error,
                                "extent": _extent(op), "points": []}
        logger.info("latency: %s in '%s' cannot be replayed on %s (%s); its time counts in the rest of the network",
                    op.kind, op.module, setting.device, error)
    fp = fingerprint(a)
    model_timed = calibrate and fp not in table.models
    if model_timed:
        table.models[fp] = _calibrate(table, model, example_inputs, a, ops, setting, timer)
    if todo:
        logger.info("latency: measured %d op shape(s) (%d timings) in %.1f s, %s", len(todo), len(cases),
                    time.perf_counter() - start, table.name)
    if not table.timing:
        table.timing = timer.describe()
    return len(todo), model_timed


def _calibrate(table: LatencyTable, model: nn.Module, example_inputs, a: ChannelAnalysis, ops: list[TimedOp],
               setting: Setting, timer: Timer) -> dict:
    """The whole model timed, and beside it (same interleaved rounds) the model with every width
    shrunk by one factor to about half its FLOPs: two points of ``whole = op_scale x (sum of the
    ops timed alone) + rest``. ``op_scale`` corrects what timing an op alone gets wrong in a way
    that grows with the widths (caches, allocation, overhead the loop hides), the rest is what
    does not shrink. With one point (nothing to shrink, or a fit outside ``OP_SCALE_RANGE``) the
    scale is 1 (or the bound) and the rest what the ops leave of the whole."""
    half, half_counts = _uniform_half(model, example_inputs)
    models = {"model": model} | ({"uniform_half": half} if half is not None else {})
    timed = time_models(models, example_inputs, device=setting.device, dtype=setting.dtype,
                        batch_size=setting.batch_size, channels_last=setting.channels_last, timer=timer)
    whole = timed["model"]
    ops_ns = sum(_predict(table.ops[op.signature], op, a) for op in ops)
    model_ns = whole.median * 1e9
    entry = {"model": type(model).__name__, "model_ns": model_ns, "model_spread": whole.spread, "ops_ns": ops_ns,
             "untimed_ops": _untimed(a, ops, table), "measured": _now()}
    scale = 1.0
    if half is not None:
        ha = analyze_model(half, example_inputs)
        half_ops = timed_ops(ha)
        extend_table(table, half, example_inputs, analysis=ha, timer=timer, setting=setting, calibrate=False)
        half_ops_ns = sum(_predict(table.ops[op.signature], op, ha) for op in half_ops)
        half_ns = timed["uniform_half"].median * 1e9
        scale = _two_point_scale(model_ns, ops_ns, half_ns, half_ops_ns)
        entry["uniform_half"] = {"model_ns": half_ns, "spread": timed["uniform_half"].spread, "ops_ns": half_ops_ns,
                                 "widths": half_counts}
    entry["op_scale"] = scale
    entry["rest_ns"] = max(0.0, model_ns - scale * ops_ns)
    if whole.spread > BUSY_SPREAD and entry["rest_ns"] > 0.1 * model_ns:  # a swing the ops explain misleads nothing
        # Short op timings fit between other processes' time slices, a whole forward pass does not: on a busy
        # machine the rest of the network (model minus ops) swallows the waiting, and every width looks cheap.
        entry["warning"] = (f"the whole {entry['model']} varied by {100 * whole.spread:.0f}% between timing rounds "
                            f"(the machine looks busy): the rest of the network, {entry['rest_ns'] / 1e6:.3g} ms of "
                            f"{model_ns / 1e6:.3g} ms, may be inflated, which makes narrower layers look useless; "
                            "measure again on a quiet machine (delete the cached table)")
        logger.warning("latency: %s", entry["warning"])
    return entry


#: Bounds of the calibrated op scale: outside them the two whole-model timings are noise, not a correction.
OP_SCALE_RANGE = (0.25, 4.0)


def _two_point_scale(model_ns: float, ops_ns: float, half_ns: float, half_ops_ns: float) -> float:
    """The op scale s of ``whole = s x ops + rest`` through the two timed points, rest >= 0 (else
    the least-squares s through the origin), within ``OP_SCALE_RANGE``."""
    lo, hi = OP_SCALE_RANGE
    if not ops_ns > half_ops_ns > 0 or not (model_ns > 0 and half_ns > 0):
        return 1.0
    scale = (model_ns - half_ns) / (ops_ns - half_ops_ns)
    if model_ns - scale * ops_ns < 0:
        scale = (model_ns * ops_ns + half_ns * half_ops_ns) / (ops_ns ** 2 + half_ops_ns ** 2)
    return float(min(hi, max(lo, scale))) if np.isfinite(scale) else 1.0


#: ``shrink(model, example_inputs, 0.5)``: the model rebuilt with one width multiplier at half its FLOPs.
#: Rebuilding is a later stage than costs, so the package registers it (``set_uniform_shrink``, in
#: ``morphnet/__init__.py``); without it a table is calibrated on one whole-model timing.
_UNIFORM_SHRINK: Callable | None = None


def set_uniform_shrink(shrink: Callable | None) -> None:
    """Register what builds the second calibration point (``morphnet.recipes.compress.shrink_uniformly``)."""
    global _UNIFORM_SHRINK
    _UNIFORM_SHRINK = shrink


def _uniform_half(model: nn.Module, example_inputs) -> tuple[nn.Module | None, dict | None]:
    """``model`` with one width multiplier on every prunable layer at half its FLOPs (the second
    calibration point), and its widths; (None, None) when it has nothing to shrink."""
    if _UNIFORM_SHRINK is None:
        return None, None
    try:
        with torch.no_grad():
            half = _UNIFORM_SHRINK(copy.deepcopy(model).cpu().float(), pytree.tree_map_only(
                torch.Tensor, lambda t: t.detach().cpu().float() if t.is_floating_point() else t.cpu(), example_inputs), 0.5)
    except Exception as error:  # noqa: BLE001 - the second point is optional; one timing still calibrates
        logger.info("latency: no uniform half of %s to calibrate on (%s); one whole-model timing",
                    type(model).__name__, str(error).splitlines()[0] if str(error) else type(error).__name__)
        return None, None
    widths = {name: m.out_channels for name, m in half.named_modules() if isinstance(m, nn.Conv2d)}
    widths |= {name: m.out_features for name, m in half.named_modules() if isinstance(m, nn.Linear)}
    return half.eval(), widths


def _untimed(a: ChannelAnalysis, ops: list[TimedOp], table: LatencyTable) -> int:
    """Ops of the inference network that no fit covers (views, bookkeeping, ops that cannot be replayed)."""
    timed = sum(1 for op in ops if table.ops.get(op.signature, {}).get("form") not in (None, "unmeasured"))
    nodes = sum(1 for n in a.graph.nodes if not a.graph.training_only(n.module))
    return max(0, nodes - timed)


def fingerprint(a: ChannelAnalysis) -> str:
    """The model's architecture as its sequence of ops and modules: a slim network rebuilt from the
    seed shares it (the widths differ, the program does not)."""
    text = "|".join([getattr(a.graph.module_types.get(""), "__name__", "")]
                    + [f"{n.name}@{n.module}" for n in a.graph.nodes if not a.graph.training_only(n.module)])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _setting_of(table: LatencyTable) -> Setting:
    key = table.key
    device = torch.device(key["device"])
    return Setting(device, getattr(torch, key["dtype"]), int(key["batch_size"]), key["memory_format"] == "channels_last")


def latency_key(setting: Setting) -> dict:
    """What a table is valid for: it is reused only where all of these are equal."""
    device = setting.device
    return {"device": device.type, "device_name": device_name(device), "dtype": str(setting.dtype).removeprefix("torch."),
            "batch_size": setting.batch_size, "memory_format": "channels_last" if setting.channels_last else "contiguous",
            "torch": torch.__version__, "threads": torch.get_num_threads() if device.type == "cpu" else None}


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (what latency tables and benchmarks are keyed by)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or device.type


def cache_dir() -> Path:
    """Where tables are cached: ``$MORPHNET_LATENCY_CACHE``, else ``$XDG_CACHE_HOME/morphnet/latency``
    (``~/.cache/morphnet/latency``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "morphnet" / "latency"


def cache_path(key: dict, directory: str | os.PathLike | None = None) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    slug = f"{key['device']}-{key['dtype']}-b{key['batch_size']}-{key['memory_format']}"
    return Path(directory or cache_dir()) / f"latency-{slug}-{digest}.json"


def _model_setting(model: nn.Module, device, dtype, batch_size: int, memory_format) -> Setting:
    params = [p for p in model.parameters()]
    device = torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    if dtype is None:
        floating = [p.dtype for p in params if p.is_floating_point()]
        dtype = floating[0] if floating else torch.float32
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"measure_latency: dtype {dtype!r} is not a torch dtype (e.g. 'float32', 'bfloat16')")
        dtype = getattr(torch, dtype)
    if memory_format is None:
        convs = [p for p in params if p.dim() == 4]
        channels_last = bool(convs) and all(p.is_contiguous(memory_format=torch.channels_last)
                                            and not p.is_contiguous() for p in convs)
    elif memory_format in (torch.channels_last, "channels_last"):
        channels_last = True
    elif memory_format in (torch.contiguous_format, "contiguous"):
        channels_last = False
    else:
        raise ValueError(f"measure_latency: memory_format must be 'contiguous' or 'channels_last', got {memory_format!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"measure_latency: batch_size must be a positive integer, got {batch_size!r}")
    return Setting(device, dtype, batch_size, channels_last)


def measure_latency(model: nn.Module, example_inputs, *, device=None, dtype=None, batch_size: int = 1,
                    memory_format=None, cache: bool = True, cache_dir: str | os.PathLike | None = None,
                    timer: Timer | None = None, rounds: int = 5, warmup: int = 3,
                    analysis: ChannelAnalysis | None = None) -> LatencyTable:
    """Measure the latency model of ``model`` on ``device`` (default: its parameters'), ``dtype``
    (default: its parameters'), ``batch_size`` and ``memory_format`` (default: channels_last when its
    conv weights are), and return the table; pass it as ``hardware=`` to latency costs.

    With ``cache`` (default) the table for this key is read from the cache folder (``cache_dir``,
    default ``$MORPHNET_LATENCY_CACHE`` or ``~/.cache/morphnet/latency``) and only the ops it lacks are
    timed; ``table.source`` says "cache" when nothing had to be timed. ``timer`` replaces the device
    timer (tests use synthetic ones); ``rounds`` and ``warmup`` configure the device timer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"measure_latency: model must be an nn.Module, got {type(model).__name__}")
    setting = _model_setting(model, device, dtype, batch_size, memory_format)
    key = latency_key(setting)
    path = cache_path(key, cache_dir) if cache else None
    table = None
    if path is not None and path.is_file():
        try:
            loaded = LatencyTable.load(path)
            if loaded.key == key:
                table = loaded
        except ValueError as error:
            logger.warning("latency: ignoring the cached table %s (%s)", path, error)
    if table is None:
        table = LatencyTable(key)
    cached = bool(table.ops)
    ops_measured, model_timed = extend_table(table, model, example_inputs, analysis=analysis, setting=setting,
                                             timer=timer or DeviceTimer(setting.device, rounds=rounds, warmup=warmup))
    table.source = ("measured" if not cached else "cache, extended" if ops_measured or model_timed else "cache")
    if cached and not model_timed:
        for entry in table.models.values():
            if entry.get("warning"):
                logger.warning("latency: the cached table %s: %s", path, entry["warning"])
    if path is not None:
        if table.source != "cache" or not path.is_file():
            table.save(path)
        table.path = path
    logger.info("latency: %s", describe_source(table))
    return table


# ---- where a latency cost takes its hardware from ---------------------------------------------
_ACTIVE: ContextVar[LatencyTable | None] = ContextVar("morphnet_active_latency_table", default=None)


def activate(table: LatencyTable) -> Token:
    """From now on (until ``deactivate``) ``hardware="measured"`` means ``table`` (extended on its own
    device when a model has ops it lacks): a run measures once, on its device, and its costs agree."""
    return _ACTIVE.set(table)


def deactivate(token: Token) -> None:
    _ACTIVE.reset(token)


@contextlib.contextmanager
def active_table(table: LatencyTable) -> Iterator[LatencyTable]:
    """``activate`` for the duration of a block."""
    token = activate(table)
    try:
        yield table
    finally:
        deactivate(token)


def resolve_latency_hardware(hardware, *, model: nn.Module | None = None, example_inputs=None,
                             batch_size: int | None = None, analysis: ChannelAnalysis | None = None,
                             what: str = "latency") -> tuple[Hardware | LatencyTable, int]:
    """(hardware, batch size) of a latency cost: a roofline entry (a name or ``Hardware``; batch
    default 1), a ``LatencyTable`` or the path of a saved one (its own batch), or ``"measured"``
    (the active table of a run, else ``measure_latency`` on ``model``, cached)."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"{what}: batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(hardware, LatencyTable):
        table = hardware
    elif isinstance(hardware, str) and hardware == MEASURED:
        if model is None:
            raise ValueError(f"{what}: hardware='measured' needs the model to time; pass a table from "
                             "morphnet.measure_latency instead")
        active = _ACTIVE.get()
        if active is not None and batch_size in (None, active.batch_size):
            table = active
            analysis = analysis or analyze_model(model, example_inputs)
            if table.missing(analysis):  # new op shapes (a rebuilt attention module): time the ops only
                extend_table(table, model, example_inputs, analysis=analysis, calibrate=False)
                if table.path is not None:
                    table.save(table.path)
        else:
            table = measure_latency(model, example_inputs, batch_size=batch_size or 1, analysis=analysis)
    elif isinstance(hardware, (str, os.PathLike)) and str(hardware).endswith(".json"):
        table = LatencyTable.load(hardware)
    else:
        return get_hardware(hardware), batch_size or 1
    if batch_size is not None and batch_size != table.batch_size:
        raise ValueError(f"{what}: the latency table was measured at batch {table.batch_size}, but batch_size="
                         f"{batch_size}; pass batch_size={table.batch_size} or measure at batch {batch_size}")
    return table, table.batch_size


def is_cuda_target(hardware, device=None) -> bool:
    """Whether latency is measured or modelled for a CUDA GPU: a table measured on CUDA, a GPU
    entry of the roofline table, or ``"measured"`` on a CUDA ``device`` ("auto": when CUDA is available)."""
    if isinstance(hardware, LatencyTable):
        return hardware.is_cuda
    if hardware is None:
        return False
    if isinstance(hardware, str) and hardware == MEASURED:
        if device == "auto":
            return torch.cuda.is_available()
        return device is not None and torch.device(device).type == "cuda"
    if isinstance(hardware, (str, os.PathLike)) and str(hardware).endswith(".json"):
        try:
            return LatencyTable.load(hardware).is_cuda
        except ValueError:
            return False
    try:
        return get_hardware(hardware).gpu
    except ValueError:
        return False


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_source(table: LatencyTable) -> str:
    """One line for logs: what the table is and whether it was reused."""
    where = f" ({table.path})" if table.path else ""
    verb = {"cache": "reused the cached latency table", "cache, extended": "extended the cached latency table",
            "file": "loaded the latency table", "measured": "measured the latency table"}.get(table.source, table.source)
    return f"{verb}{where}: {table.name}, {len(table.ops)} op shapes"


__all__ = ["LatencyTable", "measure_latency", "extend_table", "resolve_latency_hardware", "active_table", "activate",
           "deactivate",
           "is_cuda_target", "cache_dir", "describe_source", "nonnegative_least_squares", "MEASURED"]
