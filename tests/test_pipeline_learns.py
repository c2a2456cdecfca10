"""The pipeline does its job, not only runs: training learns, every target steers the structure to
its cost with the strength the controller computes, and the gated (LogisticSigmoid) run goes end to end. Short runs on the embedded digits
default, one thread each, so the whole file takes well under a minute on 2 CPU cores."""

import json

import pytest
import torch

import morphnet
from morphnet.cli.main import main
from morphnet.data import load_data
from morphnet.seeds import create_seed
from nets import counted_flops, weight_count

FAST = ["--threads", "1", "--quiet"]


def digits_seed():
    return create_seed("digits_cnn", in_channels=1)


def example():
    return load_data("digits").example_inputs(1)


def summary_of(out) -> dict:
    return json.loads((out / "summary.json").read_text())


class LoggedCosts:
    """A regularizer stand-in whose costs are those a run logged: the seed's, then one per logged step."""

    def __init__(self, costs: list[float]):
        self.costs = iter(costs)

    def get_cost(self) -> torch.Tensor:
        return torch.tensor(next(self.costs), dtype=torch.float64)

    def alive_counts(self) -> dict[str, int]:
        return {}


def assert_learning_applied_the_controllers_strength(out) -> None:
    """The strength of every logged interval of a target-cost run is what ``TargetCost`` computes from
    the costs logged before it, it multiplied the term in the loss (loss - task loss = strength x
    term: the strength is constant between logged steps), and it moved. A frozen strength, or one
    computed but not applied, fails here even when the selection rule still finds a structure that lands."""
    summary = summary_of(out)
    history = json.loads((out / "history.json").read_text())["learn"]
    cfg, target = summary["config"], summary["target"]
    law = morphnet.TargetCost(LoggedCosts([summary["seed"]["cost"]] + [r["cost"] for r in history]),
                              cfg["target_cost"], steps=cfg["steps"], tolerance=cfg["tolerance"],
                              initial_strength=target["initial_strength"], log_every=cfg["log_every"])
    for record in history:
        assert record["strength"] == law.strength, record["step"]
        assert record["loss"] - record["task_loss"] == pytest.approx(record["strength"] * record["reg_loss"], rel=1e-4)
        law.update(record["step"])
    assert target["final_strength"] == law.strength
    # it moved: pushed above the initial strength while the cost lagged the reference, cut once it fell below
    strengths = [r["strength"] for r in history]
    assert max(strengths) > 1.2 * target["initial_strength"] and min(strengths) < max(strengths) / 2
    assert (summary["learned"]["step"], summary["learned"]["cost"]) == (law.best().step, law.best().cost)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """60 learning steps at a fixed strength that removes about half the FLOPs, then the slim and
    the seed networks each trained from scratch for 60 steps and scored on the 360 test images."""
    out = tmp_path_factory.mktemp("learns")
    assert main(["run", "--steps", "60", "--strength", "1e-6", "--retrain-steps", "60", "--out", str(out), *FAST]) == 0
    return out


def test_seed_and_slim_networks_learn_digits(short_run):
    summary = summary_of(short_run)
    assert summary["seed"]["accuracy"] >= 0.95
    assert summary["slim"]["accuracy"] >= 0.95
    assert summary["slim"]["flops"] <= 0.75 * summary["seed"]["flops"]  # the slim network is a different one


def test_the_slim_network_saved_is_the_one_predicted(short_run):
    """The saved slim model, loaded back and counted by FlopCounterMode, costs what the learned
    structure predicted, and its weights are those of its structure file."""
    summary = summary_of(short_run)
    slim = morphnet.load_slim(digits_seed, short_run / "slim", example())
    assert counted_flops(slim, example()) == summary["learned"]["cost"] == summary["slim"]["flops_counted"]
    counts = json.loads((short_run / summary["learned"]["structure_file"]).read_text())
    assert {name: slim.get_submodule(name).out_channels for name in counts} == counts


def test_a_broken_optimizer_would_fail_the_accuracy_check(tmp_path):
    """With a learning rate of 1e-12 (0 is refused) the same recipe stays near chance (10 classes): the 95% bound above
    is a real check."""
    assert main(["run", "--steps", "2", "--strength", "1e-6", "--retrain-steps", "20", "--retrain-lr", "1e-12",
                 "--out", str(tmp_path), *FAST]) == 0
    summary = summary_of(tmp_path)
    assert summary["seed"]["accuracy"] < 0.3 and summary["slim"]["accuracy"] < 0.3


