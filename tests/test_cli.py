"""The ``morphnet`` command: argument errors, and every subcommand end to end on the default."""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import morphnet
from morphnet.cli.main import build_parser, main

PACKAGE_ROOT = str(Path(morphnet.__file__).resolve().parents[1])


def cli_env() -> dict:
    """The environment of a child process that imports this very copy of morphnet."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT, env.get("PYTHONPATH", "")])
    return env


def test_non_numeric_strength_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--strength", "strong"])
    assert exit_info.value.code == 2
    assert "invalid float value: 'strong'" in capsys.readouterr().err


def test_an_argument_error_is_one_line_naming_the_option_and_the_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--steps", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err
    assert err.startswith("morphnet run: error: argument --steps: must be a positive integer, got 0")
    assert "`morphnet run --help`" in err


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"morphnet {morphnet.__version__}\n"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", ["run", "learn", "rebuild", "cost", "report"])
def test_every_subcommand_help_has_a_description(command, capsys):
    description = _subcommands()[command].description
    assert description and len(description.split()) >= 8
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert " ".join(description.split()[:4]) in " ".join(capsys.readouterr().out.split())


def test_rebuild_help_offers_no_learning_options(capsys):
    with pytest.raises(SystemExit):
        main(["rebuild", "--help"])
    text = capsys.readouterr().out
    for pattern in (r"--steps\b", "--seed-weights", "--finetune", "--strength", "--target-cost", "torchrun",
                    r"learning(?! rate)"):  # the learning rate of --retrain is no structure learning
        assert not re.search(pattern, text), pattern
    with pytest.raises(SystemExit):
        main(["rebuild", "--steps", "10"])
    assert "unrecognized arguments: --steps 10" in capsys.readouterr().err


def test_unknown_model_exits_2_and_lists_the_choices(capsys, tmp_path):
    assert main(["learn", "--model", "no_such_net", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("morphnet: error: unknown model 'no_such_net'") and "digits_cnn" in err


def test_an_impossible_target_is_refused_before_the_run_folder_is_made(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--target-cost", "2", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("morphnet: error: --target-cost 2 is an absolute cost, 2 FLOPs (values <= 1 are fractions")
    assert "below the smallest cost this network allows" in err and "--min-layer-fraction=0.25" in err
    assert not out.exists()
    # group lasso on a BatchNorm network regularizes nothing (the shifts): no target below the seed is reachable
    assert main(["learn", "--regularizer", "group-lasso", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("morphnet: warning: GroupLassoFlopsRegularizer: ") and "Nothing is left to regularize" in err
    assert "morphnet: error: --target-cost 0.5 cannot be reached: the regularizer can prune no channel" in err
    assert not out.exists()


def test_cost_and_rebuild_check_a_structure_file_against_the_model(capsys, tmp_path):
    """999 channels for a 32-channel layer was accepted; 0 channels printed a raw Python warning."""
    wide, empty = tmp_path / "wide.json", tmp_path / "empty.json"
    wide.write_text(json.dumps({"features.0.0": 999}))
    empty.write_text(json.dumps({"features.0.0": 0}))
    for argv in (["cost", "--structure", str(wide)], ["rebuild", "--structure", str(wide), "--out", str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"morphnet: error: structure file {wide}: 'features.0.0' has 999 channels, but the "
                              "layer has 32 in the seed"), err
    assert not (tmp_path / "slim").exists()
    assert main(["cost", "--structure", str(empty), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ("morphnet: warning: apply_structure: every channel of 'features.0.0' is pruned, but a Conv2d "
                   "cannot have zero width in PyTorch; keeping 1 channel(s), so it costs a little more than the "
                   "structure predicts\n")
    assert next(row for row in json.loads(out) if row["name"] == "features.0.0")["channels"] == 1


def test_missing_data_folder_exits_2(capsys, tmp_path):
    assert main(["run", "--data", str(tmp_path / "absent"), "--out", str(tmp_path), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_rebuild_without_a_learned_structure_says_to_learn_first(capsys, tmp_path):
    assert main(["rebuild", "--out", str(tmp_path)]) == 2
    assert "morphnet learn --out" in capsys.readouterr().err


def test_report_of_a_folder_without_a_run_exits_2(capsys, tmp_path):
    assert main(["report", str(tmp_path)]) == 2
    assert "summary.json" in capsys.readouterr().err


def test_every_subcommand_parses_with_no_model_or_data():
    parser = build_parser()
    for argv in (["run"], ["learn"], ["rebuild"], ["cost"], ["report", "x"]):
        args = parser.parse_args(argv)
        assert args.command == argv[0]


def test_python_dash_m_morphnet_is_the_cli():
    result = subprocess.run([sys.executable, "-m", "morphnet", "--help"], capture_output=True, text=True,
                            env=cli_env(), timeout=60)  # about 3 s
    assert result.returncode == 0
    for command in ("run", "learn", "rebuild", "cost", "report"):
        assert command in result.stdout


def test_rebuild_prints_the_attention_heads_per_block_like_run(capsys, tmp_path):
    """``morphnet rebuild`` of a tiny ViT structure prints the table ``morphnet run`` prints: heads seed ->
    slim per block (with the head width and the MLP widths), also kept in the slim folder's rebuild.json."""
    blocks = [f"encoder.layers.encoder_layer_{i}" for i in range(4)]
    structure = {}  # every layer a learned structure file of vit_tiny names
    for block, heads, mlp in zip(blocks, (4, 1, 2, 4), (256, 256, 256, 97)):
        structure |= {f"{block}.self_attention": 3 * 16 * heads, f"{block}.mlp.0": mlp}
    path = tmp_path / "alive.json"
    path.write_text(json.dumps(structure))
    assert main(["rebuild", "--model", "vit_tiny", "--data", "synthetic:32", "--image-size", "16",
                 "--structure", str(path), "--out", str(tmp_path), "--threads", "1", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("attention heads per block (seed -> slim):")
    assert lines[start + 1:start + 5] == [
        f"  {blocks[0]}  heads 4 -> 4, head width 16, mlp.0 256 -> 256",
        f"  {blocks[1]}  heads 4 -> 1, head width 16, mlp.0 256 -> 256",
        f"  {blocks[2]}  heads 4 -> 2, head width 16, mlp.0 256 -> 256",
        f"  {blocks[3]}  heads 4 -> 4, head width 16, mlp.0 256 -> 97",
    ]
    summary = json.loads((tmp_path / "slim" / "rebuild.json").read_text())
    assert [(e["block"], e["seed"], e["slim"]) for e in summary["attention"]] == [
        (blocks[0], 4, 4), (blocks[1], 4, 1), (blocks[2], 4, 2), (blocks[3], 4, 4)]
