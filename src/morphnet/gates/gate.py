"""The FiGS gate: a learnable logit per channel switches the channel on or off at random.

FiGS ("Fine-Grained Stochastic Architecture Search", arXiv:2006.09581) multiplies each
channel by a relaxed Bernoulli sample: with logit l (the log-odds of the channel being on)
and logistic noise n, the mask is sigmoid((l + n) / temperature), which is on with
probability sigmoid(l) and, at a low temperature, nearly binary. One sample per channel
is shared by the whole batch and every spatial position (or token). At inference the
mask is deterministic: 1[l > 0], optionally times sigmoid(l).

``LogisticSigmoidHeadGate`` is the same gate with one logit per attention head, shared by the
head's ``head_dim`` channels, so a head is switched on or off as a whole.

``ChannelScale`` is what a gate becomes when it is folded away and nothing next to it can
absorb its mask: a fixed per-channel factor.
"""

from __future__ import annotations

import torch
from torch import nn


def relaxed_mask(logits: torch.Tensor, noise: torch.Tensor, temperature, straight_through) -> torch.Tensor:
    """sigmoid((logits + noise) / temperature); with ``straight_through`` (bool or per-entry bool
    tensor) the value is the hard 1[logits + noise > 0] and the gradient that of the sigmoid."""
    z = (logits + noise) / temperature
    soft = torch.sigmoid(z)
    if straight_through is False:
        return soft
    hard = (z > 0).to(soft.dtype) + (soft - soft.detach())
    return hard if straight_through is True else torch.where(straight_through, hard, soft)


def logistic_noise(like: torch.Tensor) -> torch.Tensor:
    """Standard logistic samples shaped like ``like`` (from torch's global generator)."""
    tiny = torch.finfo(like.dtype).tiny
    u = torch.rand(like.shape, dtype=like.dtype, device=like.device).clamp_min(tiny)
    return torch.log(u) - torch.log1p(-u)


