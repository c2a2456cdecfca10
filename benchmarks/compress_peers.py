"""The peers of the compression benchmark (``compress.py``): other tools that prune a trained network
to a FLOP budget, each driven the way its own documentation and reproduce scripts drive it.

Every peer takes the trained seed network and a :class:`PeerTask` and returns the pruned network,
ready for the benchmark's fine-tuning (the same for every arm), and a dict of what it did. The
contract every peer keeps:

- the model it is given is its own copy (it may train and prune it in place);
- it spends at most ``task.sparse_steps`` optimizer steps on training before pruning (0 for one-shot
  pruning), with SGD (momentum 0.9, Nesterov, weight decay 5e-4) at the constant ``task.lr``, on
  ``task.train_batches(task.seed)``; the steps it used are reported as ``info["sparse_steps"]``;
- the pruned network lands within 2% of ``task.budget_flops`` as ``task.count_flops`` counts it
  (FlopCounterMode on one example); where the peer cannot land there, it says so in ``info["note"]``
  and returns what it got (the benchmark reports it, never drops it);
- ``info["function_check"]``: the largest difference between the pruned network's outputs and the
  original network's with the removed channels zeroed, where that can be computed, else a string
  saying why not; ``info["error"]`` when the peer crashed (the benchmark records the crash).

The shims each peer needs on CPU with torch 2.14.1 (each one is a small function below, named
``_shim_*``, with the reason in its docstring): OTO's import (``torch.onnx._globals`` and
``torch.onnx._optimize_graph`` moved), HESSO's ``.cuda()`` on a CPU model, OTO's stale
``in_channels`` on a pruned depthwise conv, and ModelOpt's FLOP counter on torchprofile 0.1.0 (it
expects 0.0.4's ``profile.handlers``). Torch-Pruning needs none.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import io
import math
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

TOLERANCE = 0.02  # every arm lands within 2% of the budget
TP_ITERATIVE_STEPS = 400  # Torch-Pruning's reproduce/main.py: --iterative-steps 400, pruning_ratio 1.0
BN_SCALE_REG = 1e-5  # BNScalePruner's default and its README's CIFAR ResNet-56 command (--method slim --reg 1e-5)
GROUP_NORM_REG = 5e-4  # its README's CIFAR ResNet-56 command (--method group_sl --reg 5e-4); the class default is 1e-4
FUNCTION_CHECK_EXAMPLES = 8
MODELOPT_QUEUE = 50  # the batches ModelOpt must hold to re-estimate BatchNorm for each candidate


@dataclass
class PeerTask:
    """What a peer needs to prune one trained seed network to one budget."""

    example: torch.Tensor  # one example, (1, C, H, W), on the CPU
    budget_flops: float  # the FLOP budget (FlopCounterMode's count of one example, eval mode)
    train_batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # seed -> endless shuffled batches
    val_score: Callable[[nn.Module], float]  # accuracy on a fixed validation subset (scores FastNAS's candidates)
    count_flops: Callable[[nn.Module], int]  # FlopCounterMode on one example, eval mode
    sparse_steps: int  # optimizer steps a peer may spend before pruning (its sparse-learning phase)
    lr: float  # the constant learning rate of that phase
    seed: int
    ignored: list[str] = field(default_factory=list)  # module names whose outputs must keep their width (classifier)
    cache_dir: str | None = None  # where a peer may keep what depends only on the seed network (FastNAS's sensitivities)


# --------------------------------------------------------------------------------------------------
# Shared: running a peer, its sparse-learning phase, landing and the function check


def _run_peer(name: str, model: nn.Module, task: PeerTask, prune: Callable[[dict], nn.Module]) -> tuple[nn.Module, dict]:
    """Run ``prune(info)``; a peer that crashes is reported (``info["error"]``), never raised."""
    info: dict = {"peer": name, "sparse_steps": 0}
    start = time.perf_counter()
    try:
        model = prune(info)
    except Exception as exc:  # a peer-side failure is a result of the benchmark
        frames = traceback.extract_tb(exc.__traceback__)
        info["error"] = traceback.format_exception_only(type(exc), exc)[-1].strip()
        if isinstance(exc, ImportError):
            info["error"] += " (the peers are in the bench extra: pip install -e '.[bench]')"
        info["error_at"] = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None
    info["seconds"] = round(time.perf_counter() - start, 1)
    if "error" not in info:
        flops = task.count_flops(model)
        info["flops"] = flops
        info["budget_fraction"] = flops / task.budget_flops
        if abs(flops / task.budget_flops - 1) > TOLERANCE:
            info.setdefault("note", f"landed at {flops / task.budget_flops:.3f} of the budget, outside +-{TOLERANCE:.0%}")
    return model, info


def _sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The contract's optimizer for every sparse-learning phase."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


def _train(model: nn.Module, task: PeerTask, step: Callable[[torch.Tensor], None]) -> None:
    """``task.sparse_steps`` training steps on the task's batches; ``step(loss)`` does the backward
    pass, the peer's regularization and the optimizer step."""
    model.train()
    batches = task.train_batches(task.seed)
    for _ in range(task.sparse_steps):
        x, y = next(batches)
        step(F.cross_entropy(model(x), y))
    model.eval()


