"""Latency measured on the device (issue 21): per-op fits, the cached table, the measured cost program
(differentiable, steers), CUDA alignment, and the latency check at the end of a run. Timings are
synthetic (a timer that computes each case's time from known coefficients), so every test is
deterministic; only ``test_device_timer_times_models_in_interleaved_rounds`` runs the real timer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import morphnet
from morphnet.costs.measured import LatencyTable, nonnegative_least_squares
from morphnet.costs.timing import DeviceTimer, TimingStats, time_models
from morphnet.recipes.compress import shrink_uniformly

pytestmark = pytest.mark.usefixtures("one_thread")

# The synthetic device: ns per op as a function of its widths (A_in, A_out) or of x (alive heads,
# elements moved, or the one prunable width of a layer whose other width is fixed).
BILINEAR = (5000.0, 300.0, 200.0, 10.0)
LAYER_LINEAR = (4000.0, 250.0)
DATA = (2000.0, 0.5)
PRODUCT = (3000.0, 700.0)
CONSTANT = 1500.0


class SyntheticTimer:
    """Times every case from its ``info`` with the coefficients above; whole models take
    ``models[name]`` seconds. Counts the cases it was asked to time."""

    def __init__(self, models: dict[str, float] | None = None):
        self.models = {"model": 1.0, "uniform_half": 0.6, **(models or {})}
        self.cases = 0

    def describe(self) -> dict:
        return {"timer": "synthetic", "rounds": 3}

    def measure(self, cases):
        out = []
        for case in cases:
            self.cases += 1
            seconds = self.truth(case.info) * 1e-9 if case.info["kind"] != "model" else self.models[case.info["name"]]
            out.append(TimingStats(seconds, 0.01, [seconds * 0.99, seconds, seconds * 1.0]))
        return out

    @staticmethod
    def truth(info: dict) -> float:
        if info["form"] == "bilinear":
            c0, ci, co, cio = BILINEAR
            return c0 + ci * info["a_in"] + co * info["a_out"] + cio * info["a_in"] * info["a_out"]
        if info["form"] == "constant":
            return CONSTANT
        c0, k = {"conv": LAYER_LINEAR, "linear": LAYER_LINEAR, "data": DATA, "product": PRODUCT}[info["kind"]]
        return c0 + k * info["x"]


def chain(c1: int = 8, c2: int = 12) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
                         nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, 4))


class Mixed(nn.Module):
    """Dense, grouped and depthwise convs, a residual add, attention and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(16, 16, 1, groups=2, bias=False), nn.BatchNorm2d(16))
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.grouped(self.dw(x))
        tokens = x.flatten(2).transpose(1, 2)
        tokens = self.attn(tokens, tokens, tokens, need_weights=False)[0]
        return self.head(tokens.mean(1))


X = torch.randn(1, 3, 6, 6)


def test_nonnegative_least_squares_is_exact_and_never_negative():
    rng = np.random.default_rng(0)
    a = np.stack([np.ones(9), rng.uniform(1, 9, 9), rng.uniform(1, 9, 9)], 1)
    truth = np.array([3.0, 0.5, 2.0])
    assert np.allclose(nonnegative_least_squares(a, a @ truth), truth, rtol=1e-12)
    fitted = nonnegative_least_squares(a, a @ np.array([3.0, -0.5, 2.0]))
    assert (fitted >= 0).all() and fitted[1] == 0.0


def test_the_fit_recovers_synthetic_timings_exactly(tmp_path):
    timer = SyntheticTimer()
    table = morphnet.measure_latency(Mixed(), X, batch_size=4, timer=timer, cache_dir=tmp_path)
    kinds = {(e["kind"], e["form"]) for e in table.ops.values()}
    assert {("conv", "bilinear"), ("conv", "linear"), ("product", "linear"), ("data", "linear")} <= kinds
    truth = {"bilinear": BILINEAR, "constant": (CONSTANT,)}
    for signature, entry in table.ops.items():
        assert entry["form"] != "unmeasured", (signature, entry.get("error"))
        expected = truth.get(entry["form"]) or {"conv": LAYER_LINEAR, "linear": LAYER_LINEAR, "data": DATA,
                                                "product": PRODUCT}[entry["kind"]]
        assert entry["coef"][:len(expected)] == pytest.approx(expected, rel=1e-9, abs=1e-6), signature
        assert entry["residual"] == pytest.approx(0.0, abs=1e-9)
        if entry["form"] == "bilinear":
            assert len({(p["a_in"], p["a_out"]) for p in entry["points"]}) >= 4
    assert table.key["batch_size"] == 4 and table.key["dtype"] == "float32" and table.key["device"] == "cpu"
    assert table.timing == {"timer": "synthetic", "rounds": 3}