def _broadcast(mask: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    return mask.to(x.dtype).reshape((len(mask),) + (1,) * (x.dim() - dim - 1))


def _channel_dim(module: nn.Module, x: torch.Tensor, channels: int) -> int:
    dim = module.channel_dim % max(x.dim(), 1)
    if x.dim() == 0 or x.shape[dim] != channels:
        raise ValueError(f"{type(module).__name__} with {channels} channels on dim {module.channel_dim} got a tensor "
                         f"of shape {tuple(x.shape)}; set channel_dim to the dim that holds the channels "
                         f"(1 for conv layouts (N, C, ...), -1 for linear / token layouts (..., C))")
    return dim


class LogisticSigmoidGate(nn.Module):
    """Multiplies channel c of its input by a sample of a relaxed Bernoulli(sigmoid(logits[c])).

    Args:
        num_channels: channels of the gated tensor (one logit each).
        channel_dim: the dim holding the channels: 1 for (N, C, ...), -1 for (..., C).
        log_odds_init: initial logit (2.5: on with probability 0.92).
        temperature: of the relaxation; low values give nearly binary masks.
        annealing_rate: if set, the temperature falls tenfold every ``annealing_rate``
            training forward passes (counted in the ``num_steps`` buffer).
        straight_through: the forward mask is the hard sample 1[l + n > 0]; gradients are
            those of the relaxed sample.
        soft_mask_for_inference: at inference multiply 1[l > 0] by sigmoid(l).
        keep_first_channel_alive: channel 0 is always on, so a layer never goes dark.

    The noise of the last training forward is kept in the ``noise`` buffer, so a
    regularizer sees the same mask the network used (see ``morphnet.gates.source``).
    """

    gate_logits = "logits"  # marks the class as a probabilistic gate for morphnet.sources

    def __init__(self, num_channels: int, *, channel_dim: int = 1, log_odds_init: float = 2.5,
                 temperature: float = 0.001, annealing_rate: float | None = None, straight_through: bool = False,
                 soft_mask_for_inference: bool = False, keep_first_channel_alive: bool = True):
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive integer, got {num_channels!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}; for hard masks use straight_through=True")
        if annealing_rate is not None and not annealing_rate > 0:
            raise ValueError(f"annealing_rate must be > 0 (training steps per tenfold decay), got {annealing_rate}")
        self.channel_dim = int(channel_dim)
        self.log_odds_init = float(log_odds_init)
        self.temperature = float(temperature)
        self.annealing_rate = annealing_rate
        self.straight_through = bool(straight_through)
        self.soft_mask_for_inference = bool(soft_mask_for_inference)
        self.keep_first_channel_alive = bool(keep_first_channel_alive)
        self.logits = nn.Parameter(torch.full((num_channels,), self.log_odds_init))
        self.register_buffer("noise", torch.zeros(num_channels), persistent=False)
        self.register_buffer("tau", torch.tensor(self.temperature), persistent=False)
        if annealing_rate is not None:
            self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))

    @property
    def num_channels(self) -> int:
        """Channels of the gated tensor."""
        return self.logits.shape[0]

    @property
    def num_logits(self) -> int:
        """Learnable logits (one per channel here; one per head in ``LogisticSigmoidHeadGate``)."""
        return self.logits.shape[0]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.logits.fill_(self.log_odds_init)
            self.noise.zero_()
            self.tau.fill_(self.temperature)
            if self.annealing_rate is not None:
                self.num_steps.zero_()

    def leaf_attributes(self) -> dict:
        """What the channel analysis needs to know about this module (see ``morphnet.gates.handler``)."""
        return {"channel_dim": self.channel_dim}

    def probabilities(self) -> torch.Tensor:
        """P(channel on) = sigmoid(logits)."""
        return torch.sigmoid(self.logits)

    def inference_mask(self) -> torch.Tensor:
        """The deterministic mask of eval mode: 1[logits > 0], times sigmoid(logits) if soft."""
        mask = (self.logits > 0).to(self.logits.dtype)
        if self.soft_mask_for_inference:
            mask = mask * torch.sigmoid(self.logits)
        return self._keep_first(mask)

    def _keep_first(self, mask: torch.Tensor) -> torch.Tensor:
        if not self.keep_first_channel_alive:
            return mask
        return torch.cat([torch.ones_like(mask[:1]), mask[1:]])

    def sample_mask(self) -> torch.Tensor:
        """Draw new noise (kept in ``noise``) and return the relaxed mask of a training step."""
        with torch.no_grad():
            if self.annealing_rate is not None:
                self.tau.copy_(self.temperature * 0.1 ** (self.num_steps / self.annealing_rate))
                self.num_steps += 1
            else:
                self.tau.fill_(self.temperature)
            self.noise.copy_(logistic_noise(self.logits))
        return self._keep_first(relaxed_mask(self.logits, self.noise, self.tau, self.straight_through))

    def channel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A mask over the logits as a mask over the gated channels (the same here)."""
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = _channel_dim(self, x, self.num_channels)
        mask = self.sample_mask() if self.training else self.inference_mask()
        return x * _broadcast(self.channel_mask(mask), x, dim)

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={getattr(self, k)}" for k in ("annealing_rate",) if getattr(self, k) is not None)
        flags = "".join(f", {k}=True" for k in ("straight_through", "soft_mask_for_inference")
                        if getattr(self, k))
        return (f"{self.num_channels}, channel_dim={self.channel_dim}, temperature={self.temperature}{extra}{flags}"
                + ("" if self.keep_first_channel_alive else ", keep_first_channel_alive=False"))


class LogisticSigmoidHeadGate(LogisticSigmoidGate):
    """A ``LogisticSigmoidGate`` with one logit per attention head: head h's mask multiplies its
    ``head_dim`` channels ``h * head_dim ... (h + 1) * head_dim - 1`` of the gated tensor.

    ``add_gates`` puts one on the input of an attention module's output projection (the heads
    merged back, ``num_heads * head_dim`` channels on the last dim), where a closed head is zero for
    the projection, the head's only reader. The channel analysis ties each head's channels into one
    group and maps logit h to it, so the regularizer's penalty and cost are per head: the head's
    q / k / v rows, its output-projection columns and its share of the attention products.
    ``keep_first_channel_alive`` keeps head 0 on. Other options are those of ``LogisticSigmoidGate``.
    In grouped-query attention a "head" here is the block of query heads that share a key / value
    head (``head_dim`` is then the block's width), the unit the rebuild removes.
    """

    def __init__(self, num_heads: int, head_dim: int, *, channel_dim: int = -1, **options):
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive integer, got {head_dim!r}")
        super().__init__(num_heads, channel_dim=channel_dim, **options)
        self.head_dim = head_dim

    @property
    def num_heads(self) -> int:
        return self.logits.shape[0]

    @property
    def num_channels(self) -> int:
        return self.num_heads * self.head_dim

    def leaf_attributes(self) -> dict:
        return {"channel_dim": self.channel_dim, "head_dim": self.head_dim}

    def channel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.repeat_interleave(self.head_dim)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, " + super().extra_repr().split(", ", 1)[1]


class ChannelScale(nn.Module):
    """A fixed per-channel factor (a folded gate whose mask nothing else could absorb)."""

    def __init__(self, scale: torch.Tensor, channel_dim: int = 1):
        super().__init__()
        self.channel_dim = int(channel_dim)
        self.register_buffer("scale", scale.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * _broadcast(self.scale, x, _channel_dim(self, x, len(self.scale)))

    def extra_repr(self) -> str:
        return f"{len(self.scale)}, channel_dim={self.channel_dim}"
