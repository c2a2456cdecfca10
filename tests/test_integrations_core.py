"""The framework-free side of the integrations: import isolation and option checks (no framework needed)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import morphnet
from morphnet.integrations.core import MorphNetRun, example_from_batch, first_example, read_interval
from nets import spy_host_reads

SRC = str(Path(morphnet.__file__).resolve().parents[1])


pytestmark = pytest.mark.usefixtures("one_thread")


def test_importing_morphnet_imports_no_training_framework():
    code = ("import sys, morphnet, morphnet.integrations, morphnet.integrations.core; "
            "print(sorted(m for m in ('lightning', 'transformers', 'timm', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": SRC, "PATH": ""})
    assert out.stdout.strip() == "[]"


def test_the_model_input_is_found_in_common_batch_layouts():
    x = torch.randn(4, 3, 8, 8)
    assert example_from_batch(x) is x
    assert example_from_batch((x, torch.zeros(4))) is x
    assert example_from_batch({"labels": torch.zeros(4), "pixel_values": x}) is x
    assert first_example(x).shape == (1, 3, 8, 8)
    assert [t.shape for t in first_example((x, x))] == [(1, 3, 8, 8)] * 2


def test_the_default_is_a_half_cost_target_with_gamma_on_batchnorm_models():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    run = MorphNetRun()
    run.build(model, torch.randn(1, 3, 8, 8), steps=10, log_every=5)
    assert run.target_cost == 0.5 and run.reg.name == "GammaFlops"
    assert run.controller.target == pytest.approx(0.5 * run.seed_cost)
    fixed = MorphNetRun(strength=1e-3, regularizer="group-lasso", resource="size")
    fixed.build(model, torch.randn(1, 3, 8, 8), steps=10, log_every=5)
    assert fixed.controller is None and fixed.reg.name == "GroupLassoModelSize" and fixed.strength == 1e-3


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="strength"):
        MorphNetRun(strength=-1.0)
    with pytest.raises(ValueError, match="initial strength"):
        MorphNetRun(target_cost=0.5, strength=0.0)
    with pytest.raises(ValueError, match="log_every"):
        MorphNetRun(log_every=0)
    with pytest.raises(ValueError, match="max_steps"):
        MorphNetRun().build(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), torch.randn(1, 3, 8, 8),
                            steps=0, log_every=5)


def test_reads_fall_on_logging_steps_and_a_short_run_is_read_often():
    assert read_interval(50, 100_000) == 50
    assert read_interval(50, 600) == 5  # the largest divisor of 50 with at least 100 reads
    assert read_interval(50, 40) == 1
    assert read_interval(10, 1500) == 10


def test_between_reads_the_callbacks_work_reads_no_tensor_value_on_the_host(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    run = MorphNetRun(target_cost=0.5, log_every=5)
    run.build(model, torch.randn(1, 3, 8, 8), steps=20, log_every=5)
    host_reads = spy_host_reads(monkeypatch)
    per_step = []
    for step in range(1, 11):
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        host_reads.clear()
        assert run.add_term_gradient(model.parameters())
        metrics = run.after_step(step)
        per_step.append(len(host_reads))
        assert (metrics is not None) == (step % 5 == 0)
    assert [n for i, n in enumerate(per_step, 1) if i % 5] == [0] * 8
