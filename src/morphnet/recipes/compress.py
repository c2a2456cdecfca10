"""Compress a trained network to a budget in one call: ``morphnet.compress``.

The job most users bring: a trained model that should cost half or a quarter as much, losing as
little accuracy as possible. The stages, all on a copy (the model passed in is left as it was):

1. **learn** (optional, ``learn_fraction`` of the steps; 0 by default): the training loss plus
   ``strength x`` the MorphNet term (cost-weighted L1 on BatchNorm scales, or group lasso without
   BatchNorm), the strength steered by :class:`morphnet.control.landing.LandingController` so that the
   channels the budget will cut shrink evenly to below the alive threshold by the end of the ramp;
2. **land**: the alive threshold is scaled until the structure costs the target (the strongest
   channels the budget allows are kept, then the strongest cut groups that still fit put back), and the
   network is rebuilt with those channels' trained weights (``apply_structure(..., keep_weights=True)``):
   the same classes and attribute names, narrower, on budget to within one channel group and never
   above it; the rebuilt network is checked against the original with the cut channels zeroed;
3. **recalibrate** the BatchNorm statistics on training batches (forward passes only);
4. **fine-tune** for the remaining steps (warm-up, then cosine decay from ``lr`` to 0), distilling the
   original model's outputs by default.

Why learning is off by default: on a trained ResNet-20 of our development task (docs/benchmarks.md,
"Compressing a trained network: the recipe"), spending half of 2,000 steps on MorphNet's FLOP-weighted
penalty before landing ended 5-10 points below landing at once on the trained scales and fine-tuning
for all 2,000 steps, and ranking channels by scale per FLOP ended 15 points below ranking by scale.

Only ``morphnet``'s public names are used (and ``morphnet.control``): a recipe on top of the library.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

import morphnet
from morphnet.control.landing import LandingController
from morphnet.control.strength import resolve_target
from morphnet.recipes.batchnorm import recalibrate_batchnorm

#: resource name -> class-name suffix of morphnet's regularizers
_RESOURCES = {"flops": "Flops", "size": "ModelSize", "latency": "Latency"}
_REGULARIZERS = ("auto", "gamma", "group-lasso")
RegularizerFactory = Callable[[nn.Module, Any], Any]
Loss = Callable[[nn.Module, Any], torch.Tensor]


def compress(
    model: nn.Module,
    example_inputs: Any,
    target: float = 0.5,
    *,
    data: Iterable,
    steps: int,
    loss_fn: Loss | None = None,
    distill: bool | None = None,
    temperature: float = 4.0,
    distill_weight: float = 0.9,
    lr: float = 0.01,
    weight_decay: float = 5e-4,
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    learn_fraction: float = 0.0,
    ramp_fraction: float = 0.5,
    resource: str = "flops",
    hardware: Any = None,
    regularizer: str | RegularizerFactory = "auto",
    threshold: float | None = None,
    min_layer_fraction: float = 0.25,
    bn_batches: int = 100,
    selection: str = "scales",
    val_fn: Callable[[nn.Module], float] | None = None,
    on_step: Callable[[str, int], None] | None = None,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = print,
    report: dict | None = None,
) -> nn.Module:
    """A smaller copy of the trained ``model`` that costs ``target`` (a fraction of its cost when <= 1,
    else an absolute cost in the resource's unit), trained for ``steps`` optimizer steps in all.

    ``data``: training batches, re-iterated as often as needed (a DataLoader, a list; an iterator that
    runs out is an error). ``loss_fn(model, batch)`` returns the loss to minimize; the default is the
    cross-entropy of ``model(x)`` against ``y`` for ``(x, y)`` batches, plus (``distill``, on by default
    with the default loss) distillation from the original model: ``distill_weight`` x temperature^2 x
    KL(softened outputs) + (1 - ``distill_weight``) x cross-entropy. ``optimizer(parameters)`` builds the
    optimizer of each phase (default SGD, momentum 0.9, Nesterov, ``lr``, ``weight_decay``); fine-tuning
    warms up over 5% of its steps and decays to 0 (cosine).

    ``learn_fraction``: the share of the steps spent learning the structure with MorphNet's penalty
    (``regularizer``: ``"gamma"`` on BatchNorm scales, ``"group-lasso"`` on weights, ``"auto"``, or a
    function ``(model, example_inputs) -> network regularizer``) before landing; 0 (the default) lands
    at once on the trained model's own scales, which did better on our development task (see
    docs/benchmarks.md). ``resource``: ``"flops"`` (per example, 2 x multiply-adds, equal to
    ``torch.utils.flop_counter.FlopCounterMode``), ``"size"`` (weights) or ``"latency"`` (with
    ``hardware``). ``threshold``: the alive threshold (default 1e-2 on BatchNorm scales, group lasso's
    relative default on weights). No layer is cut below ``min_layer_fraction`` of its width. ``selection="uniform"``
    keeps one width multiplier for every layer instead (each layer's largest-L1 channels): the
    baseline to compare with, fine-tuned the same way. ``val_fn(model) -> score`` (optional) is called
    after each stage and its scores logged; ``on_step(phase, step)`` after every optimizer step (it may
    raise to stop). Pass a dict as ``report`` to receive the figures (costs, widths, scores, seconds,
    the function check, the learning history).

    Returns the slim model (same classes, on ``device``, in the training mode ``model`` was in).
    Raises ``ValueError`` before any training when the target is below the lowest cost the structure
    allows (one channel group per layer, the floor and the channels that cannot be pruned).
    """
    start = time.perf_counter()
    _check_arguments(model, target, steps, learn_fraction, ramp_fraction, resource, regularizer, bn_batches)
    if selection not in ("scales", "uniform"):
        raise ValueError(f"morphnet.compress: selection must be 'scales' or 'uniform', got {selection!r}")
    if selection == "uniform" and learn_fraction:
        raise ValueError("morphnet.compress: selection='uniform' keeps the trained weights as they are; "
                         "it has no learning phase (learn_fraction=0)")
    if distill and loss_fn is not None:
        raise ValueError("morphnet.compress: distill=True works with the default (inputs, labels) loss; with your "
                         "own loss_fn, put the distillation in it and pass distill=False")
    say = log or (lambda message: None)
    device = torch.device(device) if device is not None else _device_of(model)
    was_training = model.training
    work = copy.deepcopy(model).to(device)
    example = pytree.tree_map(lambda t: t.to(device) if torch.is_tensor(t) else t, example_inputs)
    base_loss = loss_fn or _cross_entropy
    distill = loss_fn is None if distill is None else distill
    train_loss = _distillation(copy.deepcopy(work).eval(), temperature, distill_weight) if distill else base_loss
    batches = _cycle(data, device)
    make_optimizer = optimizer or (lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True,
                                                                  weight_decay=weight_decay))
    reg = _make_regularizer(work, example, resource, hardware, regularizer, threshold, min_layer_fraction)
    seed_cost = float(reg.get_cost())
    if seed_cost <= 0:
        raise ValueError(f"morphnet.compress: the {reg.cost_name} of {type(model).__name__} is 0; nothing to compress")
    target_cost = resolve_target(float(target), seed_cost)
    if target_cost >= seed_cost:
        raise ValueError(f"morphnet.compress: the target {target_cost:.6g} {reg.cost_name} is not below the model's "
                         f"{seed_cost:.6g}; give a fraction below 1 (0.5 halves it) or a smaller absolute cost")
    try:
        initial_scale = reg.threshold_scale_for_cost(target_cost)
    except ValueError as error:
        raise ValueError(f"morphnet.compress: {error}; aim higher or lower min_layer_fraction") from None
    out: dict[str, Any] = {"resource": resource, "cost_name": reg.cost_name, "seed_cost": seed_cost,
                           "target_cost": target_cost, "regularizer": reg.name, "distill": distill, "scores": {},
                           "history": []}
    seed_widths = morphnet.StructureExporter(reg).get_alive_counts()
    _score(val_fn, work, "seed", out, say)

    learn_steps = min(steps, round(steps * learn_fraction))
    finetune_steps = steps - learn_steps
    if learn_steps:
        say(f"compress: learning the structure for {learn_steps} steps ({reg.name}, target "
            f"{target_cost / seed_cost:.3f}x of {seed_cost:.4g} {reg.cost_name})")
        ramp_steps = max(1, round(learn_steps * ramp_fraction))
        # the push that would shrink the channels at the landing scale to the threshold along the ramp, were
        # nothing pushing back (SGD with momentum 0.9 moves lr / (1 - 0.9) per unit of steady gradient); the
        # controller corrects it from there. A custom optimizer starts from 1 / seed cost.
        step_size = 10 * lr if optimizer is None else None
        initial_strength = _initial_strength(reg, initial_scale, ramp_steps, step_size, seed_cost)
        out["initial_strength"] = initial_strength
        out["history"] = _learn(work, reg, batches, train_loss, make_optimizer, learn_steps, ramp_steps,
                                initial_scale, initial_strength, seed_cost, target_cost, on_step=on_step)
        _score(val_fn, work, "learned", out, say)

    if selection == "uniform":
        slim = shrink_uniformly(work, example, target_cost, resource=resource, hardware=hardware)
        cost = float(morphnet.compute_cost(slim, example, resource=resource, hardware=hardware))
        widths = {name: seed_widths.get(name, 0) for name in seed_widths}
        widths.update({r["name"]: r["channels"] for r in morphnet.cost_table(slim, example) if r["name"] in widths})
        landed = {"cost": cost, "threshold_scale": None, "widths": widths, "rebuild_warnings": [],
                  "function_check": "kept-weights rebuild of the largest-L1 channels"}
    else:
        slim, landed = _land(work, reg, example, target_cost)
    out.update(landed)
    out["seed_widths"] = seed_widths
    say(f"compress: landed at {landed['cost'] / seed_cost:.4f}x ({landed['cost']:.4g} of {seed_cost:.4g} "
        f"{reg.cost_name}); {sum(landed['widths'].values())} of {sum(seed_widths.values())} channels kept")
    _score(val_fn, slim, "landed", out, say)
    out["recalibrated_batchnorms"] = recalibrate_batchnorm(slim, batches, bn_batches, base_loss)
    _score(val_fn, slim, "recalibrated", out, say)

    if finetune_steps:
        say(f"compress: fine-tuning for {finetune_steps} steps" + (" (distilling the original)" if distill else ""))
        _finetune(slim, batches, train_loss, make_optimizer, finetune_steps, on_step=on_step)
    _score(val_fn, slim, "finetuned", out, say)
    slim.train(was_training)
    out["seconds"] = time.perf_counter() - start
    out["steps"] = {"learn": learn_steps, "finetune": finetune_steps, "batchnorm_batches": bn_batches}
    if report is not None:
        report.update(out)
    return slim


def _distillation(teacher: nn.Module, temperature: float, weight: float) -> Loss:
    """The default loss with distillation from ``teacher`` (the original model, frozen, eval mode)."""
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(torch.is_tensor(b) for b in batch)):
            return _cross_entropy(model, batch)  # names loss_fn in its error
        x, y = batch
        out = model(x)
        with torch.no_grad():
            soft = F.softmax(teacher(x) / temperature, dim=1)
        kl = F.kl_div(F.log_softmax(out / temperature, dim=1), soft, reduction="batchmean")
        return weight * temperature ** 2 * kl + (1 - weight) * F.cross_entropy(out, y)

    return loss


def _check_arguments(model, target, steps, learn_fraction, ramp_fraction, resource, regularizer, bn_batches) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"morphnet.compress: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0:
        raise ValueError(f"morphnet.compress: target must be a positive number (a fraction <= 1 of the model's "
                         f"cost, or an absolute cost), got {target!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"morphnet.compress: steps must be a positive integer, got {steps!r}")
    if not 0 <= learn_fraction <= 1:
        raise ValueError(f"morphnet.compress: learn_fraction must be in [0, 1], got {learn_fraction}")
    if not 0 < ramp_fraction <= 1:
        raise ValueError(f"morphnet.compress: ramp_fraction must be in (0, 1], got {ramp_fraction}")
    if resource not in _RESOURCES:
        raise ValueError(f"morphnet.compress: resource must be one of {', '.join(_RESOURCES)}, got {resource!r}")
    if not callable(regularizer) and regularizer not in _REGULARIZERS:
        raise ValueError(f"morphnet.compress: regularizer must be one of {', '.join(_REGULARIZERS)}, got {regularizer!r}")
    if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 0:
        raise ValueError(f"morphnet.compress: bn_batches must be an integer >= 0, got {bn_batches!r}")


def _device_of(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    """The default loss: cross-entropy of ``model(x)`` against ``y`` for an ``(x, y)`` batch."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(torch.is_tensor(b) for b in batch)):
        raise ValueError(f"morphnet.compress: the default loss takes (inputs, labels) batches, got "
                         f"{type(batch).__name__}; pass loss_fn=lambda model, batch: <the loss of one batch>")
    x, y = batch
    return F.cross_entropy(model(x), y)


def _cycle(data: Iterable, device: torch.device) -> Iterator[Any]:
    """Batches of ``data`` on ``device`` forever: a re-iterable (DataLoader, list) starts over at its
    end; a one-pass iterator that runs out is an error, not a silent repeat of nothing."""
    if not isinstance(data, Iterable):
        raise TypeError(f"morphnet.compress: data must be an iterable of batches (a DataLoader), got "
                        f"{type(data).__name__}")
    one_pass = iter(data) is data
    while True:
        count = 0
        for batch in data:
            count += 1
            yield pytree.tree_map(lambda t: t.to(device, non_blocking=True) if torch.is_tensor(t) else t, batch)
        if count == 0 or one_pass:
            raise ValueError(f"morphnet.compress: data ran out{' (it is empty)' if count == 0 else ''}; pass a "
                             f"DataLoader or a list that can be iterated again")


def _make_regularizer(model, example, resource, hardware, kind, threshold, min_layer_fraction):
    if callable(kind):
        return kind(model, example)
    if kind == "auto":
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        kind = "gamma" if has_bn else "group-lasso"
    suffix = _RESOURCES[resource]
    extra = {"hardware": hardware} if resource == "latency" else {}
    if kind == "gamma":
        cls = getattr(morphnet, f"Gamma{suffix}Regularizer")
        return cls(model, example, gamma_threshold=1e-2 if threshold is None else threshold,
                   min_layer_fraction=min_layer_fraction, **extra)
    cls = getattr(morphnet, f"GroupLasso{suffix}Regularizer")
    return cls(model, example, threshold=threshold, min_layer_fraction=min_layer_fraction, **extra)


def _initial_strength(reg, scale: float, ramp_steps: int, step_size: float | None, seed_cost: float) -> float:
    """The strength at which the channels the budget cuts would reach the threshold at the end of the
    ramp if only the penalty moved them: their values must fall by about (scale - 1) x threshold, and
    one step moves a value by step_size x strength x its cost weight (``value_gradients``)."""
    if step_size is None:
        return 1.0 / seed_cost
    with torch.no_grad():
        values = reg.source.values().detach()
        ratio = reg.source.alive_ratio(values)
    weights = reg.value_gradients().detach()
    cut = (ratio <= scale) & (weights > 0)
    if not cut.any():
        return 1.0 / seed_cost
    weight = float(weights[cut].median())
    distance = float(values[cut].max() - values[cut].max() / max(scale, 1.0))  # from the landing value to the threshold
    return max(distance / ramp_steps / (step_size * weight), 1e-12)


def _learn(model, reg, batches, loss_fn, make_optimizer, steps, ramp_steps, initial_scale, initial_strength,
           seed_cost, target_cost, read_every: int = 10, on_step=None) -> list[dict]:
    """Structure learning from the trained weights; returns one record per read of the landing scale."""
    controller = LandingController(initial_scale=initial_scale, initial_strength=initial_strength,
                                   ramp_steps=ramp_steps)
    optimizer = make_optimizer(model.parameters())
    model.train()
    history, last_read = [], 0
    for step in range(1, steps + 1):
        task = loss_fn(model, next(batches))
        loss = task + controller.strength * reg.get_regularization_term()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % read_every == 0 or step == steps:
            scale = reg.threshold_scale_for_cost(target_cost)
            history.append({"step": step, "strength": controller.strength, "landing_scale": scale,
                            "reference": controller.reference(step), "cost": float(reg.get_cost()) / seed_cost,
                            "task_loss": float(task.detach())})
            controller.update(step, scale, steps=step - last_read)
            last_read = step
        if on_step is not None:
            on_step("learn", step)
    return history


def _land(model, reg, example, target_cost) -> tuple[nn.Module, dict]:
    """Scale the alive threshold onto the target and rebuild with the surviving weights."""
    cost = reg.land_on_cost(target_cost)
    scale = reg.threshold_scale
    try:
        widths = morphnet.StructureExporter(reg).get_alive_counts()
        with warnings.catch_warnings(record=True) as caught:  # cut channels are not zero: expected here
            warnings.simplefilter("always")
            slim = morphnet.apply_structure(model, reg, example, keep_weights=True)
        check = _function_check(model, slim, reg, example)
    finally:
        reg.reset_landing()
    if _channels_last(model):
        slim = slim.to(memory_format=torch.channels_last)
    notes = [str(w.message) for w in caught if "shift (beta)" not in str(w.message)]
    if isinstance(check, float) and check > 1e-4:
        warnings.warn(f"morphnet.compress: the rebuilt network differs from the learned one with the cut channels "
                      f"zeroed (relative difference {check:.3g}); please report this as a bug", stacklevel=3)
    return slim, {"cost": cost, "threshold_scale": scale, "widths": widths, "rebuild_warnings": notes,
                  "function_check": check}


def _function_check(model: nn.Module, slim: nn.Module, reg, example) -> float | str:
    """Never prune wrongly, checked: the largest difference (relative to the largest output) between the
    rebuilt network and the learned one with the BatchNorm scales and shifts of every cut channel set to
    0, in eval mode on ``example``. A string says why it could not be checked."""
    if not reg.name.startswith("Gamma"):
        return f"not checked ({reg.name}: only BatchNorm sources are masked here)"
    alive = reg.alive_groups().cpu()
    masked = copy.deepcopy(model)
    params = dict(masked.named_parameters())
    with torch.no_grad():
        for name, ids in reg.analysis.gamma_sources.items():
            cut = ~alive[torch.as_tensor(reg.analysis.group_of[ids])]
            for state in (name, name.rsplit(".", 1)[0] + ".bias"):
                if state in params and params[state].shape == cut.shape:
                    params[state][cut.to(params[state].device)] = 0
    with torch.no_grad():
        a = pytree.tree_leaves(slim.eval()(*_as_tuple(example)))
        b = pytree.tree_leaves(masked.eval()(*_as_tuple(example)))
    slim.train(model.training)
    scale = max(float(t.abs().max()) for t in b if torch.is_tensor(t)) or 1.0
    return max(float((x - y).abs().max()) for x, y in zip(a, b) if torch.is_tensor(x)) / scale


def _as_tuple(example) -> tuple:
    return example if isinstance(example, tuple) else (example,)


def _channels_last(model: nn.Module) -> bool:
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.weight.dim() == 4:
            return m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
    return False


def finetune(model: nn.Module, data: Iterable | Iterator, steps: int, *, lr: float = 0.01, weight_decay: float = 5e-4,
             loss_fn: Loss | None = None,
             optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None) -> nn.Module:
    """Train ``model`` in place for ``steps`` steps: the learning rate warms up over the first 5% and
    decays to 0 along a cosine (the schedule of ``morphnet run``), SGD with Nesterov momentum unless
    ``optimizer(parameters)`` says otherwise. ``data`` as in :func:`compress` (or an endless iterator
    of batches already on the model's device). Returns ``model``."""
    batches = data if isinstance(data, Iterator) else _cycle(data, _device_of(model))
    make_optimizer = optimizer or (lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True,
                                                                  weight_decay=weight_decay))
    _finetune(model, batches, loss_fn or _cross_entropy, make_optimizer, steps)
    return model


