"""Latency / memory numbers by hand, gradients, autocast, torch.compile, hardware table."""

import pytest
import torch
from torch import nn

import morphnet
from morphnet.costs import HARDWARE, get_hardware
from nets import ConcatNet, ResidualNet


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


X = torch.randn(1, 3, 8, 8)


def _kill(bn, channels):
    with torch.no_grad():
        bn.weight[list(channels)] = 0.0


def test_latency_on_flop_only_hardware_is_flops_times_batch():
    net = Small()
    _kill(net.bn, [0, 1, 2])
    flops = morphnet.GammaFlopsRegularizer(net, X, gamma_threshold=0.1).get_cost().item()
    lat = morphnet.GammaLatencyRegularizer(net, X, gamma_threshold=0.1, hardware="FLOP_LATENCY", batch_size=4)
    assert lat.get_cost().item() == pytest.approx(4 * flops)
    assert lat.cost_name == "Latency" and lat.name == "GammaLatency"


def test_latency_on_memory_only_hardware_counts_bytes_of_every_op():
    net = Small()
    _kill(net.bn, [0, 1, 2])
    alive, b, hw = 5, 2, 64  # alive channels, batch, pixels
    conv = (3 * hw + alive * hw) * b + 9 * 3 * alive
    bn = (alive * hw + alive * hw) * b
    relu = (alive * hw + alive * hw) * b
    head = (alive * hw + 2 * hw) * b + alive * 2
    lat = morphnet.GammaLatencyRegularizer(net, X, gamma_threshold=0.1, hardware="MEMORY_LATENCY", batch_size=b)
    assert lat.get_cost().item() == pytest.approx(4 * (conv + bn + relu + head))


def test_roofline_takes_the_slower_side_per_op():
    net = Small()
    morphnet.register_hardware("test-device", 0.001, 1000.0, overwrite=True)
    lat = morphnet.GammaLatencyRegularizer(net, X, gamma_threshold=0.1, hardware="test-device")
    flops = morphnet.GammaFlopsRegularizer(net, X, gamma_threshold=0.1).get_cost().item()
    # compute bound convs (FLOPs / 0.001 GFLOP/s); BN and ReLU bytes at 1000 GB/s
    memory_ops = 4 * (2 * 8 * 64 + 2 * 8 * 64) / 1000.0
    assert lat.get_cost().item() == pytest.approx(flops / 0.001 + memory_ops)
    assert get_hardware("test-device").peak_compute == 0.001


def test_hardware_table_keeps_the_original_entries():
    original = {"K80": (8740, 480), "P4": (5500, 192), "T4": (8100, 300), "P100": (9300, 732),
                "V100": (125000, 900), "TPUv2": (22500, 300), "FLOP_LATENCY": (1, 1e20),
                "MEMORY_LATENCY": (1e20, 1)}
    for name, (peak, bw) in original.items():
        assert (HARDWARE[name].peak_compute, HARDWARE[name].memory_bandwidth) == (peak, bw)
    assert {"A100", "H100", "H200", "L4"} <= set(HARDWARE)
    with pytest.raises(ValueError, match="already registered"):
        morphnet.register_hardware("V100", 1, 1)


def test_gamma_term_gradient_reaches_exactly_the_batchnorm_scales():
    net = ConcatNet()
    reg = morphnet.GammaFlopsRegularizer(net, torch.randn(1, 3, 17, 19), gamma_threshold=0.45)
    reg.get_regularization_term().backward()
    for name, p in net.named_parameters():
        is_gamma = name.startswith("bn") and name.endswith("weight")
        assert (p.grad is not None and p.grad.abs().sum() > 0) == is_gamma, name


def test_group_lasso_gradient_reaches_exactly_the_prunable_weights():
    net = ResidualNet()
    net.bn0, net.bn1 = nn.Identity(), nn.Identity()  # zero conv rows stay zero only without BatchNorm after them
    reg = morphnet.GroupLassoFlopsRegularizer(net, torch.randn(1, 3, 8, 8), threshold=1e-3)
    reg.get_regularization_term().backward()
    grads = {n: p.grad is not None and p.grad.abs().sum().item() > 0 for n, p in net.named_parameters()}
    # conv0 and conv1 outputs are one group whose regularizer is the root mean square of the two rows'
    # norms (one group-lasso norm over both rows): each row's gradient is proportional to its own weights
    # (the max would push only the larger row)
    w0, w1 = net.conv0.weight.flatten(1), net.conv1.weight.flatten(1)
    n0, n1 = w0.square().mean(1), w1.square().mean(1)
    rms = ((n0 + n1) / 2).sqrt()
    assert rms.shape == (8,)
    for w, grad in ((w0, net.conv0.weight.grad.flatten(1)), (w1, net.conv1.weight.grad.flatten(1))):
        assert (grad.abs().sum(1) > 0).all()
        ratio = grad / w  # d rms / d w = w / (2 * row length * rms), times the channel's cost weight
        assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)  # same factor across a row
    # and the same factor for both rows of a channel: the group's norm, not each row's own
    f0 = net.conv0.weight.grad.flatten(1)[:, 0] / w0[:, 0]
    f1 = net.conv1.weight.grad.flatten(1)[:, 0] / w1[:, 0]
    assert torch.allclose(f0 * w0.shape[1], f1 * w1.shape[1], rtol=1e-4)
    assert not grads["head.weight"]  # its outputs are the model's outputs: fixed, no source


def test_group_lasso_does_not_regularize_channels_read_through_a_batchnorm():
    """BatchNorm(0) = beta - gamma * mean / std: zero conv rows do not make its output zero."""
    with pytest.warns(UserWarning, match="Nothing is left to regularize"):
        reg = morphnet.GroupLassoFlopsRegularizer(ResidualNet(), torch.randn(1, 3, 8, 8), threshold=1e-3)
    assert reg.coverage_summary()["uncovered_layers"] == ["conv0", "conv1"]
    assert reg.get_regularization_term().item() == 0 and morphnet.StructureExporter(reg).get_alive_counts() == {}


