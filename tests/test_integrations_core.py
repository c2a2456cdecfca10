"""The framework-free side of the integrations: import isolation and option checks (no framework needed)."""

import subprocess
import sys
import warnings
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


def test_group_lasso_has_one_default_threshold_in_the_api_the_cli_and_the_callbacks():
    """Relative 0.1: alive above a tenth of each layer's initial channel-norm scale. A layer
    initialized with std 0.01 (mobilenet_v3_small's classifier) is all alive at the start under
    it; the absolute 1e-2 the callbacks used counted about half of it dead before training."""
    from morphnet.pipeline import make_regularizer
    from morphnet.regularizers.network import GROUP_LASSO_THRESHOLD

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    nn.init.normal_(model[2].weight, std=0.01)
    nn.init.zeros_(model[2].bias)
    x = torch.randn(1, 16)
    api = morphnet.GroupLassoFlopsRegularizer(model, x)
    run = MorphNetRun(regularizer="group-lasso")
    run.build(model, x, steps=10, log_every=5)
    cli = make_regularizer("group-lasso", "flops", model, x)
    assert GROUP_LASSO_THRESHOLD == 0.1 and api.relative_threshold and api.threshold == 0.1
    for reg in (run.reg, cli):
        assert (reg.relative_threshold, reg.threshold) == (True, 0.1)
        assert torch.equal(reg.source.limits, api.source.limits)
    assert morphnet.StructureExporter(api).get_alive_counts() == {"0": 64, "2": 64}
    norms = api.source.values().detach()
    assert (norms[64:128] < 1e-2).sum() > 16  # what an absolute 1e-2 would have killed at the start
    # a number given is an absolute norm in the API and the callbacks (the contract), relative in the CLI
    absolute = MorphNetRun(regularizer="group-lasso", threshold=1e-2)
    absolute.build(model, x, steps=10, log_every=5)
    assert absolute.reg.relative_threshold is False and absolute.reg.source.limits == 1e-2
    assert make_regularizer("group-lasso", "flops", model, x, threshold=0.2).relative_threshold
    with pytest.raises(ValueError, match="relative_threshold=False needs an absolute threshold"):
        morphnet.GroupLassoFlopsRegularizer(model, x, relative_threshold=False)


def test_a_target_missed_by_the_end_of_training_is_warned_once():
    """The callbacks' controller warns at the last step when the kept structure is the seed's."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    run = MorphNetRun(target_cost=0.5)
    run.build(model, torch.randn(1, 3, 8, 8), steps=5, log_every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 6):  # no training: every channel stays alive
            run.after_step(step)
        run.chosen(5)
    missed = [w for w in caught if issubclass(w.category, morphnet.TargetMissedWarning)]
    assert len(missed) == 1 and "the structure kept is the seed's" in str(missed[0].message)
