"""Reports: the printed summary, the PNG plots and the HTML page, from a run folder's files."""

import json

from morphnet.reporting import format_cost_table, format_number, format_summary, write_report


def _fake_run(tmp_path, with_slim=True):
    seed_widths = {"conv1": 32, "conv2": 64, "conv3": 128}
    learned = {"conv1": 20, "conv2": 30, "conv3": 90}
    summary = {
        "config": {"model": "digits_cnn", "data": "digits", "steps": 100, "target": "flops"},
        "world_size": 1, "ranks_agree": True,
        "target": {"resource": "flops", "unit": "FLOPs", "regularizer": "GammaFlops", "cost_name": "FLOPs",
                   "target_cost": 3e6, "tolerance": 0.05, "initial_strength": 1e-7, "final_strength": 2e-8},
        "seed": {"cost": 6e6, "flops": 6e6, "flops_counted": 6000000, "params": 131178, "accuracy": 0.98,
                 "widths": seed_widths},
        "learned": {"step": 90, "cost": 3.05e6, "widths": learned, "cost_ratio": 0.508, "target_error": 0.0167,
                    "structure_file": "learned_structure/alive_90.json"},
        "seconds": {"learn": 10.0},
    }
    if with_slim:
        summary["slim"] = {"cost": 3e6, "flops": 3e6, "flops_counted": 3000000, "params": 60000, "accuracy": 0.97,
                           "predicted_cost": 3e6, "widths": {"conv1": 20, "conv2": 29, "conv3": 89},
                           "width_multiplier": 0.99, "dir": "slim", "target_error": 0.0}
    history = {"learn": [{"step": s, "cost": 6e6 - s * 3e4, "strength": 1e-7, "train_accuracy": 0.5 + s / 250,
                          **({"test_accuracy": 0.9} if s % 50 == 0 else {})} for s in range(10, 101, 10)],
               "retrain_slim": [{"step": s, "train_accuracy": s / 100} for s in range(10, 101, 10)]}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "history.json").write_text(json.dumps(history))
    return summary


def test_report_embeds_the_three_plots_and_the_figures(tmp_path):
    _fake_run(tmp_path)
    page = write_report(tmp_path).read_text()
    for name in ("cost", "accuracy", "widths"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.count("data:image/png;base64,") == 3
    assert "97.00%" in page and "digits_cnn" in page and "conv3" in page


def test_report_of_a_learn_only_run_has_no_slim_column_values(tmp_path):
    _fake_run(tmp_path, with_slim=False)
    page = write_report(tmp_path).read_text()
    assert "data:image/png;base64," in page


def test_report_needs_a_run_folder(tmp_path):
    try:
        write_report(tmp_path)
    except FileNotFoundError as error:
        assert "summary.json" in str(error)
    else:
        raise AssertionError("expected FileNotFoundError")


def test_printed_summary_shows_seed_and_slim_figures(tmp_path):
    text = format_summary(_fake_run(tmp_path), tmp_path)
    assert "FLOPs (FlopCounterMode)" in text and "6M" in text and "3M" in text and "0.500x" in text
    assert "98.00%" in text and "97.00%" in text
    assert "learned structure 3.05M (+1.67%) at step 90" in text


def test_numbers_and_cost_tables_are_compact():
    assert format_number(5937664) == "5.938M" and format_number(None) == "-" and format_number(12) == "12"
    table = format_cost_table([{"name": "a", "flops": 2000, "size": 10, "channels": 4},
                               {"name": "b", "flops": 1000, "size": 5, "channels": 8}])
    assert table.splitlines()[-1].split() == ["total", "3k", "15"]


def test_cost_table_shows_whether_a_batchnorm_scale_can_prune_each_layer():
    table = format_cost_table([{"name": "conv", "flops": 2000, "size": 10, "channels": 4, "gamma": "yes"},
                               {"name": "stem", "flops": 1000, "size": 5, "channels": 8, "gamma": "uncovered"},
                               {"name": "fc", "flops": 10, "size": 1, "channels": 2, "gamma": "no"}])
    lines = table.splitlines()
    assert lines[0].split()[-1] == "gamma"
    assert [line.split()[-1] for line in lines[1:4]] == ["yes", "uncovered", "no"]
    assert lines[-1].split() == ["total", "3.01k", "16"]