def _check_inputs(task: PeerTask) -> torch.Tensor:
    """A few real training images for the function checks (the first of a separate data order)."""
    x, _ = next(task.train_batches(task.seed + 7919))
    return x[:FUNCTION_CHECK_EXAMPLES]


@torch.no_grad()
def _function_check(pruned: nn.Module, reference: nn.Module, x: torch.Tensor, info: dict) -> None:
    """``function_check``: the largest absolute difference of the two networks' outputs on ``x``,
    both in eval mode; ``function_check_scale``: the largest absolute output of the reference."""
    pruned.eval(), reference.eval()
    expected = reference(x)
    info["function_check"] = float((pruned(x) - expected).abs().max())
    info["function_check_scale"] = float(expected.abs().max())


def _zero_removed_inputs(reference: nn.Module, kept_inputs: dict[str, set[int]]) -> None:
    """Zero, in ``reference``, the input channels of every conv / linear layer that its pruned
    version no longer reads: the pruned network must compute exactly what this one computes."""
    with torch.no_grad():
        for name, kept in kept_inputs.items():
            layer = reference.get_submodule(name)
            removed = sorted(set(range(layer.weight.shape[1])) - kept)
            if removed:
                layer.weight[:, removed] = 0


def _is_depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1 and layer.groups == layer.in_channels


def _input_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose input channels the function check zeroes: dense conv and linear. A removed
    channel always ends in one of them in the benchmark's networks (a depthwise conv passes it on)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) or (isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1)}


def _uncheckable(model: nn.Module) -> str | None:
    """Why the zeroed-input function check cannot judge ``model``, if it cannot."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not _is_depthwise(m):
            return f"not checked: grouped conv '{name}' (groups={m.groups}) is outside the zeroed-input check"
    return None


# --------------------------------------------------------------------------------------------------
# Torch-Pruning 1.6.1


def _tp_ignored(model: nn.Module, task: PeerTask) -> list[nn.Module]:
    return [model.get_submodule(name) for name in task.ignored]


def _tp_steps(model: nn.Module, task: PeerTask, make_pruner: Callable, steps: int | None) -> tuple[int, dict]:
    """Prune ``model`` in place the way Torch-Pruning's reproduce/main.py does (``progressive_pruning``):
    one pruner with ``iterative_steps=400`` and a final ratio of 1.0, stepped until the FLOPs reach
    the budget (``steps=None``) or ``steps`` times. Returns the steps taken and, for every conv /
    linear layer, the original input channels it still reads (recorded from the interactive groups)."""
    model.eval()  # the graph is traced with one example: in train mode it would move BN statistics
    pruner = make_pruner(model)
    layers = _input_layers(model)
    names = {m: n for n, m in layers.items()}
    alive = {n: list(range(m.weight.shape[1])) for n, m in layers.items()}
    taken = 0
    while (task.count_flops(model) > task.budget_flops) if steps is None else (taken < steps):
        if pruner.current_step >= pruner.iterative_steps:
            break
        for group in pruner.step(interactive=True):
            seen = set()
            for dep, idxs in group:
                layer = dep.target.module
                if layer not in names or not pruner.DG.is_in_channel_pruning_fn(dep.handler) or layer in seen:
                    continue
                seen.add(layer)
                drop = {int(i) for i in idxs}
                alive[names[layer]] = [c for j, c in enumerate(alive[names[layer]]) if j not in drop]
            group.prune()
        taken += 1
    return taken, {n: set(kept) for n, kept in alive.items()}


def _tp_prune_to_budget(model: nn.Module, task: PeerTask, make_pruner: Callable, info: dict) -> nn.Module:
    """Step to the budget; when the step that crossed it overshot by more than the tolerance and the
    state before it is closer, take that state (rebuilt on a copy: a pruner cannot step back)."""
    start = copy.deepcopy(model).eval()
    steps, kept = _tp_steps(model, task, make_pruner, None)
    flops = task.count_flops(model)
    if flops < (1 - TOLERANCE) * task.budget_flops and steps > 1:
        before = copy.deepcopy(start)
        kept_before = _tp_steps(before, task, make_pruner, steps - 1)[1]
        if abs(task.count_flops(before) - task.budget_flops) < abs(flops - task.budget_flops):
            info["stepped_back"] = f"step {steps} overshot to {flops / task.budget_flops:.3f} of the budget"
            model, kept, steps = before, kept_before, steps - 1
    info["pruning_steps"] = steps
    info["channel_pruning_ratio"] = steps / TP_ITERATIVE_STEPS
    reference = copy.deepcopy(start)
    _zero_removed_inputs(reference, kept)
    if _uncheckable(start):
        info["function_check"] = _uncheckable(start)
    else:
        _function_check(model, reference, _check_inputs(task), info)
    return model


def _version(package: str) -> str:
    from importlib.metadata import version

    return f"{package} {version(package)}"


def prune_tp_magnitude(model: nn.Module, task: PeerTask, global_pruning: bool, p: int = 1) -> tuple[nn.Module, dict]:
    """Torch-Pruning's magnitude pruning (``BasePruner`` with ``GroupMagnitudeImportance(p)``; p=1 is
    its reproduce scripts' ``--method l1``, "Group-L1" in its table), per layer or global, no training."""

    def prune(info: dict) -> nn.Module:
        import torch_pruning as tp

        info["peer"] = _version("torch-pruning")
        info.update(method="magnitude", importance=f"GroupMagnitudeImportance(p={p})", global_pruning=global_pruning)

        def make(m: nn.Module):
            return tp.pruner.BasePruner(m, task.example, importance=tp.importance.GroupMagnitudeImportance(p=p),
                                        global_pruning=global_pruning, pruning_ratio=1.0,
                                        iterative_steps=TP_ITERATIVE_STEPS, ignored_layers=_tp_ignored(m, task))

        return _tp_prune_to_budget(model, task, make, info)

    return _run_peer("torch-pruning", model, task, prune)


