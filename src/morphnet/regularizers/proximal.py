"""A proximal (soft-threshold) step for the regularization term.

Adding ``strength * term`` to the loss lets SGD's momentum carry the penalty: a scale pushed
below zero is pushed back up the next step, so scales oscillate around zero with an amplitude
of about lr x strength x their cost weight and a stronger push can count *more* channels alive.
The proximal step takes the penalty out of the loss and applies it after ``optimizer.step()``
as a shrinkage towards zero that stops at zero:

    w_row <- w_row * max(0, 1 - lr * strength * |d term / d w_row| / |w_row|)

For a BatchNorm scale (a row of one) that is ``sign(g) * max(|g| - lr * strength * c, 0)``
with ``c`` the scale's cost weight in the term; for a group-lasso row (the L2 norm of an output
channel's weights and bias, combined over the rows of one group) it is the group soft-threshold: the
term's gradient shrinks every row and bias of a group by the same factor. The weights ``c`` are the term's gradient at
the current point, so every cost model, the per-layer floor and a ``regularizer_decorator``
apply unchanged. Channels the penalty kills become exactly 0 and stay there until the task
gradient pushes harder than the penalty.
"""

from __future__ import annotations

import torch
from torch import nn

from morphnet.sources import GammaSource, GroupLassoSource


def _step_size(optimizer: torch.optim.Optimizer, group: dict) -> float:
    """The distance SGD moves a parameter per unit of a constant gradient: lr x (1 - dampening) /
    (1 - momentum) once momentum has built up (Nesterov too). The penalty added to the loss moves
    that far, so with this step size a strength means the same with and without the proximal step.
    Other optimizers: their lr as it is."""
    if isinstance(optimizer, torch.optim.SGD) and group.get("momentum", 0) and group["momentum"] < 1:
        return float(group["lr"]) * (1 - group.get("dampening", 0)) / (1 - group["momentum"])
    return float(group["lr"])


class ProximalStep:
    """Apply ``regularizer``'s penalty as a proximal step on its source parameters.

    Use it instead of adding the term to the loss::

        prox = morphnet.ProximalStep(reg)
        loss = task_loss                    # no penalty here
        loss.backward(); optimizer.step()
        prox.step(strength, optimizer)      # or a float learning rate

    Given an SGD optimizer, the step size is lr / (1 - momentum): what a constant penalty gradient
    moves a parameter once momentum has built up, so a strength (and ``TargetCost``) means the
    same as with the penalty in the loss. Supports BatchNorm-scale (Gamma) sources and group-lasso
    sources with ``l1_fraction=0``.
    """

    def __init__(self, regularizer):
        source = getattr(regularizer, "source", None)
        if isinstance(source, GammaSource):
            rows = [(getattr(m, a), 0, None) for m, a in source._owners]
        elif isinstance(source, GroupLassoSource):
            if source.l1_fraction > 0:
                raise ValueError(f"ProximalStep: {type(regularizer).__name__} mixes an L1 norm into its group norm "
                                 f"(l1_fraction={source.l1_fraction}); the soft-threshold step is defined for the "
                                 f"plain group L2 norm only: use l1_fraction=0 or add the term to the loss")
            rows = [(getattr(m, a), d, n) for _, entries in source.buckets for (m, a), d, n in entries]
            if source.penalize_bias:  # biases are part of their rows' groups: shrunk element-wise by the
                # term's gradient, which for a group-lasso norm is the same factor as their rows'; a buffer in a
                # joined bias (EVA's zero k_bias) is a constant that stays
                rows += [(getattr(m, a), 0, None) for b in source._biases if not isinstance(b, int)
                         for m, a, _ in b if isinstance(getattr(m, a), nn.Parameter)]
        else:
            raise TypeError(f"ProximalStep: {type(regularizer).__name__} has no BatchNorm-scale or group-lasso "
                            f"source ({type(source).__name__}); add its term to the loss instead")
        self.regularizer = regularizer
        self._rows = rows
        self._params = [p for p, _, _ in rows]
        for p in self._params:
            if not isinstance(p, nn.Parameter) or not p.requires_grad:
                raise ValueError("ProximalStep: a source tensor of the regularizer is not a trainable parameter; "
                                 "the penalty cannot move it")

    def _learning_rates(self, lr) -> list[float]:
        if isinstance(lr, torch.optim.Optimizer):
            by_param = {id(p): _step_size(lr, group) for group in lr.param_groups for p in group["params"]}
            missing = [i for i, p in enumerate(self._params) if id(p) not in by_param]
            if missing:
                raise ValueError("ProximalStep.step: the optimizer does not hold the regularizer's source "
                                 "parameters; pass the optimizer that trains them or a float learning rate")
            return [float(by_param[id(p)]) for p in self._params]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0:
            raise ValueError(f"ProximalStep.step: lr must be an optimizer or a number >= 0, got {lr!r}")
        return [float(lr)] * len(self._params)

    def step(self, strength: float, lr) -> torch.Tensor:
        """Shrink the source parameters by ``lr * strength`` times their cost weights (after the
        optimizer's step); returns the term before the shrinkage, detached (for logging)."""
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength < 0:
            raise ValueError(f"ProximalStep.step: strength must be a number >= 0, got {strength!r}")
        rates = self._learning_rates(lr)
        with torch.enable_grad():
            term = self.regularizer.get_regularization_term()
            if not term.requires_grad:
                return term.detach()
            grads = torch.autograd.grad(term, self._params, allow_unused=True)
        with torch.no_grad():
            for (p, dim, n), g, rate in zip(self._rows, grads, rates):
                if g is None or rate * strength == 0:
                    continue
                if n is None:  # one scale per row
                    p.copy_(p.sign() * (p.abs() - rate * strength * g.abs()).clamp_min(0))
                    continue
                rows = p.movedim(dim, 0).reshape(n, -1)
                grad_rows = g.movedim(dim, 0).reshape(n, -1)
                norms = rows.norm(dim=1, keepdim=True)
                factor = (1 - rate * strength * grad_rows.norm(dim=1, keepdim=True) / norms.clamp_min(1e-30))
                shrunk = rows * factor.clamp_min(0)
                p.copy_(shrunk.reshape(p.movedim(dim, 0).shape).movedim(0, dim))
        return term.detach()