def test_a_whole_model_timing_that_swings_between_rounds_is_flagged_as_a_busy_machine(tmp_path, caplog):
    """On a loaded machine the op timings (short) dodge the other processes and the whole model (long)
    does not, so the rest-of-network constant swallows the waiting: the table says so, loudly."""

    class BusyTimer(SyntheticTimer):
        def measure(self, cases):
            stats = super().measure(cases)
            return [TimingStats(s.median, 1.3, s.samples) if c.info["kind"] == "model" else s
                    for c, s in zip(cases, stats)]

    with caplog.at_level("WARNING", logger="morphnet.latency"):
        table = morphnet.measure_latency(Mixed(), X, batch_size=4, timer=BusyTimer(), cache_dir=tmp_path)
    (entry,) = table.models.values()
    assert "machine looks busy" in entry["warning"] and "130%" in entry["warning"]
    assert any("machine looks busy" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="morphnet.latency"):
        again = morphnet.measure_latency(Mixed(), X, batch_size=4, timer=SyntheticTimer(), cache_dir=tmp_path)
    assert again.source == "cache" and any("cached table" in r.getMessage() for r in caplog.records)
    quiet = morphnet.measure_latency(Mixed(), X, batch_size=4, timer=SyntheticTimer(), cache_dir=tmp_path / "q")
    assert all("warning" not in e for e in quiet.models.values())


def test_the_program_is_the_fitted_time_of_every_op_at_the_alive_widths_plus_the_rest(tmp_path):
    """A chain conv -> BN -> ReLU -> conv -> BN -> ReLU -> mean -> linear on 6x6 inputs, by hand. The
    whole model and its uniform half are timed as 1.5 x their ops' sum + a fixed rest: the two-point
    calibration recovers both, and every cost below carries the 1.5."""
    model = chain()

    def by_hand(a1: int, a2: int) -> float:
        layers = 2 * LAYER_LINEAR[0] + LAYER_LINEAR[1] * (a1 + a2)
        layers += BILINEAR[0] + BILINEAR[1] * a1 + BILINEAR[2] * a2 + BILINEAR[3] * a1 * a2
        data = 5 * DATA[0] + DATA[1] * (2 * 2 * 36 * a1 + 2 * 2 * 36 * a2 + 37 * a2)  # BN, ReLU (in, out); mean
        return layers + data

    half = shrink_uniformly(model, X, 0.5)
    h1, h2 = half[0].out_channels, half[3].out_channels
    assert (h1, h2) < (8, 12)
    scale, rest = 1.5, 1e6 - 1.5 * by_hand(8, 12)
    timer = SyntheticTimer({"model": 1e-3, "uniform_half": (scale * by_hand(h1, h2) + rest) * 1e-9})
    table = morphnet.measure_latency(model, X, timer=timer, cache_dir=tmp_path)
    (entry,) = table.models.values()
    assert rest > 0 and entry["rest_ns"] == pytest.approx(rest) and entry["op_scale"] == pytest.approx(scale)
    assert entry["uniform_half"]["ops_ns"] == pytest.approx(by_hand(h1, h2))
    assert morphnet.compute_cost(model, X, "latency", hardware=table) == pytest.approx(1e6, rel=1e-12)
    with torch.no_grad():
        model[1].weight[3:] = 0.0  # 3 of 8 channels alive
        model[4].weight[:7] = 0.0  # 5 of 12
    reg = morphnet.GammaLatencyRegularizer(model, X, gamma_threshold=1e-2, hardware=table)
    assert reg.cost_name == "Latency" and reg.batch_size == 1
    assert float(reg.get_cost()) == pytest.approx(scale * by_hand(3, 5) + rest, rel=1e-12)
    slim = morphnet.apply_structure(model, reg, X)
    assert morphnet.compute_cost(slim, X, "latency", hardware=table) == pytest.approx(float(reg.get_cost()), rel=1e-12)
    rows = {row["name"]: row for row in morphnet.cost_table(slim, X, hardware=table)}
    assert rows["3"]["latency_ns"] == pytest.approx(
        scale * (BILINEAR[0] + 3 * BILINEAR[1] + 5 * BILINEAR[2] + 15 * BILINEAR[3]))


