"""The ``morphnet`` command: argument errors, and every subcommand end to end on the default."""

import os
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


def test_unknown_model_exits_2_and_lists_the_choices(capsys, tmp_path):
    assert main(["learn", "--model", "no_such_net", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("morphnet: error: unknown model 'no_such_net'") and "digits_cnn" in err


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