def test_term_is_a_scalar_in_the_sources_dtype_under_autocast():
    net = ResidualNet()
    reg = morphnet.GammaFlopsRegularizer(net, torch.randn(1, 3, 8, 8), gamma_threshold=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        term = reg.get_regularization_term()
        cost = reg.get_cost()
    assert term.dim() == 0 and term.dtype == torch.float32 and term.requires_grad
    assert cost.dim() == 0 and not cost.requires_grad
    term.backward()


def test_training_step_compiles_without_graph_breaks_or_recompiles():
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    net = ResidualNet()
    reg = morphnet.GammaFlopsRegularizer(net, torch.randn(2, 3, 8, 8), gamma_threshold=0.1)

    def step(x):
        return net(x).square().mean() + 1e-6 * reg.get_regularization_term()

    x = torch.randn(2, 3, 8, 8)
    explanation = torch._dynamo.explain(step)(x)
    assert explanation.graph_break_count == 0
    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter)
    compiled(x).backward()
    _kill(net.bn0, [0, 1, 2])  # alive masks change as training goes on
    compiled(x).backward()
    _kill(net.bn1, [0, 1, 2, 3])
    compiled(x).backward()
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_get_cost_follows_the_alive_channels_as_they_die():
    net = ResidualNet(width=8)
    reg = morphnet.GammaFlopsRegularizer(net, torch.randn(1, 3, 8, 8), gamma_threshold=0.1)
    full = reg.get_cost().item()
    _kill(net.bn0, range(4))
    assert reg.get_cost().item() == full  # bn1 keeps the shared group alive (OR)
    _kill(net.bn1, range(4))
    assert reg.get_cost().item() < full


def test_write_summaries_logs_loss_cost_and_alive_counts(tmp_path):
    class Writer:
        def __init__(self):
            self.rows = []

        def add_scalar(self, tag, value, step):
            self.rows.append((tag, value, step))

    reg = morphnet.GammaFlopsRegularizer(ConcatNet(), torch.randn(1, 3, 17, 19), gamma_threshold=0.45)
    writer = Writer()
    values = morphnet.write_summaries(writer, reg, 7, alive_counts=True)
    tags = {t for t, _, _ in writer.rows}
    assert {"RegularizationLoss", "FLOPs", "alive/conv1"} <= tags
    assert values["FLOPs"] == reg.get_cost().item()
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(tmp_path) as real:
        morphnet.write_summaries(real, reg, 1)
    assert any(tmp_path.iterdir())


def test_compute_cost_and_cost_table_agree_with_the_regularizers():
    net = ConcatNet()
    x = torch.randn(1, 3, 17, 19)
    assert morphnet.compute_cost(net, x) == 474810 / 7 * 13 + 21318 / 11 * 23 + 1620 * 36 * 29 + 2 * 323 * 36 * 31 \
        + 2 * 90 * 29 * 2 + 2 * 323 * 31 * 2
    table = morphnet.cost_table(net, x, hardware="V100", batch_size=8)
    rows = {r["name"]: r for r in table}
    assert rows["conv3"]["flops"] == 1620 * 36 * 29 and rows["conv3"]["size"] == 9 * 36 * 29
    assert rows["conv1"]["prunable"] and not rows["head3"]["prunable"]
    latency = morphnet.compute_cost(net, x, "latency", "V100", batch_size=8)
    assert sum(r["latency_ns"] for r in table) == pytest.approx(latency)


def test_a_layers_only_channel_group_is_fixed_so_the_predicted_cost_matches_the_rebuild():
    """The rebuild keeps at least one channel group per layer; a layer whose output is one group
    (ShuffleNetV2's shuffled stages are, at x1.5 and x2.0) cannot lose it, so killing its scale
    must not take it out of get_cost (it did: 179 predicted against 372 MFLOPs rebuilt)."""
    import morphnet
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), nn.BatchNorm2d(1), nn.ReLU(),
                          nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()
    reg = morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=1e-2)
    assert morphnet.StructureExporter(reg).get_alive_counts() == {"3": 8}  # layer "0" is not prunable
    slim = morphnet.apply_structure(model, reg, x, keep_weights=True)
    assert reg.get_cost().item() == morphnet.compute_cost(slim, x)


def test_group_lasso_value_is_the_root_mean_square_of_a_channels_weights_and_biases():
    """A conv's row and its bias are one norm; a transposed grouped conv's row j makes channel j of every
    group, so its g biases join that row. Both in one bucket (equal row lengths)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 8, 3, padding=1, groups=2),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    reg = morphnet.GroupLassoFlopsRegularizer(model, torch.randn(1, 8, 6, 6), threshold=1e-3)
    values = reg.source.values()
    w, b = model[0].weight.flatten(1), model[0].bias
    conv = ((w.square().sum(1) + b.square()) / (w.shape[1] + 1)).sqrt()
    t = model[2]
    wt, bt = t.weight.movedim(1, 0).reshape(4, -1), t.bias.reshape(2, 4).t()
    transposed = ((wt.square().sum(1) + bt.square().sum(1)) / (wt.shape[1] + 2)).sqrt()
    torch.testing.assert_close(values[-12:], torch.cat([conv, transposed]))
    plain = morphnet.GroupLassoFlopsRegularizer(model, torch.randn(1, 8, 6, 6), threshold=1e-3, penalize_bias=False)
    torch.testing.assert_close(plain.source.values()[-12:-4], w.square().mean(1).sqrt())