def test_the_two_point_calibration_falls_back_to_one_point_when_the_timings_disagree():
    """A half that takes longer than the whole, or a slope outside the bounds, is noise: the scale
    stays 1 or at its bound, and the rest is never negative."""
    from morphnet.costs.measured import OP_SCALE_RANGE, _two_point_scale

    assert _two_point_scale(1000.0, 400.0, 700.0, 200.0) == pytest.approx(1.5)
    assert _two_point_scale(1000.0, 400.0, 1100.0, 200.0) == OP_SCALE_RANGE[0]  # half slower than whole
    assert _two_point_scale(1000.0, 100.0, 500.0, 10.0) == OP_SCALE_RANGE[1]  # slope 5.6, rest 444
    assert _two_point_scale(1000.0, 400.0, 700.0, 400.0) == 1.0  # nothing shrank
    # a rest that would be negative: the least-squares slope through the origin
    s = _two_point_scale(1000.0, 900.0, 300.0, 400.0)
    assert s == pytest.approx((1000 * 900 + 300 * 400) / (900 ** 2 + 400 ** 2)) and 1000.0 - s * 900.0 >= -1e-9


def test_the_measured_term_is_differentiable_and_steers_a_target_cost_run(tmp_path):
    """GammaLatency on a measured table: the term has gradients on the BatchNorm scales, and
    TargetCost lands half the seed's latency within 5% with a stand-in for training."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 4))
    bns = [model[1], model[4]]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.rand(64) + 0.25)
    table = morphnet.measure_latency(model, X, timer=SyntheticTimer({"model": 0.0}), cache_dir=tmp_path)  # no rest
    reg = morphnet.GammaLatencyRegularizer(model, X, gamma_threshold=1e-2, hardware=table)
    term = reg.get_regularization_term()
    term.backward()
    assert term.requires_grad and all(bn.weight.grad.abs().sum() > 0 for bn in bns)
    g = torch.Generator().manual_seed(1)
    use = [torch.rand(64, generator=g) * 0.1 for _ in bns]
    steps = 600
    tc = morphnet.TargetCost(reg, target=0.5, steps=steps, log_every=10)
    for step in range(1, steps + 1):
        for bn in bns:
            bn.weight.grad = None
        (tc.strength * reg.get_regularization_term()).backward()
        with torch.no_grad():  # scales shrink under the penalty and grow with their usefulness; dead stays dead
            for bn, u in zip(bns, use):
                alive = bn.weight.abs() > 1e-2
                bn.weight.copy_(torch.where(alive, (bn.weight - 0.1 * (bn.weight.grad - u * bn.weight)).clamp(0, 2),
                                            0.0))
        tc.update(step)
    best = tc.best()
    assert abs(best.cost / tc.target - 1) <= 0.05
    slim = morphnet.apply_structure(model, tc.best_structure(), X)
    assert morphnet.compute_cost(slim, X, "latency", hardware=table) == pytest.approx(best.cost, rel=1e-9)


def test_the_measured_term_is_a_fixed_number_of_ops_whatever_the_depth(tmp_path):
    """The measured program has the FLOPs program's form: the term and its backward dispatch as many
    (non-view) aten ops as Gamma FLOPs', for 3 or 12 layers."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += not func.is_view
            return func(*args, **(kwargs or {}))

    def ops(reg) -> int:
        reg.model.zero_grad(set_to_none=True)  # no accumulation into earlier gradients
        with Count() as count:
            reg.get_regularization_term().backward()
        return count.ops

    counts = set()
    for depth in (3, 12):
        layers = [nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Conv2d(8, 2, 1))
        table = morphnet.measure_latency(model, X, timer=SyntheticTimer(), cache_dir=tmp_path)
        counts.add(ops(morphnet.GammaLatencyRegularizer(model, X, gamma_threshold=1e-2, hardware=table)))
        counts.add(ops(morphnet.GammaFlopsRegularizer(model, X, gamma_threshold=1e-2)))
    assert len(counts) == 1


