"""The normal training recipe, evaluation and FLOP counting shared by every stage.

The same ``train`` runs the seed baseline and the slim model's retraining from scratch, so the
comparison between them is fair (same steps, schedule, batch size and data order).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from morphnet.data import TensorImages
from morphnet.pipeline.distributed import DistContext


def infinite_batches(
    dataset: Dataset, batch_size: int, *, seed: int, ctx: DistContext, start: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches forever, each rank drawing its own share of every epoch. The order is a
    function of ``seed`` alone (never of the global RNG), and ``start`` skips that many batches,
    so a resumed run sees the batches an uninterrupted one would."""
    per_rank = len(dataset) // ctx.world_size
    batch_size = max(1, min(batch_size, per_rank))
    sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=seed, drop_last=True)
    workers = 0 if isinstance(dataset, TensorImages) else 2
    per_epoch = len(sampler) // batch_size
    epoch, skip = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)[skip * batch_size:]
        loader = DataLoader(
            dataset, batch_size, sampler=order, drop_last=True, num_workers=workers,
            generator=torch.Generator().manual_seed(seed + epoch), pin_memory=ctx.device.type == "cuda",
        )
        for x, y in loader:
            yield x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        epoch, skip = epoch + 1, 0


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum 0.9, the usual recipe for convolutional networks."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


StepHook = Callable[[int, dict], None]


def train(
    model: nn.Module,
    dataset: Dataset,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    ctx: DistContext,
    weight_decay: float = 5e-4,
    on_log: StepHook | None = None,
    log_every: int = 10,
    progress=None,
    state: dict | None = None,
    on_step: Callable[[int, Callable[[], dict]], None] | None = None,
) -> nn.Module:
    """Train ``model`` (already on ``ctx.device``) from its current weights for ``steps`` steps with
    a cosine learning-rate decay after a 5% warm-up. ``on_log(step, metrics)`` sees the loss and
    the training accuracy averaged since the previous call. ``on_step(step, snapshot)`` runs after
    every step; ``snapshot()`` is the loop's state (step, optimizer, schedule, meter), which
    ``state`` takes to continue from that step (the caller restores the model and the RNG)."""
    net = ctx.wrap(model)
    net.train()
    optimizer = make_optimizer(model, lr, weight_decay)
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    meter = Meter()
    first = 1
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        meter.load_state_dict(state["meter"])
        first = state["step"] + 1
    batches = infinite_batches(dataset, batch_size, seed=seed, ctx=ctx, start=first - 1)

    def snapshot() -> dict:
        return {"step": step, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "meter": meter.state_dict()}

    for step in range(first, steps + 1):
        x, y = next(batches)
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        meter.add(loss=loss.detach(), correct=(logits.argmax(1) == y).sum(), count=len(y))
        if progress is not None:
            progress.update(1)
        if on_log is not None and (step % log_every == 0 or step == steps):
            on_log(step, meter.flush())
        if on_step is not None:
            on_step(step, snapshot)
    return model


class Meter:
    """Running sums of loss and accuracy kept on the device, read (one sync) only when flushed."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.batches = 0
        self.correct = 0
        self.count = 0

    def add(self, *, correct: torch.Tensor, count: int, **losses: torch.Tensor) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0) + value.float()
        self.batches += 1
        self.correct = self.correct + correct
        self.count += count

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "batches": self.batches, "correct": self.correct, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.batches = dict(state["sums"]), state["batches"]
        self.correct, self.count = state["correct"], state["count"]

    def flush(self) -> dict[str, float]:
        metrics = {k: float(v) / self.batches for k, v in self.sums.items()}
        metrics["train_accuracy"] = float(self.correct) / max(1, self.count)
        self.__init__()
        return metrics


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on all of ``dataset`` (every rank evaluates the whole set)."""
    was_training = model.training
    model.eval()
    correct = 0
    workers = 0 if isinstance(dataset, TensorImages) else 2
    for x, y in DataLoader(dataset, batch_size, num_workers=workers):
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    model.train(was_training)
    return correct / len(dataset)


@torch.no_grad()
def count_flops(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """FLOPs of one forward pass as ``torch.utils.flop_counter.FlopCounterMode`` counts them, an
    oracle independent of MorphNet's own cost model (``example_inputs`` should hold one example).

    Counted in eval mode with the fused fast path of ``nn.MultiheadAttention`` (and of the
    ``nn.Transformer*`` layers) turned off, as the cost convention counts: in eval mode under
    ``no_grad`` that path runs the q/k/v and output projections inside one fused kernel that
    FlopCounterMode does not see (torchvision's vit_b_32: 5.90 GFLOPs instead of 8.73). The
    setting is restored afterwards. The fused CPU attention kernel, which FlopCounterMode leaves
    out, is counted with FlopCounterMode's own formula for its other attention kernels.
    """
    from torch.utils import flop_counter
    from torch.utils.flop_counter import FlopCounterMode

    fused = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
             lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v)}

    was_training = model.training
    fast_path = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=fused) as counter:
            model(example_inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        model.train(was_training)
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    """All parameters, biases and BatchNorm included (the number users compare)."""
    return sum(p.numel() for p in model.parameters())
