"""``morphnet run`` / ``learn`` / ``rebuild`` / ``cost`` / ``report`` end to end on the embedded
default, shortened by flags so the suite stays fast on 2 CPU cores."""

import json

import pytest
import torch

from morphnet.cli.main import main
from morphnet.pipeline import files
from test_pipeline_learns import assert_learning_applied_the_controllers_strength


@pytest.fixture(scope="module")
def fixed_strength_run(tmp_path_factory):
    """A short run with a fixed strength: no correction after rebuild, so the slim network's
    FLOPs must equal the regularizer's prediction exactly. A fifth of the training data is held out."""
    out = tmp_path_factory.mktemp("run")
    code = main(["run", "--steps", "120", "--retrain-steps", "40", "--strength", "3e-7", "--uniform-baseline",
                 "--val-fraction", "0.2", "--export-every", "50", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_run_writes_every_output(fixed_strength_run):
    out = fixed_strength_run
    for name in ("summary.json", "history.json", "config.json", "report.html",
                 "learned_structure/alive_50.json", "learned_structure/alive_100.json",
                 "learned_structure/alive_120.json", "checkpoints/learn.pt", "checkpoints/seed.pt",
                 "plots/cost.png", "plots/accuracy.png", "plots/widths.png"):
        assert (out / name).is_file(), name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"RegularizationLoss", "FLOPs", "alive/features.0.0", "learn/strength", "retrain_slim/test_accuracy"} <= tags
    assert any((out / "slim").iterdir())
    counts = json.loads((out / "learned_structure/alive_120.json").read_text())
    assert counts and all(isinstance(v, int) for v in counts.values())


def test_slim_flops_are_below_the_seed_and_equal_the_prediction(fixed_strength_run):
    """Every figure of the summary against a count made here: FlopCounterMode and the parameter
    count of a fresh seed and of the slim model loaded back from the run folder."""
    import morphnet
    from morphnet.data import load_data
    from morphnet.seeds import create_seed
    from nets import counted_flops

    summary = json.loads((fixed_strength_run / "summary.json").read_text())
    seed, slim, learned = summary["seed"], summary["slim"], summary["learned"]
    example = load_data("digits").example_inputs(1)
    fresh = create_seed("digits_cnn", in_channels=1)
    loaded = morphnet.load_slim(lambda: create_seed("digits_cnn", in_channels=1), fixed_strength_run / "slim", example)
    assert seed["flops_counted"] == seed["flops"] == seed["cost"] == counted_flops(fresh, example)
    assert seed["params"] == sum(p.numel() for p in fresh.parameters())
    assert slim["flops_counted"] == slim["flops"] == learned["cost"] == counted_flops(loaded, example)
    assert slim["params"] == sum(p.numel() for p in loaded.parameters()) < seed["params"]
    assert slim["flops_counted"] < seed["flops_counted"]
    assert slim["widths"] == learned["widths"]


def test_uniform_baseline_costs_what_the_slim_network_costs(fixed_strength_run):
    summary = json.loads((fixed_strength_run / "summary.json").read_text())
    uniform, slim = summary["uniform"], summary["slim"]
    assert abs(uniform["flops_counted"] / slim["flops_counted"] - 1) <= 0.01
    assert 0 < uniform["width_multiplier"] < 1 and 0 <= uniform["accuracy"] <= 1


def test_the_uniform_network_is_saved_and_a_better_one_is_reported(fixed_strength_run):
    """The uniform network of the same cost is kept in slim_uniform/ (it loads back with its widths
    and the summary's accuracy), and the run warns exactly when it scored above the slim network."""
    import morphnet
    from morphnet.data import load_data
    from morphnet.pipeline.training import evaluate
    from morphnet.seeds import create_seed

    summary = json.loads((fixed_strength_run / "summary.json").read_text())
    uniform, slim = summary["uniform"], summary["slim"]
    data = load_data("digits")
    loaded = morphnet.load_slim(lambda: create_seed("digits_cnn", in_channels=1),
                                fixed_strength_run / uniform["dir"], data.example_inputs(1))
    assert uniform["dir"] == files.SLIM_UNIFORM
    convs = {name: m.out_channels for name, m in loaded.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert convs and all(convs[name] == width for name, width in uniform["widths"].items() if name in convs)
    assert evaluate(loaded, data.test, "cpu") == pytest.approx(uniform["accuracy"], abs=1e-9)
    # --val-fraction 0.2: both are scored on the held-out fifth, and the warning reads that split
    split = data.with_validation(0.2, summary["config"]["seed"])
    assert len(split.val) == round(0.2 * len(data.train)) == summary["validation"]["examples"]
    assert not set(split.val.indices) & set(split.train.indices)
    assert evaluate(loaded, split.val, "cpu") == pytest.approx(uniform["val_accuracy"], abs=1e-9)
    better = max(("slim", "uniform"), key=lambda k: summary[k]["val_accuracy"])
    assert summary["validation"]["better"] in (better, "tie")
    warned = any(note.startswith("the uniform network of the same cost scored higher") for note in summary["warnings"])
    assert warned == (uniform["val_accuracy"] > slim["val_accuracy"])


def test_the_uniform_warning_names_both_accuracies_and_what_to_keep():
    from morphnet.pipeline.summary import uniform_notes

    worse = {"slim": {"accuracy": 0.81}, "uniform": {"accuracy": 0.84, "dir": "slim_uniform"}}
    (note,) = uniform_notes(worse)
    assert "84.00% against 81.00% on the test data" in note and "--val-fraction" in note
    assert "slim_uniform/" in note and "morphnet.load_slim" in note
    # with held-out validation scores those decide, whatever the test says
    held = {"slim": {"accuracy": 0.81, "val_accuracy": 0.80}, "uniform": {"accuracy": 0.84, "val_accuracy": 0.79}}
    assert uniform_notes(held) == []
    held["uniform"]["val_accuracy"] = 0.83
    (note,) = uniform_notes(held)
    assert "83.00% against 80.00% on the held-out validation data" in note
    assert uniform_notes({"slim": {"accuracy": 0.84}, "uniform": {"accuracy": 0.84}}) == []
    assert uniform_notes({"slim": {"accuracy": 0.85}, "uniform": {"accuracy": 0.84}}) == []
    assert uniform_notes({"slim": {"accuracy": 0.85}}) == [] and uniform_notes({"slim": {}, "uniform": None}) == []


def test_slim_model_loads_back_with_the_learned_widths(fixed_strength_run):
    import morphnet
    from morphnet.data import load_data
    from morphnet.seeds import create_seed

    data = load_data("digits")
    slim = morphnet.load_slim(lambda: create_seed("digits_cnn", in_channels=1), fixed_strength_run / "slim",
                              data.example_inputs(1))
    summary = json.loads((fixed_strength_run / "summary.json").read_text())
    assert slim.features[0][0].out_channels == summary["slim"]["widths"]["features.0.0"]


def test_report_command_rewrites_the_page(fixed_strength_run, capsys):
    (fixed_strength_run / "report.html").unlink()
    assert main(["report", str(fixed_strength_run)]) == 0
    assert (fixed_strength_run / "report.html").read_text().count("data:image/png;base64,") == 3


def test_learn_then_rebuild_then_cost_work_as_they_are(tmp_path, capsys):
    assert main(["learn", "--steps", "30", "--out", str(tmp_path), "--quiet"]) == 0
    assert (tmp_path / "learned_structure" / "alive_30.json").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["learned"]["step"] <= 30 and "slim" not in summary
    capsys.readouterr()
    assert main(["rebuild", "--out", str(tmp_path), "--quiet"]) == 0
    assert "learned" in capsys.readouterr().out
    assert any((tmp_path / files.SLIM).iterdir())
    assert main(["cost"]) == 0
    table = capsys.readouterr().out
    assert "features.0.0" in table and "total" in table
    assert main(["cost", "--structure", str(tmp_path / "learned_structure" / "alive_30.json"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"name", "flops", "size", "channels"} <= set(rows[0])


def test_rebuild_uses_the_structure_the_run_chose_not_the_latest_file(tmp_path, capsys):
    """Target-cost learning keeps the structure closest to the target, often not the last one
    written; ``rebuild`` without --structure must build that one (summary.json names it)."""
    assert main(["learn", "--steps", "10", "--export-every", "5", "--out", str(tmp_path), "--quiet"]) == 0
    chosen = json.loads((tmp_path / "summary.json").read_text())["learned"]["structure_file"]
    later = tmp_path / "learned_structure" / "alive_1000.json"  # e.g. written by the user's own exporter
    later.write_text(json.dumps({name: 1 for name in json.loads((tmp_path / chosen).read_text())}))
    assert main(["rebuild", "--out", str(tmp_path), "--slim-dir", "chosen"]) == 0
    assert f"with the widths of {tmp_path / chosen}" in capsys.readouterr().out
    rebuilt = json.loads((tmp_path / "chosen" / files.REBUILD_SUMMARY).read_text())
    assert rebuilt["structure_file"] == str(tmp_path / chosen)
    assert rebuilt["slim"]["widths"] == json.loads((tmp_path / chosen).read_text())
    assert main(["rebuild", "--out", str(tmp_path), "--structure", str(later), "--slim-dir", "later", "--quiet"]) == 0
    assert set(json.loads((tmp_path / "later" / files.REBUILD_SUMMARY).read_text())["slim"]["widths"].values()) == {1}
    (tmp_path / "summary.json").unlink()  # learning not finished: the latest file is all there is
    assert main(["rebuild", "--out", str(tmp_path), "--slim-dir", "latest", "--quiet"]) == 0
    assert json.loads((tmp_path / "latest" / files.REBUILD_SUMMARY).read_text())["structure_file"] == str(later)


def test_cost_text_table_shows_the_gamma_coverage_of_every_layer(capsys):
    assert main(["cost", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert main(["cost"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer"))
    assert lines[header].split()[-1] == "gamma"
    shown = {line.rsplit(maxsplit=5)[0]: line.split()[-1] for line in lines[header + 1:header + 1 + len(rows)]}
    assert shown == {row["name"]: row["gamma"] for row in rows}
    assert {"yes", "no"} <= set(shown.values())


@pytest.fixture(scope="module")
def half_target_run(tmp_path_factory):
    """The default job (FLOPs, half the seed's) with 600 learning steps and a short retraining."""
    out = tmp_path_factory.mktemp("half")
    assert main(["run", "--target-cost", "0.5", "--steps", "600", "--retrain-steps", "20", "--no-baseline",
                 "--no-latency-check", "--out", str(out), "--quiet"]) == 0
    return out


def test_target_cost_half_lands_within_5_percent_of_half_the_seed_flops(half_target_run):
    summary = json.loads((half_target_run / "summary.json").read_text())
    half = summary["seed"]["flops_counted"] / 2
    assert summary["target"]["target_cost"] == pytest.approx(half)
    assert abs(summary["learned"]["cost"] / half - 1) <= 0.05
    assert abs(summary["slim"]["flops_counted"] / half - 1) <= 0.05
    assert summary["warnings"] == []


def test_the_run_applies_the_strength_the_controller_computes(half_target_run):
    assert_learning_applied_the_controllers_strength(half_target_run)


def test_learning_that_ends_far_from_its_target_prints_warning_lines(tmp_path, capsys):
    """20 steps are far too few to thin the seed (its cost is still twice the target): the printed
    summary says so on `warning:` lines, the first with which way to go, the second that only the
    uniform width multiplier reached the target; summary.json holds the same notes."""
    # --no-latency-check: the end-of-run timing may add its own warning on a loaded machine (tested apart)
    assert main(["run", "--target-cost", "0.5", "--steps", "20", "--retrain-steps", "5", "--no-baseline",
                 "--no-latency-check", "--out", str(tmp_path), "--quiet"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["learned"]["target_error"] == pytest.approx(1.0)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert lines == [f"warning: {note}" for note in summary["warnings"]] and len(lines) == 2
    assert lines[0].startswith("warning: structure learning ended 100% above the target after 20 steps (tolerance 5%)")
    assert "more --steps" in lines[0]
    assert "only through the uniform width multiplier" in lines[1]
    assert f"x{summary['slim']['width_multiplier']:.3f}" in lines[1]


@pytest.mark.parametrize("target", [["--target", "size"], ["--target", "latency", "--hardware", "V100"],
                                    ["--target", "activations"], ["--regularizer", "group-lasso", "--strength", "1e-6"]])
def test_learn_with_every_target_and_regularizer(tmp_path, target):
    assert main(["learn", "--steps", "20", "--out", str(tmp_path), "--quiet", *target]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seed"]["cost"] > 0 and summary["learned"]["cost"] <= summary["seed"]["cost"]


def test_latency_target_without_hardware_says_what_to_add(tmp_path, capsys):
    assert main(["learn", "--steps", "5", "--target", "latency", "--out", str(tmp_path), "--quiet"]) == 2
    assert "--hardware" in capsys.readouterr().err


def test_report_shows_timings_layers_and_python_lines_that_load_the_slim_model(fixed_strength_run):
    import html
    import re

    import torch

    page = (fixed_strength_run / "report.html").read_text()
    assert "Time per stage" in page and "retrain slim" in page and "share of FLOPs" in page
    summary = json.loads((fixed_strength_run / "summary.json").read_text())
    assert [r["slim"] for r in summary["layers"] if r["name"] in summary["slim"]["widths"]] == \
        list(summary["slim"]["widths"].values())
    assert abs(sum(r["share"] for r in summary["layers"]) - 1) < 1e-6
    code = html.unescape(re.search(r"<h2>Loading the slim model</h2><pre>(.*?)</pre>", page, re.S).group(1))
    scope: dict = {}
    exec(code, scope)
    saved = torch.load(fixed_strength_run / "slim" / "state_dict.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in scope["slim"].state_dict().items())


def test_seed_weights_and_finetune_compress_the_trained_seed(fixed_strength_run, tmp_path, capsys):
    """``--seed-weights PATH --finetune`` runs ``morphnet.compress`` on the trained seed: on budget by
    PyTorch's own counter, the kept channels' weights (so a few steps of fine-tuning suffice), the seed
    measured as given, and with ``--uniform-baseline`` the uniform width multiplier of the same cost
    fine-tuned the same way."""
    import torch

    import morphnet
    from morphnet.data import load_data
    from morphnet.pipeline.training import evaluate
    from morphnet.seeds import create_seed

    weights = fixed_strength_run / "checkpoints" / "seed.pt"  # the trained seed of the first run
    out = tmp_path / "ft"
    code = main(["run", "--retrain-steps", "30", "--target-cost", "0.5", "--seed-weights", str(weights),
                 "--finetune", "--out", str(out), "--quiet"])  # the uniform network: on by default here
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "fine-tuned 30 steps distilling the seed" in summary["slim"]["training"]
    assert summary["seed"]["training"].startswith("as given")
    assert "retrain_seed" not in summary["seconds"]  # the given seed is measured, not retrained
    data = load_data("digits", seed=0)
    seed = create_seed("digits_cnn", num_classes=10, in_channels=1)
    seed.load_state_dict(torch.load(weights)["model"])
    assert summary["seed"]["accuracy"] == evaluate(seed, data.test, torch.device("cpu"))
    assert summary["seed"]["accuracy"] > 0.5  # a trained seed, not a fresh one
    slim = morphnet.load_slim(lambda: create_seed("digits_cnn", in_channels=1), out / "slim", data.example_inputs(1))
    assert {n: m.out_channels for n, m in slim.named_modules() if isinstance(m, torch.nn.Conv2d)
            and n in summary["slim"]["widths"]} == summary["slim"]["widths"]
    seed_flops = summary["seed"]["flops_counted"]
    assert summary["slim"]["flops_counted"] == summary["slim"]["predicted_cost"]
    assert 0.98 * 0.5 * seed_flops <= summary["slim"]["flops_counted"] <= 0.5 * seed_flops
    assert summary["slim"]["function_check"] < 1e-5
    assert summary["slim"]["accuracy"] > 0.9  # kept weights: a fresh network of this size needs far more steps
    assert abs(summary["uniform"]["flops_counted"] / (0.5 * seed_flops) - 1) < 0.05
    assert 0 < summary["uniform"]["accuracy"] <= 1
    assert json.loads((out / "learned_structure" / "alive_0.json").read_text()) == summary["slim"]["widths"]


@pytest.mark.parametrize("args, message", [
    (["--seed-weights", "/no/such/weights.pt"], "no such file"),
    (["--finetune", "--seed-weights", __file__, "--regularizer", "logistic-sigmoid"], "--regularizer gamma or"),
    (["--finetune", "--expand-to", "0.5"], "cannot be scaled"),
    (["--finetune"], "pass its weights with --seed-weights"),
])
def test_seed_weights_and_finetune_options_are_checked_first(tmp_path, capsys, args, message):
    assert main(["run", "--steps", "5", "--out", str(tmp_path / "x"), "--quiet", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_finetune_compares_with_the_uniform_network_unless_told_not_to(tmp_path):
    """With --finetune the uniform width multiplier at the same cost is compressed and fine-tuned too
    (issue 20: the summary compares with it, not only with the seed); from scratch it stays opt-in."""
    from morphnet.cli.main import build_parser, _config

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")  # only its existence is checked here

    def config(*extra):
        return _config(build_parser().parse_args(["run", "--target-cost", "0.5", *extra]))

    assert config("--seed-weights", str(weights), "--finetune").uniform_baseline is True
    assert config("--seed-weights", str(weights), "--finetune", "--no-uniform-baseline").uniform_baseline is False
    assert config().uniform_baseline is False
    assert config("--uniform-baseline").uniform_baseline is True


def test_val_fraction_is_checked_before_anything_runs(tmp_path, capsys):
    """--val-fraction needs the uniform network to compare with, a share below a half, and data that
    leaves both parts non-empty; each mistake is one line naming the option, and no run folder."""
    from morphnet.data import load_data
    from morphnet.data.bundle import DataError
    from morphnet.pipeline import RunConfig

    with pytest.raises(ValueError, match="--val-fraction .* add --uniform-baseline"):
        RunConfig(val_fraction=0.1)
    with pytest.raises(ValueError, match=r"--val-fraction must be in \[0, 0.5\), got 0.6"):
        RunConfig(val_fraction=0.6, uniform_baseline=True)
    assert main(["run", "--val-fraction", "0.1", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "--uniform-baseline" in capsys.readouterr().err and not (tmp_path / "run").exists()
    with pytest.raises(DataError, match="digits: --val-fraction 1e-06 of .* leaves 0 for validation"):
        load_data("digits").with_validation(1e-6)