def test_a_cached_table_round_trips_and_is_reused_only_for_its_key(tmp_path):
    model = chain()
    first = morphnet.measure_latency(model, X, timer=SyntheticTimer(), cache_dir=tmp_path)
    assert first.source == "measured" and first.path.parent == tmp_path and first.path.is_file()
    loaded = LatencyTable.load(first.path)
    assert loaded.key == first.key and loaded.ops == json.loads(json.dumps(first.ops)) and loaded.models == first.models
    cost = morphnet.compute_cost(model, X, "latency", hardware=first)
    assert morphnet.compute_cost(model, X, "latency", hardware=loaded) == pytest.approx(cost, rel=1e-12)
    assert morphnet.compute_cost(model, X, "latency", hardware=str(first.path)) == pytest.approx(cost, rel=1e-12)

    again = SyntheticTimer()
    reused = morphnet.measure_latency(model, X, timer=again, cache_dir=tmp_path)
    assert again.cases == 0 and reused.source == "cache" and reused.path == first.path
    # a wider model of the same shapes: only the ops whose widths the table does not cover are timed
    wider = SyntheticTimer()
    extended = morphnet.measure_latency(chain(16, 12), X, timer=wider, cache_dir=tmp_path)
    assert 0 < wider.cases and extended.source == "cache, extended" and extended.path == first.path
    other_batch = SyntheticTimer()
    batch2 = morphnet.measure_latency(model, X, batch_size=2, timer=other_batch, cache_dir=tmp_path)
    assert other_batch.cases > 0 and batch2.source == "measured" and batch2.path != first.path
    # a file at the key's path that holds another key is not reused
    data = json.loads(first.path.read_text())
    data["key"]["torch"] = "0.0"
    first.path.write_text(json.dumps(data))
    stranger = SyntheticTimer()
    assert morphnet.measure_latency(model, X, timer=stranger, cache_dir=tmp_path).source == "measured"
    assert stranger.cases > 0


def test_tables_are_used_only_at_their_batch_size_and_for_ops_they_timed(tmp_path):
    table = morphnet.measure_latency(chain(), X, timer=SyntheticTimer(), batch_size=2, cache_dir=tmp_path)
    assert morphnet.GammaLatencyRegularizer(chain(), X, gamma_threshold=0.1, hardware=table).batch_size == 2
    with pytest.raises(ValueError, match="measured at batch 2.*batch_size=2"):
        morphnet.GammaLatencyRegularizer(chain(), X, gamma_threshold=0.1, hardware=table, batch_size=1)
    with pytest.raises(ValueError, match="no timing for .* measure this model"):
        morphnet.compute_cost(chain(), torch.randn(1, 3, 7, 7), "latency", hardware=table)
    with pytest.raises(ValueError, match="'measured'"):
        morphnet.GammaLatencyRegularizer(chain(), X, gamma_threshold=0.1, hardware="nope")