def _finetune(model, batches, loss_fn, make_optimizer, steps: int, on_step=None) -> None:
    optimizer = make_optimizer(model.parameters())
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    for step in range(1, steps + 1):
        loss = loss_fn(model, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step("finetune", step)


def _score(val_fn, model: nn.Module, stage: str, out: dict, say) -> None:
    if val_fn is None:
        return
    was_training = model.training
    model.eval()
    try:
        score = float(val_fn(model))
    finally:
        model.train(was_training)
    out["scores"][stage] = score
    say(f"compress: validation score {stage}: {score:.4f}")


def shrink_uniformly(model: nn.Module, example_inputs: Any, target: float, *, resource: str = "flops",
                     hardware: Any = None) -> nn.Module:
    """The baseline every compression is compared with: one width multiplier for every layer, brought to
    ``target`` (a fraction of the cost when <= 1, else absolute), keeping in each layer the channels with
    the largest L1 norm of the weights that produce them (summed over the layers a coupled channel group
    spans) and their trained weights. No training; re-estimate BatchNorm statistics before fine-tuning."""
    if resource not in _RESOURCES:
        raise ValueError(f"shrink_uniformly: resource must be one of {', '.join(_RESOURCES)}, got {resource!r}")
    reg = _make_regularizer(model, example_inputs, resource, hardware, "auto", None, 0.0)
    seed_cost = float(reg.get_cost())
    full = morphnet.StructureExporter(reg).get_alive_counts()
    _, counts = morphnet.find_width_multiplier(model, full, example_inputs, resolve_target(float(target), seed_cost),
                                               resource=resource, hardware=hardware, tolerance=None)
    score = _group_l1(model, reg)
    regularized = torch.as_tensor(reg.grouping.regularized)
    revived = ~regularized  # groups the structure cannot change stay as they are
    for module, groups in reg._export:  # (layer, channel group of each output channel)
        groups = torch.as_tensor(groups)
        need = counts.get(module, len(groups)) - int(revived[groups].sum())
        for g in sorted(set(groups[~revived[groups]].tolist()), key=lambda g: -float(score[g])):
            if need <= 0:
                break
            revived[g] = True
            need -= int((groups == g).sum())
    reg.set_threshold_scale(float("1e30"))
    reg.revived = revived
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return morphnet.apply_structure(model, reg, example_inputs, keep_weights=True)
    finally:
        reg.reset_landing()


def _group_l1(model: nn.Module, reg) -> torch.Tensor:
    """Per channel group: the L1 norm of every conv / linear weight row that produces it, summed."""
    a = reg.analysis
    params = dict(model.named_parameters())
    score = torch.zeros(a.num_groups, dtype=torch.float64)
    for name, info in a.weights.items():
        if name not in params:
            continue
        w = params[name].detach().cpu().double()
        rows = w.movedim(info.out_dim, 0).reshape(len(info.out_ids), -1).abs().sum(1)
        score.index_add_(0, torch.as_tensor(a.group_of[info.out_ids]), rows)
    return score