def _tp_sparse_then_prune(model: nn.Module, task: PeerTask, info: dict, make: Callable) -> nn.Module:
    """Sparse learning with the pruner's ``regularize`` after each backward pass (as reproduce/main.py's
    ``train_model`` does), then pruning to the budget by a pruner built on the sparse network."""
    model.eval()
    pruner = make(model)
    optimizer = _sgd(model, task.lr)

    def step(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        pruner.regularize(model)
        optimizer.step()

    _train(model, task, step)
    info["sparse_steps"] = task.sparse_steps
    return _tp_prune_to_budget(model, task, make, info)


def prune_tp_bnscale(model: nn.Module, task: PeerTask) -> tuple[nn.Module, dict]:
    """Torch-Pruning's ``BNScalePruner`` (network slimming): L1 on every BatchNorm scale during sparse
    learning, then global pruning by |gamma| over each coupled group (``BNScaleImportance``)."""

    def prune(info: dict) -> nn.Module:
        import torch_pruning as tp

        info["peer"] = _version("torch-pruning")
        info.update(method="bn_scale", importance="BNScaleImportance()", global_pruning=True, reg=BN_SCALE_REG)

        def make(m: nn.Module):
            return tp.pruner.BNScalePruner(m, task.example, importance=tp.importance.BNScaleImportance(),
                                           reg=BN_SCALE_REG, global_pruning=True, pruning_ratio=1.0,
                                           iterative_steps=TP_ITERATIVE_STEPS, ignored_layers=_tp_ignored(m, task))

        return _tp_sparse_then_prune(model, task, info, make)

    return _run_peer("torch-pruning", model, task, prune)


def prune_tp_groupnorm(model: nn.Module, task: PeerTask) -> tuple[nn.Module, dict]:
    """Torch-Pruning's ``GroupNormPruner`` (DepGraph's group sparse learning, ``--method group_sl``):
    group-norm regularization that pushes weak groups harder (alpha 2^4), then global pruning by
    group L2 norm, normalized by the group's maximum as its reproduce scripts do for CIFAR."""

    def prune(info: dict) -> nn.Module:
        import torch_pruning as tp

        info["peer"] = _version("torch-pruning")
        info.update(method="group_norm", importance="GroupMagnitudeImportance(p=2, normalizer='max')",
                    global_pruning=True, reg=GROUP_NORM_REG, alpha=4)

        def make(m: nn.Module):
            return tp.pruner.GroupNormPruner(m, task.example,
                                             importance=tp.importance.GroupMagnitudeImportance(p=2, normalizer="max"),
                                             reg=GROUP_NORM_REG, global_pruning=True, pruning_ratio=1.0,
                                             iterative_steps=TP_ITERATIVE_STEPS, ignored_layers=_tp_ignored(m, task))

        return _tp_sparse_then_prune(model, task, info, make)

    return _run_peer("torch-pruning", model, task, prune)


# --------------------------------------------------------------------------------------------------
# NVIDIA ModelOpt 0.47.0, FastNAS


@contextlib.contextmanager
def _shim_torchprofile_handlers():
    """ModelOpt counts FLOPs as 2 x torchprofile's MACs with BatchNorm left out, by editing
    ``torchprofile.profile.handlers`` (torchprofile 0.0.4, the version its tests pin). torchprofile
    0.1.0 has no ``handlers``: its table is ``handlers.HANDLER_MAP``. For the call only, give ModelOpt
    an empty ``handlers`` to edit and leave BatchNorm out of ``HANDLER_MAP``, as ModelOpt intends.
    Nothing is done with torchprofile 0.0.4."""
    import torchprofile.profile as profile

    if hasattr(profile, "handlers"):
        yield
        return
    from torchprofile.handlers import HANDLER_MAP

    batch_norm = HANDLER_MAP.get("aten::batch_norm")
    profile.handlers = ()
    HANDLER_MAP["aten::batch_norm"] = None
    try:
        yield
    finally:
        HANDLER_MAP["aten::batch_norm"] = batch_norm
        del profile.handlers


def _slice_indices(active_slice, size: int) -> set[int]:
    if isinstance(active_slice, slice):
        return set(range(size)[active_slice])
    return {int(i) for i in active_slice}


@contextlib.contextmanager
def _record_fastnas_inputs(kept: dict[str, set[int]]):
    """Record, just before ModelOpt exports the searched subnet (``mtn.search`` calls ``export``),
    which original input channels every dense conv / linear layer keeps (its ``in_channels`` /
    ``in_features`` hparam's active slice): the kept channels, for the function check. Read only."""
    import modelopt.torch.nas.algorithms as algorithms

    export = algorithms.export

    def record_then_export(model, *args, **kwargs):
        for name, m in _input_layers(model).items():
            hparam = "in_features" if isinstance(m, nn.Linear) else "in_channels"
            with contextlib.suppress(AttributeError):
                hp = m.get_hparam(hparam)
                kept[name] = _slice_indices(hp.active_slice, hp.max)
        return export(model, *args, **kwargs)

    algorithms.export = record_then_export
    try:
        yield
    finally:
        algorithms.export = export


@torch.no_grad()
def _reestimate_bn(model: nn.Module, batches: list) -> None:
    """BatchNorm statistics as the cumulative average over ``batches`` (ModelOpt's own re-estimation)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for x, _ in batches:
        model(x)
    model.eval()


def _bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def _small_batches(task: PeerTask, count: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` training batches of ``size`` images, cut from the task's batches in their order."""
    out, batches = [], task.train_batches(task.seed)
    while len(out) < count:
        x, y = next(batches)
        out += [(x[i:i + size], y[i:i + size]) for i in range(0, len(x) - size + 1, size)]
    return out[:count]


def _fastnas_checkpoint(model: nn.Module, task: PeerTask, settings: str, folder: str) -> str:
    """The search checkpoint holds the sensitivity map, which depends on the network, the score and
    the BN batches but not on the budget: keyed by a digest of the weights, the seed and the settings."""
    digest = hashlib.sha256(settings.encode())
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return str(Path(folder) / f"fastnas_{digest.hexdigest()[:16]}.pth")


def prune_fastnas(model: nn.Module, task: PeerTask, channel_divisor: int = 4, bn_batch_size: int = 8,
                  max_searches: int = 6) -> tuple[nn.Module, dict]:
    """ModelOpt's FastNAS (``mtp.prune(mode="fastnas")``): the score of every width choice of every
    layer (BatchNorm re-estimated for each on 50 training batches of ``bn_batch_size``), then a
    binary search on the sensitivity map for the subnet under the FLOP constraint; the exported
    plain model.

    ModelOpt re-estimates BatchNorm per candidate only from a full queue of 50 batches
    (``MODELOPT_QUEUE_MAXLEN``); with fewer it warns and scores every candidate with the full
    network's statistics. 50 of the benchmark's batches would cost 3200 images of forward passes
    per score, so the task's batches are cut into batches of ``bn_batch_size``.

    ``channel_divisor`` replaces ModelOpt's 32, under which a CIFAR ResNet-20 has no subnet below
    84% of its FLOPs. ModelOpt counts FLOPs as 2 x torchprofile's MACs without BatchNorm (close to
    FlopCounterMode); where the exported network misses the budget by more than the tolerance, the
    search is re-run from its checkpoint (the sensitivity map is kept, so no score is re-evaluated)
    with the constraint rescaled by budget / landed, or bisected between constraints that landed
    under and over, at most ``max_searches`` searches; the closest subnet is returned. Its subnets
    form a ladder (every layer takes the narrowest width whose score loss is under one threshold),
    so the budget may fall between two rungs."""

    def prune(info: dict) -> nn.Module:
        import modelopt.torch.prune as mtp
        info["peer"] = _version("nvidia-modelopt")
        loader = _small_batches(task, MODELOPT_QUEUE, bn_batch_size)
        rules = {"nn.Conv2d": {"*": {"channel_divisor": channel_divisor}},
                 "nn.BatchNorm2d": {"*": {"feature_divisor": channel_divisor}},
                 "nn.Linear": {"*": {"feature_divisor": channel_divisor}}}
        info.update(mode="fastnas", channel_divisor=channel_divisor, bn_batches=len(loader),
                    bn_batch_size=bn_batch_size, score_calls=0, score_seconds=0.0, bn_forward_passes=0)

        def score(m: nn.Module) -> float:
            start = time.perf_counter()
            value = task.val_score(m)
            info["score_calls"] += 1
            info["score_seconds"] += time.perf_counter() - start
            return value

        def count_bn_pass(module, inputs, output):
            if module.training:
                info["bn_forward_passes"] += 1

        settings = f"divisor={channel_divisor} bn_batch_size={bn_batch_size} seed={task.seed}"
        searches, best = [], None
        with contextlib.ExitStack() as stack:
            folder = task.cache_dir or stack.enter_context(tempfile.TemporaryDirectory())
            checkpoint = _fastnas_checkpoint(model, task, settings, folder)
            info["sensitivities_cached"] = Path(checkpoint).exists()
            limit, under, over = task.budget_flops, 0.0, math.inf  # constraints known to land under / over
            for _ in range(max_searches):
                candidate, kept = copy.deepcopy(model).eval(), {}
                first_bn = next(m for m in candidate.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
                hook = first_bn.register_forward_hook(count_bn_pass)
                quiet = io.StringIO()
                with _shim_torchprofile_handlers(), _record_fastnas_inputs(kept), \
                        contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                    candidate, _ = mtp.prune(candidate, mode=[("fastnas", rules)], constraints={"flops": limit},
                                             dummy_input=task.example,
                                             config={"data_loader": loader, "score_func": score,
                                                     "checkpoint": checkpoint, "verbose": False})
                hook.remove()
                flops = task.count_flops(candidate)
                searches.append({"constraint": limit, "landed": flops / task.budget_flops})
                if best is None or abs(flops - task.budget_flops) < abs(best[1] - task.budget_flops):
                    best = (candidate, flops, kept)
                if abs(flops / task.budget_flops - 1) <= TOLERANCE:
                    break
                if len(searches) > 1 and searches[-2]["landed"] == searches[-1]["landed"]:
                    break  # the ladder did not move with the constraint (flat sensitivities): no rung nearer
                if flops < task.budget_flops:
                    under = max(under, limit)
                else:
                    over = min(over, limit)
                limit = (under + over) / 2 if under and over < math.inf else limit * task.budget_flops / flops
        info["searches"] = searches
        info["score_seconds"] = round(info["score_seconds"], 1)
        pruned, _, kept = best
        _fastnas_function_check(model, pruned, kept, loader, task, info)
        return pruned

    return _run_peer("nvidia-modelopt", model, task, prune)


def _fastnas_function_check(original: nn.Module, pruned: nn.Module, kept: dict[str, set[int]], loader: list,
                            task: PeerTask, info: dict) -> None:
    """FastNAS re-estimates BatchNorm statistics on purpose, so the exported network is compared with
    the original whose removed input channels are zeroed after both had their statistics re-estimated
    on the same batches (the structure and weights are what is checked). ``bn_stats_check``: how far
    the exported statistics are from that re-estimate (0 when they belong to the exported subnet)."""
    if _uncheckable(original) or not kept:
        info["function_check"] = _uncheckable(original) or "not checked: the kept channels could not be read"
        return
    reference, checked = copy.deepcopy(original), copy.deepcopy(pruned)
    _zero_removed_inputs(reference, kept)
    _reestimate_bn(reference, loader)
    _reestimate_bn(checked, loader)
    exported, reestimated = _bn_stats(pruned), _bn_stats(checked)
    info["bn_stats_check"] = max(float((exported[k] - reestimated[k]).abs().max()) for k in exported)
    _function_check(checked, reference, _check_inputs(task), info)


# --------------------------------------------------------------------------------------------------
# OTO v3 (only-train-once 3.0.1), HESSO


def _shim_oto_import():
    """``import only_train_once`` fails on torch >= 2.9: ``torch.onnx._globals`` moved to
    ``torch.onnx._internal.torchscript_exporter._globals`` and ``torch.onnx._optimize_graph`` (used
    to build its graph) now lives only in ``torch.onnx.utils``. Alias both where they are missing."""
    try:
        importlib.import_module("torch.onnx._globals")
    except ModuleNotFoundError:
        from torch.onnx._internal.torchscript_exporter import _globals

        sys.modules["torch.onnx._globals"] = _globals
    if not hasattr(torch.onnx, "_optimize_graph"):
        torch.onnx._optimize_graph = torch.onnx.utils._optimize_graph
    from only_train_once import OTO

    return OTO


@contextlib.contextmanager
def _shim_hesso_cuda(model: nn.Module):
    """HESSO builds its mask of redundant groups with ``torch.zeros(...).cuda()``, which fails without
    CUDA and mismatches a CPU model: while it steps a CPU model, ``Tensor.cuda`` returns the tensor."""
    if next(model.parameters()).device.type != "cpu":
        yield
        return
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda


def _shim_oto_depthwise(model: nn.Module) -> int:
    """OTO's subnet construction updates a pruned depthwise conv's ``out_channels`` and ``groups``
    but not ``in_channels``: set it from the weight. Returns how many convs it fixed."""
    fixed = 0
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and m.in_channels != m.weight.shape[1] * m.groups:
            m.in_channels = m.weight.shape[1] * m.groups
            fixed += 1
    return fixed


def _oto_build(OTO, model: nn.Module, task: PeerTask):
    with contextlib.redirect_stdout(io.StringIO()):
        oto = OTO(model, task.example)
    return oto


def _oto_groups(oto) -> int:
    return sum(g["num_groups"] for g in oto._graph.get_param_groups() if g["is_prunable"] and not g["is_auxiliary"])


def _oto_hesso(oto, task: PeerTask, sparsity: float, steps: int, lr: float):
    """HESSO in the shape of OTO's tutorials (warm-up, then pruning over periods; ResNet18/CIFAR10:
    start 10 epochs, 10 periods over 10 epochs): here the first tenth of the steps warms up, the
    zeroing runs over the next half in up to 10 periods, the rest trains the surviving groups.
    Momentum and weight decay are the contract's (HESSO's SGD has no Nesterov)."""
    start = steps // 10
    pruning_steps = max(1, steps // 2)
    with contextlib.redirect_stdout(io.StringIO()):
        return oto.hesso(variant="sgd", lr=lr, first_momentum=0.9, weight_decay=5e-4, target_group_sparsity=sparsity,
                         start_pruning_step=start, pruning_periods=min(10, pruning_steps), pruning_steps=pruning_steps)


def _oto_subnet(oto) -> nn.Module:
    """OTO's ``construct_subnet`` (it prunes the traced model in place and saves it as a pickle, which
    is written to a temporary folder and not read back): the pruned object itself."""
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        oto.construct_subnet(out_dir=folder, save_full_group_sparse_model=False)
    _shim_oto_depthwise(oto._model)
    return oto._model


def _oto_dry_run_flops(OTO, model: nn.Module, task: PeerTask, batch, sparsity: float) -> int:
    """FLOPs of the subnet HESSO selects at ``sparsity`` from ``model`` as it is: one HESSO step with
    learning rate 0 and a single pruning period zeroes the groups its importance scores pick on one
    batch, then ``construct_subnet``. Only a copy is touched."""
    probe = copy.deepcopy(model)
    oto = _oto_build(OTO, probe, task)
    probe.train()
    optimizer = _oto_hesso(oto, task, sparsity, steps=1, lr=0.0)
    x, y = batch
    F.cross_entropy(probe(x), y).backward()
    with _shim_hesso_cuda(probe), contextlib.redirect_stdout(io.StringIO()):
        optimizer.step()
    probe.eval()
    return task.count_flops(_oto_subnet(oto))


def _closest_count(task: PeerTask, low: int, high: int, flops_of: Callable[[int], int]) -> tuple[int, list]:
    """The count in [low, high] whose ``flops_of(count)`` (falling as the count grows) is closest to
    the budget, by bisection; also every (count, landed fraction) tried."""
    best, tried = None, []
    while low <= high:
        mid = (low + high) // 2
        flops = flops_of(mid)
        tried.append((mid, round(flops / task.budget_flops, 4)))
        if best is None or abs(flops - task.budget_flops) < abs(best[1] - task.budget_flops):
            best = (mid, flops)
        if flops > task.budget_flops:
            low = mid + 1
        else:
            high = mid - 1
    return best[0], tried


def _oto_final_period_next(optimizer) -> bool:
    """Whether HESSO's next step opens its last pruning period (its own test, one step ahead)."""
    step = optimizer.num_steps + 1
    return (step >= optimizer.start_pruning_step and optimizer.curr_pruning_period == optimizer.pruning_periods - 1
            and (step - optimizer.start_pruning_step - 1) % optimizer.pruning_period_duration == 0)


def _oto_set_final_period(optimizer, count: int) -> None:
    """Let HESSO's last period zero ``count`` more groups (its knob, for the last period)."""
    optimizer.active_num_redundant_groups[-1] = count
    optimizer.target_num_redundant_groups = len(optimizer.pruned_group_idxes) + count


def _copy_with_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Copies of the network (gradients included) and of its optimizer, all of whose state refers
    to the copied parameters. ``copy.deepcopy`` of a torch optimizer keeps only its param groups and
    state (``Optimizer.__getstate__``), and of a parameter drops its gradient."""
    memo: dict = {}
    probe = copy.deepcopy(model, memo)
    for original, copied in zip(model.parameters(), probe.parameters()):
        copied.grad = None if original.grad is None else original.grad.clone()
    probe_optimizer = object.__new__(type(optimizer))
    probe_optimizer.__dict__.update(copy.deepcopy(optimizer.__dict__, memo))
    return probe, probe_optimizer


def _oto_final_period_flops(OTO, model: nn.Module, optimizer, task: PeerTask, count: int) -> int:
    """FLOPs of the subnet if HESSO's last period, about to open with the gradients in ``model`` now,
    zeroes ``count`` more groups: on a copy of the network and the optimizer, the step that opens the
    period runs with learning rate 0 and a one-step period (the selected groups go straight to zero),
    then ``construct_subnet``. The selection is the one the real step will make."""
    probe, probe_optimizer = _copy_with_optimizer(model, optimizer)
    _oto_set_final_period(probe_optimizer, count)
    probe_optimizer.pruning_period_duration = 1
    probe_optimizer.set_learning_rate(0.0)
    with _shim_hesso_cuda(probe), contextlib.redirect_stdout(io.StringIO()):
        probe_optimizer.step()
    probe.eval()
    return task.count_flops(_oto_subnet(_oto_build(OTO, probe, task)))


def prune_oto_hesso(model: nn.Module, task: PeerTask) -> tuple[nn.Module, dict]:
    """OTO v3: HESSO sparse training from the trained network for ``task.sparse_steps`` steps, then
    ``construct_subnet``. Its knob is a fraction of channel groups, not FLOPs: it is set before
    training from dry runs of HESSO's own selection on the trained network (bisected), and the
    count of HESSO's last pruning period is re-planned when that period opens, from the selection
    HESSO is about to make (bisected on copies), so that the subnet lands on the budget."""

    def prune(info: dict) -> nn.Module:
        info["peer"] = _version("only-train-once")
        OTO = _shim_oto_import()
        model.eval()
        oto = _oto_build(OTO, model, task)
        groups = _oto_groups(oto)
        batch = next(task.train_batches(task.seed))
        zeroed, dry_runs = _closest_count(
            task, 0, groups - 1, lambda k: _oto_dry_run_flops(OTO, model, task, batch, (k + 0.5) / groups))
        sparsity = (zeroed + 0.5) / groups  # HESSO zeroes int(groups * sparsity) groups
        info.update(optimizer="HESSO (sgd)", groups=groups, target_group_sparsity=round(sparsity, 4),
                    dry_runs=dry_runs)
        optimizer = _oto_hesso(oto, task, sparsity, task.sparse_steps, task.lr)
        info.update(start_pruning_step=optimizer.start_pruning_step, pruning_steps=optimizer.pruning_steps,
                    pruning_periods=optimizer.pruning_periods)

        def step(loss: torch.Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if _oto_final_period_next(optimizer):
                done = len(optimizer.pruned_group_idxes)
                count, tried = _closest_count(task, 0, groups - done - 1,
                                              lambda r: _oto_final_period_flops(OTO, model, optimizer, task, r))
                info.update(final_period_planned=optimizer.active_num_redundant_groups[-1],
                            final_period_count=count, final_period_tries=tried)
                _oto_set_final_period(optimizer, count)
            with _shim_hesso_cuda(model), contextlib.redirect_stdout(io.StringIO()):
                optimizer.step()

        _train(model, task, step)
        info["sparse_steps"] = task.sparse_steps
        info["zeroed_groups"] = optimizer.curr_num_zero_groups
        full = copy.deepcopy(model).eval()
        subnet = _oto_subnet(oto)
        _function_check(subnet, full, _check_inputs(task), info)
        return subnet

    return _run_peer("only-train-once", model, task, prune)


# --------------------------------------------------------------------------------------------------
# Self-test (compress.py --quick runs it, so tests/test_benchmarks.py covers every peer)


class _TinyNet(nn.Module):
    """The self-test's network: a residual basic block and an inverted residual block (expansion,
    depthwise, projection), so that every peer meets coupled residual channels and a depthwise conv."""

    def __init__(self, classes: int = 4):
        super().__init__()

        def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]

        self.stem = nn.Sequential(*conv_bn(3, 16, 3), nn.ReLU())
        self.block = nn.Sequential(*conv_bn(16, 16, 3), nn.ReLU(), *conv_bn(16, 16, 3))
        self.down = nn.Sequential(*conv_bn(16, 32, 3, 2), nn.ReLU())
        self.inverted = nn.Sequential(*conv_bn(32, 64, 1), nn.ReLU6(), *conv_bn(64, 64, 3, groups=64), nn.ReLU6(),
                                      *conv_bn(64, 32, 1))
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = self.down(x)
        x = x + self.inverted(x)
        return self.fc(x.mean((2, 3)))


def _selftest_task(sparse_steps: int) -> tuple[nn.Module, PeerTask]:
    """A learnable 4-class task on 8x8 noise images (the class is set by the mean colour) and the
    tiny network trained on it briefly, so that scores are not flat."""
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(3, 4, generator=generator)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 3, 8, 8, generator=generator) + torch.randn(n, 3, 1, 1, generator=generator)
        return x, (x.mean((2, 3)) @ mixing).argmax(1)

    train_x, train_y = draw(512)
    val_x, val_y = draw(128)

    def train_batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.Generator().manual_seed(seed)
        while True:
            for idx in torch.randperm(len(train_x), generator=order).split(32):
                if len(idx) == 32:
                    yield train_x[idx], train_y[idx]

    @torch.no_grad()
    def val_score(m: nn.Module) -> float:
        m.eval()
        return float((m(val_x).argmax(1) == val_y).float().mean())

    from morphnet.pipeline.training import count_flops

    torch.manual_seed(0)
    model = _TinyNet()
    optimizer = _sgd(model, 0.05)
    batches = train_batches(1)
    model.train()
    for _ in range(60):
        x, y = next(batches)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    example = train_x[:1]
    task = PeerTask(example=example, budget_flops=0.5 * count_flops(model, example), train_batches=train_batches,
                    val_score=val_score, count_flops=lambda m: count_flops(m, example), sparse_steps=sparse_steps,
                    lr=0.01, seed=0, ignored=["fc"])
    return model, task


def selftest(sparse_steps: int = 10) -> list[dict]:
    """Every peer once on a tiny trained network at half its FLOPs. Returns one row per peer; raises
    RuntimeError naming the peers that crashed or whose pruned network computes something else."""
    model, task = _selftest_task(sparse_steps)
    peers = {
        "tp_magnitude_local": lambda m, t: prune_tp_magnitude(m, t, global_pruning=False),
        "tp_magnitude_global": lambda m, t: prune_tp_magnitude(m, t, global_pruning=True),
        "tp_bnscale": prune_tp_bnscale,
        "tp_groupnorm": prune_tp_groupnorm,
        "fastnas": lambda m, t: prune_fastnas(m, t, max_searches=3),
        "oto_hesso": prune_oto_hesso,
    }
    rows, failed = [], []
    for name, prune in peers.items():
        _, info = prune(copy.deepcopy(model), task)
        rows.append({"arm": name, **info})
        check = info.get("function_check")
        if "error" in info:
            failed.append(f"{name}: {info['error']} ({info.get('error_at')})")
        elif isinstance(check, float) and not check <= 1e-4 * max(1.0, info["function_check_scale"]):
            failed.append(f"{name}: the pruned network differs from the original by {check:.3g}")
    if failed:
        raise RuntimeError("compress_peers self-test: " + "; ".join(failed))
    return rows