def test_an_op_that_cannot_be_replayed_counts_in_the_rest_of_the_network(tmp_path):
    """InstanceNorm is recorded as one module call: no replay, its time is part of the constant."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.ReLU(),
                          nn.Conv2d(8, 4, 1))
    table = morphnet.measure_latency(model, X, timer=SyntheticTimer({"model": 1e-3}), cache_dir=tmp_path)
    forms = [e["form"] for e in table.ops.values()]
    assert "unmeasured" in forms
    assert morphnet.compute_cost(model, X, "latency", hardware=table) == pytest.approx(1e6, rel=1e-12)


def test_widths_on_cuda_targets_are_multiples_of_8_unless_the_user_says_otherwise():
    from morphnet.pipeline import RunConfig
    from morphnet.pipeline.latency import notes

    assert RunConfig(target="latency", hardware="H100").round_to == 8
    assert RunConfig(target="latency", hardware="H100", round_to=1).round_to == 1
    assert RunConfig(target="latency", hardware="measured", device="cpu").round_to is None
    assert RunConfig(target="latency", hardware="FLOP_LATENCY").round_to is None
    assert RunConfig(hardware="T4", finetune=True, seed_weights=__file__).round_to is None
    summary = {"config": {"hardware": "H100", "device": "cpu", "target": "latency"},
               "slim": {"widths": {"a": 16, "b": 13, "c": 7}}}
    assert any("2 of 3 widths" in note and "--round-to 8" in note for note in notes(summary))
    summary["config"]["hardware"] = "measured"
    assert notes(summary) == []


def test_device_timer_times_models_in_interleaved_rounds():
    models = {"small": chain(2, 2), "large": chain(8, 12)}
    timer = DeviceTimer("cpu", warmup=1, rounds=2, min_seconds=0.0)
    stats = time_models(models, X, batch_size=2, timer=timer)
    assert set(stats) == {"small", "large"}
    assert all(len(s.samples) == 2 and s.median > 0 and s.spread >= 0 for s in stats.values())
    assert timer.describe()["rounds"] == 2 and models["large"].training  # the models themselves are not touched


def test_run_reports_measured_latency_and_warns_when_the_slim_network_is_slower(tmp_path, monkeypatch):
    """`run --target latency --hardware measured`: the table is measured once for the run (cached), the
    summary, the printed table and the report carry the timed seed / slim / uniform networks, and a
    slim network slower than the seed is called out."""
    from morphnet.pipeline import RunConfig, latency, run_pipeline
    from morphnet.reporting import format_summary

    timer = SyntheticTimer({"model": 1e-3, "seed": 1e-3, "slim": 1.2e-3, "uniform": 0.9e-3})
    monkeypatch.setattr(latency, "TIMER", timer)
    # one whole-model timing (the two-point calibration has its own tests): the fixed 1 ms is then the rest
    monkeypatch.setattr("morphnet.costs.measured._uniform_half", lambda model, example: (None, None))
    monkeypatch.setenv("MORPHNET_LATENCY_CACHE", str(tmp_path / "cache"))
    # with this synthetic timer the digits CNN's latency is mostly per-op constants: 0.8 of it is reachable
    cfg = RunConfig(target="latency", hardware="measured", device="cpu", steps=20, retrain_steps=2, baseline=False,
                    target_cost=0.8, out=str(tmp_path / "run"), quiet=True, threads=1)
    summary = run_pipeline(cfg)
    assert len(list((tmp_path / "cache").glob("latency-cpu-float32-b1-*.json"))) == 1
    measured = summary["latency"]
    assert measured["batch_size"] == 1 and measured["device_type"] == "cpu"
    assert measured["seed"]["median_ms"] == pytest.approx(1.0) and measured["slim"]["ratio"] == pytest.approx(1.2)
    assert measured["uniform"]["median_ms"] == pytest.approx(0.9) and measured["uniform"]["widths"]
    assert measured["table"]["source"] == "measured" and measured["table"]["path"].startswith(str(tmp_path / "cache"))
    assert all(measured[n]["spread"] == 0.01 and len(measured[n]["rounds_ms"]) == 3 for n in ("seed", "slim", "uniform"))
    assert any("not faster than the seed" in note for note in summary["warnings"])
    assert summary["target"]["unit"] == "ns" and summary["slim"]["cost"] < summary["seed"]["cost"]
    printed = format_summary(summary, cfg.out)
    assert "measured latency on" in printed and "uniform (same cost)" in printed
    report = (tmp_path / "run" / "report.html").read_text()
    assert "Measured latency" in report and "not faster than the seed" in report


def test_cost_command_with_measured_hardware(tmp_path, monkeypatch, capsys):
    from morphnet.cli.main import main
    from morphnet.pipeline import latency

    monkeypatch.setattr(latency, "TIMER", SyntheticTimer({"model": 1e-3}))
    monkeypatch.setenv("MORPHNET_LATENCY_CACHE", str(tmp_path))
    assert main(["cost", "--hardware", "measured", "--device", "cpu", "--latency-batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "measured on" in out and "batch 2" in out and "measured the latency table" in out
    assert main(["cost", "--hardware", "measured", "--device", "cpu", "--latency-batch-size", "2"]) == 0
    assert "reused the cached latency table" in capsys.readouterr().out
