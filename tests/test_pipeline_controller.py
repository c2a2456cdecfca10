"""Target-cost mode: the strength controller and the choice of the learned structure."""

import math

import numpy as np
import pytest

from morphnet.pipeline.controller import Candidate, StrengthController, resolve_target, select_candidate


def test_target_at_most_one_is_a_fraction_of_the_seed_cost_else_absolute():
    assert resolve_target(0.5, 1000.0) == 500.0
    assert resolve_target(1.0, 1000.0) == 1000.0
    assert resolve_target(250.0, 1000.0) == 250.0
    with pytest.raises(ValueError, match="positive"):
        resolve_target(0.0, 1000.0)


def test_latest_candidate_closest_to_target_wins_else_the_closest():
    cands = [Candidate(10, 100.0, {}), Candidate(20, 50.2, {}), Candidate(30, 49.0, {}), Candidate(40, 40.0, {})]
    assert select_candidate(cands, 50.0, 0.05).step == 20  # within 1%
    cands[1] = Candidate(20, 52.0, {})
    assert select_candidate(cands, 50.0, 0.05).step == 30  # none within 1%, the latest within 5%
    assert select_candidate(cands, 70.0, 0.05).step == 20  # none within 5%: 52 is the closest in log ratio
    assert select_candidate([Candidate(1, 60.0, {}), Candidate(2, 60.0, {})], 50.0).step == 2
    with pytest.raises(ValueError, match="no structure"):
        select_candidate([], 1.0)


def test_reference_glides_from_seed_cost_to_target_then_holds():
    c = StrengthController(target=25.0, seed_cost=100.0, initial_strength=1.0, ramp_steps=100)
    assert c.reference(0) == pytest.approx(100.0)
    assert c.reference(50) == pytest.approx(50.0)
    assert c.reference(100) == c.reference(1000) == pytest.approx(25.0)


def test_strength_rises_above_the_reference_and_is_cut_below_it():
    up = StrengthController(target=50.0, seed_cost=100.0, initial_strength=1.0, ramp_steps=10)
    assert up.update(20, 60.0) > 1.0
    down = StrengthController(target=50.0, seed_cost=100.0, initial_strength=1.0, ramp_steps=10)
    assert down.update(20, 45.0) < math.exp(-1.0)


def test_controller_lands_a_lagging_irreversible_plant_on_the_target():
    """A toy plant with MorphNet's awkward traits: scales shrink at a speed set by the strength,
    a channel counts only once its scale crosses the threshold, and dead channels stay dead."""
    rng = np.random.default_rng(0)
    weight = rng.uniform(0.5, 1.5, 200)
    use = rng.uniform(0.0, 2.0, 200)
    gamma = np.ones(200)
    seed_cost = weight.sum()
    target = 0.5 * seed_cost
    steps = 1000
    controller = StrengthController(target, seed_cost, initial_strength=1.0, ramp_steps=steps // 2)
    strength, candidates = 1.0, []
    for step in range(1, steps + 1):
        alive = gamma > 0.01
        gamma = np.where(alive, np.clip(gamma - 0.01 * (strength * weight - use * gamma), 0, 2), 0)
        cost = float(weight[gamma > 0.01].sum())
        candidates.append(Candidate(step, cost, {}))
        strength = controller.update(step, cost)
    chosen = select_candidate(candidates, target, 0.05)
    assert abs(chosen.cost / target - 1) <= 0.05
    assert chosen.step > steps // 2


def test_controller_does_not_run_away_when_strong_pushes_revive_channels():
    """Past some strength the scales oscillate around zero and count as alive again: the cost
    rises with the strength. The controller must stop pushing instead of chasing it upwards."""
    cliff = 30.0  # strengths beyond this (x initial) make every channel count as alive

    def plant(strength):
        return 100.0 if strength > cliff else 100.0 / (1.0 + strength)

    c = StrengthController(target=0.5, seed_cost=100.0, initial_strength=1.0, ramp_steps=50)
    strength, peak = 1.0, 0.0
    for step in range(1, 400):
        strength = c.update(step, plant(strength))
        peak = max(peak, strength)
    assert strength <= cliff  # it settled at the strongest push that still lowered the cost
    assert plant(strength) < 10.0
    assert peak < 1000.0
