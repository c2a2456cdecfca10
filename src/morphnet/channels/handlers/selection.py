"""Sorting and selection (topk, sort), data-dependent index ops, and torchvision's region pooling."""

from __future__ import annotations

from morphnet.channels.walker import Chan, Walker, bind, vid
from morphnet.channels.handlers.registry import _io, _ops, _record_data, handles


@handles(*_ops("topk", "sort", "kthvalue", "argsort", "msort", "mode", "median", "nanmedian", "cummax", "cummin"))
def select_along(w: Walker, node) -> None:
    """Sorting / selecting along a dim: along the channel dim the channels stay fixed (the result
    depends on how many there are); along another dim values and indices keep them."""
    b = bind(node)
    x = vid(b["self"])
    rank = len(w.shape(x))
    dim = b.get("dim")
    c = w.chan(x)
    if c is not None:
        if dim is None or (dim % rank) == c.dim:
            w.fix(x)
        else:
            for o in node.outputs:  # values and indices; a reduced dim (kthvalue, median) shifts the channels
                if o is not None:
                    shift = 0 if len(w.shape(o)) == rank else int(dim % rank < c.dim)
                    w.set_chan(o, Chan(c.dim - shift, c.ids))
    for o in node.outputs:
        w.derive(o, x)
    _record_data(w, node, _io(node))


@handles(*_ops("nonzero", "nonzero_static", "_unique2", "unique_dim", "unique_consecutive", "_unique",
               "argwhere", "index_put", "index_put_", "_index_put_impl_", "masked_select", "bincount",
               "searchsorted", "bucketize", "histc", "binary_cross_entropy_with_logits", "binary_cross_entropy",
               "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "nll_loss", "nll_loss2d", "nll_loss_forward",
               "nll_loss2d_forward", "soft_margin_loss", "kl_div", "multilabel_margin_loss"))
def fixes_channels(w: Walker, node) -> None:
    """Data-dependent positions (nonzero, unique), writes at computed indices and losses (a model traced in
    training mode with its targets): channels they touch keep their width (the result depends on where
    and how many channels there are)."""
    for v in node.tensor_inputs():
        w.fix(v)
    for o in node.outputs:
        w.derive(o, *node.tensor_inputs())
    _record_data(w, node, _io(node))


@handles("torchvision.roi_align", "torchvision.roi_pool")
def roi_pool(w: Walker, node) -> None:
    """torchvision's RoIAlign / RoIPool: (N, C, H, W) features -> (K, C, h, w) per region, channel by
    channel, so the channels pass through; the boxes carry none."""
    x = node.tensor_inputs()[0]
    c = w.chan(x)
    for v in node.tensor_inputs()[1:]:
        w.fix(v)
    if c is not None:
        if c.dim != 1:
            w.fix(x)
        else:
            for o in node.outputs:
                if o is not None and w.shape(o)[1] == len(c.ids):
                    w.set_chan(o, c)
    _record_data(w, node, _io(node))


@handles("torchvision.ps_roi_align", "torchvision.ps_roi_pool", "torchvision.deform_conv2d", "torchvision.nms")
def torchvision_fixed(w: Walker, node) -> None:
    """Position-sensitive RoI pooling (channel c reads bin c mod h w), deformable convolution (not yet a
    layer here) and NMS: the channels they read keep their width."""
    fixes_channels(w, node)