def alive_counted(model, resource: str) -> float:
    """Independent counts of a rebuilt network: conv / linear weights, or their output channels."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    if resource == "size":
        return weight_count(model)
    return sum(m.weight.shape[0] for m in layers)


@pytest.mark.parametrize("target", [
    ["--target", "size"],
    ["--target", "latency", "--hardware", "V100"],
    # one channel costs 1 of 298: start 10x above the default 1 / seed cost so 250 steps suffice
    ["--target", "activations", "--strength", "0.03"],
])
def test_every_target_lands_within_tolerance(tmp_path, target):
    assert main(["learn", "--target-cost", "0.5", "--steps", "250", "--batch-size", "32", "--out", str(tmp_path),
                 *FAST, *target]) == 0
    summary = summary_of(tmp_path)
    half = summary["seed"]["cost"] / 2
    assert summary["target"]["target_cost"] == pytest.approx(half)
    assert abs(summary["learned"]["cost"] / half - 1) <= summary["target"]["tolerance"] == 0.05
    assert_learning_applied_the_controllers_strength(tmp_path)
    slim = morphnet.apply_structure(digits_seed(), tmp_path / summary["learned"]["structure_file"], example())
    resource = target[1]
    if resource == "latency":
        assert morphnet.compute_cost(slim, example(), "latency", hardware="V100") == pytest.approx(
            summary["learned"]["cost"], rel=1e-9)
    else:
        seed_count = alive_counted(digits_seed(), resource)
        assert summary["seed"]["cost"] == seed_count
        assert summary["learned"]["cost"] == alive_counted(slim, resource)


def test_logistic_sigmoid_run_inserts_learns_and_removes_the_gates(tmp_path):
    assert main(["run", "--regularizer", "logistic-sigmoid", "--steps", "60", "--strength", "1e-3",
                 "--retrain-steps", "10", "--no-baseline", "--out", str(tmp_path), *FAST]) == 0
    summary = summary_of(tmp_path)
    assert summary["target"]["regularizer"] == "LogisticSigmoidFlops"
    # gates were inserted after every BatchNorm and learned: their logits left the initial value
    learned = torch.load(tmp_path / "checkpoints" / "learn.pt", weights_only=False)["model"]
    fresh = morphnet.add_gates(digits_seed(), example()).state_dict()
    logits = sorted(k for k in learned if k.endswith("gate.logits"))
    assert logits == sorted(k for k in fresh if k.endswith("gate.logits")) and len(logits) == 4
    assert all(not torch.equal(learned[k], fresh[k]) for k in logits)
    # channels died, and the structure file says which
    widths, seed_widths = summary["learned"]["widths"], summary["seed"]["widths"]
    assert set(widths) == set(seed_widths) and sum(widths.values()) < sum(seed_widths.values())
    # the slim network retrained without gates: no gate in its weights, and it loads into a plain seed
    state = torch.load(tmp_path / "slim" / "state_dict.pt")
    assert not [k for k in state if "gate" in k]
    slim = morphnet.load_slim(digits_seed, tmp_path / "slim", example())
    assert not morphnet.gates.gated_modules(slim)
    assert counted_flops(slim, example()) == summary["slim"]["flops_counted"] == summary["learned"]["cost"]


def test_min_layer_fraction_keeps_every_layer_above_its_floor(tmp_path):
    """A strength that thins some layer below half its width without the floor (0), not with 0.5."""
    widths = morphnet.StructureExporter(morphnet.GammaFlopsRegularizer(digits_seed(), example(),
                                                                       gamma_threshold=0.0)).get_alive_counts()

    def learned(out, *extra):
        assert main(["learn", "--steps", "40", "--strength", "1e-5", "--out", str(out), *extra, *FAST]) == 0
        last = max((out / "learned_structure").glob("alive_*.json"), key=lambda p: int(p.stem.split("_")[1]))
        return json.loads(last.read_text())

    plain = learned(tmp_path / "plain", "--min-layer-fraction", "0")
    assert any(plain[name] < width / 2 for name, width in widths.items())
    floored = learned(tmp_path / "floor", "--min-layer-fraction", "0.5")
    assert all(floored[name] >= -(-width // 2) for name, width in widths.items())
    assert main(["learn", "--min-layer-fraction", "2", "--out", str(tmp_path / "bad"), *FAST]) == 2
