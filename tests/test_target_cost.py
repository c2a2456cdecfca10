"""morphnet.TargetCost: target-cost mode for any training loop (thinned reads, the pipeline's
structure rule, checkpoints, agreement between torch.distributed ranks)."""

import io
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import morphnet
from nets import spy_host_reads
from morphnet.control import Candidate, StrengthController, select_candidate


pytestmark = pytest.mark.usefixtures("one_thread")


class ScriptedRegularizer:
    """Stands in for a network regularizer: the cost follows a script, the counts name the read."""

    cost_name = "FLOPs"

    def __init__(self, costs):
        self.costs = list(costs)
        self.reads = 0

    def get_cost(self):
        value = self.costs[min(self.reads, len(self.costs) - 1)]
        self.reads += 1
        return torch.tensor(value, dtype=torch.float64)

    def alive_counts(self):
        return {"layer": self.reads}


def small_net():
    """Two conv + BatchNorm layers, 128 channels each, with scales spread over [0.25, 1.25)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 4),
    )
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.weight.copy_(torch.rand(128) + 0.25)
    return model


EXAMPLE = torch.randn(1, 3, 8, 8)


def plant_step(model, reg, strength, use, lr=0.1):
    """One step of a stand-in for training, with MorphNet's awkward traits: BatchNorm scales shrink
    under the cost-weighted penalty and grow in proportion to how useful the channel is, a channel
    counts as dead only once its scale crosses the threshold, and a dead scale stays dead."""
    bns = [model[1], model[4]]
    for bn in bns:
        bn.weight.grad = None
    (strength * reg.get_regularization_term()).backward()
    with torch.no_grad():
        for bn, u in zip(bns, use):
            alive = bn.weight.abs() > 1e-2
            bn.weight.copy_(torch.where(alive, (bn.weight - lr * (bn.weight.grad - u * bn.weight)).clamp(0, 2), 0.0))


def usefulness():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(128, generator=g) * 0.1, torch.rand(128, generator=g) * 0.1]


def test_target_cost_lands_a_real_regularizer_reading_the_cost_every_log_every_steps():
    model = small_net()
    reg = morphnet.GammaFlopsRegularizer(model, EXAMPLE, gamma_threshold=1e-2)
    reads = []
    get_cost = reg.get_cost
    reg.get_cost = lambda *a, **k: reads.append(1) or get_cost(*a, **k)
    steps, use = 600, usefulness()
    tc = morphnet.TargetCost(reg, target=0.5, steps=steps, log_every=10)
    assert len(reads) == 1 and tc.target == pytest.approx(0.5 * tc.seed_cost)
    strengths = []
    for step in range(1, steps + 1):
        plant_step(model, reg, tc.strength, use)
        strengths.append(tc.update(step))
    assert len(reads) == 1 + steps // 10  # the seed cost, then one scalar read per 10 steps
    assert len(set(strengths[:9])) == 1  # no read, no change between reads
    best = tc.best()
    assert abs(best.cost / tc.target - 1) <= 0.05
    assert best.step > steps // 2
    slim = morphnet.apply_structure(model, tc.best_structure(), EXAMPLE)
    assert morphnet.compute_cost(slim, EXAMPLE, "flops") == pytest.approx(best.cost, rel=1e-9)


def test_a_read_advances_the_law_once_per_step_since_the_previous_read():
    reg = ScriptedRegularizer([100.0] + [80.0] * 50)
    tc = morphnet.TargetCost(reg, target=0.5, steps=40, log_every=10, initial_strength=1.0)
    law = StrengthController(target=50.0, seed_cost=100.0, initial_strength=1.0, ramp_steps=20)
    for step in range(1, 21):
        tc.update(step)
        law.update(step, 80.0)
        if step % 10 == 0:
            assert tc.strength == pytest.approx(law.strength, rel=1e-12)
            assert tc.cost == 80.0 and tc.last_read_step == step
    assert reg.reads == 3


def test_the_last_step_is_always_read():
    reg = ScriptedRegularizer([100.0, 70.0, 60.0, 51.0])
    tc = morphnet.TargetCost(reg, target=0.5, steps=25, log_every=10)
    read_at = [step for step in range(1, 26) if tc.due(step) and tc.update(step) is not None]
    assert read_at == [10, 20, 25]


@pytest.mark.parametrize("seed", range(5))
def test_kept_structure_is_the_pipeline_rule_over_every_read(seed):
    rng = np.random.default_rng(seed)
    costs = list(100.0 * np.exp(rng.normal(-0.6, 0.3, 40)))
    costs[int(rng.integers(1, 40))] = 50.0 * (1 + rng.uniform(-0.004, 0.004))  # sometimes a tight hit
    reg = ScriptedRegularizer([100.0] + costs)
    tc = morphnet.TargetCost(reg, target=0.5, steps=40, log_every=1)
    for step in range(1, 41):
        tc.update(step)
    every = [Candidate(step, cost, {"layer": step + 1}) for step, cost in enumerate(costs, 1)]
    expected = select_candidate(every, 50.0, 0.05)
    assert (tc.best().step, tc.best().cost) == (expected.step, expected.cost)
    assert tc.best_structure() == {"layer": expected.step + 1}  # the counts read at that step


def test_state_dict_resumes_a_run_exactly():
    steps, use = 300, usefulness()

    def run(stop_at=None, resume=None):
        model = small_net()
        if resume is not None:
            model.load_state_dict(resume["model"])
        reg = morphnet.GammaFlopsRegularizer(model, EXAMPLE, gamma_threshold=1e-2)
        tc = morphnet.TargetCost(reg, target=0.4, steps=steps)
        start = 1
        if resume is not None:
            buffer = io.BytesIO()
            torch.save(resume["tc"], buffer)
            buffer.seek(0)
            tc.load_state_dict(torch.load(buffer, weights_only=True))
            start = resume["step"] + 1
        trace = []
        for step in range(start, (stop_at or steps) + 1):
            plant_step(model, reg, tc.strength, use)
            trace.append(tc.update(step))
        return model, tc, trace

    _, whole, whole_trace = run()
    model, half, _ = run(stop_at=140)
    _, resumed, resumed_trace = run(resume={"model": model.state_dict(), "tc": half.state_dict(), "step": 140})
    assert resumed.seed_cost == whole.seed_cost  # from the state, not from the thinned model
    assert resumed_trace == whole_trace[140:]
    assert resumed.best() == whole.best()


def test_bad_arguments_are_named():
    reg = ScriptedRegularizer([100.0])
    with pytest.raises(TypeError, match="network regularizer"):
        morphnet.TargetCost(object(), steps=10)
    with pytest.raises(ValueError, match="steps"):
        morphnet.TargetCost(reg, steps=0)
    with pytest.raises(ValueError, match="target cost must be positive"):
        morphnet.TargetCost(reg, target=-1.0, steps=10)
    with pytest.raises(ValueError, match="no cost was read"):
        morphnet.TargetCost(reg, steps=10).best_structure()
    with pytest.raises(ValueError, match="version"):
        morphnet.TargetCost(reg, steps=10).load_state_dict({})


@pytest.mark.parametrize("fraction", [0.25, 0.0])
def test_a_target_below_the_smallest_structure_is_refused_naming_the_minimum_and_the_unit(fraction):
    """``target=2`` is 2 FLOPs (values > 1 are absolute): no structure costs that little, so
    learning would kill every channel it may and still miss. Refused at once, saying why."""
    reg = morphnet.GammaFlopsRegularizer(small_net(), EXAMPLE, gamma_threshold=1e-2, min_layer_fraction=fraction)
    minimum, seed = reg.minimum_cost(), reg.get_cost().item()
    with pytest.raises(ValueError) as error:
        morphnet.TargetCost(reg, target=2, steps=10)
    message = str(error.value)
    assert message.startswith("TargetCost: target 2 is an absolute cost, 2 FLOPs (values <= 1 are fractions")
    assert f"smallest cost this network allows, {minimum:,.0f} FLOPs" in message
    assert ("min_layer_fraction=0.25" if fraction else "one channel") in message
    with pytest.raises(ValueError, match="smallest cost"):  # a fraction just below the minimum's share
        morphnet.TargetCost(reg, target=0.99 * minimum / seed, steps=10)
    assert morphnet.TargetCost(reg, target=minimum, steps=10).target == minimum  # exactly reachable
    assert morphnet.TargetCost(reg, target=1.01 * minimum / seed, steps=10).target > minimum


def _run_script(costs, steps, stop=None):
    """A TargetCost driven by a scripted cost (target 0.5 of a seed costing 100), read every step."""
    tc = morphnet.TargetCost(ScriptedRegularizer([100.0] + list(costs)), target=0.5, steps=steps, log_every=1)
    for step in range(1, (stop or steps) + 1):
        tc.update(step)
    return tc


def test_a_miss_is_warned_once_at_the_last_step_and_a_landing_is_not():
    """The README's loop with 50 or 400 steps gave the seed back or 0.572x for a 0.5 target, silently."""
    with pytest.warns(morphnet.TargetMissedWarning, match=r"the structure kept is the seed's .* after 20 steps"):
        tc = _run_script([100.0] * 20, steps=20)
    with pytest.warns(morphnet.TargetMissedWarning, match=r"ended 14% above the target after 20 steps.*0\.572x"):
        missed = _run_script(np.linspace(95.0, 57.2, 20), steps=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", morphnet.TargetMissedWarning)
        assert tc.best_structure() and missed.best().cost == pytest.approx(57.2)  # once: no second warning
        landed = _run_script(np.linspace(95.0, 50.4, 20), steps=20)  # within 5%
        assert landed.best_structure() == {"layer": 21}


def test_a_loop_that_stops_before_the_last_step_is_warned_at_best_structure():
    tc = _run_script(np.linspace(95.0, 70.0, 40), steps=40, stop=15)
    with pytest.warns(morphnet.TargetMissedWarning, match="after step 15 of 40 .learning has not reached its last step"):
        tc.best_structure()


def test_trim_lands_the_kept_structure_on_the_target_with_the_width_multiplier():
    """A short run ends above its target; trim=True gives what ``morphnet run`` rebuilds: the kept
    structure scaled by the one factor within 1% (``morphnet.fit_to_budget``)."""
    model, use = small_net(), usefulness()
    reg = morphnet.GammaFlopsRegularizer(model, EXAMPLE, gamma_threshold=1e-2)
    tc = morphnet.TargetCost(reg, target=0.3, steps=150)
    with pytest.warns(morphnet.TargetMissedWarning, match="above the target"):
        for step in range(1, 151):
            plant_step(model, reg, tc.strength, use)
            tc.update(step)
    kept = tc.best_structure()
    trimmed = tc.best_structure(trim=True, example_inputs=EXAMPLE)
    cost = morphnet.compute_cost(morphnet.apply_structure(model, trimmed, EXAMPLE), EXAMPLE)
    assert tc.seed_cost > tc.best().cost > 1.05 * tc.target and abs(cost / tc.target - 1) <= 0.01
    assert all(trimmed[name] < kept[name] for name in kept)
    assert trimmed == morphnet.fit_to_budget(model, kept, EXAMPLE, tc.target)[1]
    with pytest.raises(ValueError, match="needs example_inputs"):
        tc.best_structure(trim=True)


def _ranks_agree_worker(rank, world, init_file, results):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = small_net()
        if rank == 1:  # this rank's parameters drifted: a third of its channels look dead
            with torch.no_grad():
                model[1].weight[:40] = 0.0
        reg = morphnet.GammaFlopsRegularizer(model, EXAMPLE, gamma_threshold=1e-2)
        tc = morphnet.TargetCost(reg, target=0.5, steps=60, log_every=10)
        use = usefulness()
        trace = []
        for step in range(1, 61):
            plant_step(model, reg, tc.strength, use)
            trace.append(tc.update(step))
        results[rank] = (tc.seed_cost, trace, tc.best().step, tc.best_structure())
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_agree_under_torch_distributed_without_per_step_collectives(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_ranks_agree_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True,
                           start_method="fork")
        seed0, trace0, step0, counts0 = results[0]
        seed1, trace1, step1, counts1 = results[1]
    assert seed0 == seed1 and trace0 == trace1 and step0 == step1 and counts0 == counts1
    # the structure rank 0 saw: its first BatchNorm is fully alive at step 0
    assert math.isfinite(seed0) and counts0


def test_between_reads_a_step_reads_no_tensor_value_on_the_host(monkeypatch):
    """The per-step work (term, backward, update) converts no tensor to a Python value except at
    read steps: on a GPU that would be a host sync every step. (Syncs inside C++ kernels are not
    seen by this check; torch.cuda.set_sync_debug_mode covers those on a GPU.)"""
    model = small_net()
    reg = morphnet.GammaFlopsRegularizer(model, EXAMPLE, gamma_threshold=1e-2)
    tc = morphnet.TargetCost(reg, target=0.5, steps=100, log_every=10)
    host_reads = spy_host_reads(monkeypatch)
    per_step = []
    for step in range(1, 21):
        host_reads.clear()
        (tc.strength * reg.get_regularization_term()).backward()
        tc.update(step)
        per_step.append(len(host_reads))
    assert [n for i, n in enumerate(per_step, 1) if i % 10] == [0] * 18
    assert per_step[9] > 0 and per_step[19] > 0  # the reads at steps 10 and 20
