"""A run folder is never replaced silently, options are checked before anything is written,
`rebuild` never clobbers a run's slim model, and an interrupted run resumes to the same result."""

import json
import signal
import subprocess
import sys

import torch

from morphnet.cli.main import main
from morphnet.pipeline import files

from test_cli import cli_env

# no end-of-run latency check: its timings (and the warning they may raise) differ from run to run
SHORT = ["--steps", "40", "--retrain-steps", "30", "--no-baseline", "--threads", "1", "--no-latency-check"]


def test_a_second_job_in_a_run_folder_is_refused_naming_the_folder_and_the_choices(tmp_path, capsys):
    assert main(["learn", "--steps", "5", "--out", str(tmp_path), "--quiet"]) == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["run", "--steps", "7", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "--resume" in err and "--overwrite" in err and "another --out" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_overwrite_removes_everything_the_old_run_wrote_and_keeps_other_files(tmp_path):
    assert main(["learn", "--steps", "20", "--out", str(tmp_path), "--quiet"]) == 0
    (tmp_path / "checkpoints" / "seed.pt").write_bytes(b"stale")
    (tmp_path / "slim_2").mkdir()
    (tmp_path / "slim_2" / "structure.json").write_text("{}")
    (tmp_path / "slim_mine").mkdir()  # not written by morphnet: kept
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["learn", "--steps", "5", "--out", str(tmp_path), "--quiet", "--overwrite"]) == 0
    assert not (tmp_path / "checkpoints" / "seed.pt").exists() and not (tmp_path / "slim_2").exists()
    assert sorted(p.name for p in (tmp_path / "learned_structure").iterdir()) == ["alive_5.json"]
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 5
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "slim_mine").is_dir()


def test_bad_options_fail_before_anything_is_written(tmp_path, capsys):
    for argv, word in ((["--target", "latency"], "--hardware"), (["--target-cost", "0"], "--target-cost"),
                       (["--hardware", "NoSuchGPU"], "NoSuchGPU"), (["--tolerance", "2"], "--tolerance")):
        out = tmp_path / word.strip("-")
        assert main(["learn", "--steps", "5", "--out", str(out), "--quiet", *argv]) == 2
        assert word in capsys.readouterr().err
        assert not out.exists()


def test_resume_of_a_folder_without_a_run_or_with_other_settings_is_refused(tmp_path, capsys):
    assert main(["run", "--resume", "--out", str(tmp_path / "none"), "--quiet"]) == 2
    assert "no run to resume" in capsys.readouterr().err
    assert main(["learn", "--steps", "5", "--out", str(tmp_path), "--quiet"]) == 0
    assert main(["learn", "--resume", "--steps", "9", "--out", str(tmp_path), "--quiet"]) == 2
    assert "--steps 9 (the run has 5)" in capsys.readouterr().err
    summary = (tmp_path / "summary.json").read_text()
    assert main(["learn", "--resume", "--out", str(tmp_path), "--quiet"]) == 0  # finished: nothing to redo
    assert json.loads((tmp_path / "summary.json").read_text())["learned"] == json.loads(summary)["learned"]


def test_rebuild_into_a_run_writes_a_new_named_slim_folder_and_never_the_runs_own(tmp_path, capsys):
    assert main(["run", "--steps", "10", "--retrain-steps", "5", "--no-baseline", "--strength", "3e-7",
                 "--out", str(tmp_path), "--quiet"]) == 0
    slim_weights = (tmp_path / "slim" / "state_dict.pt").read_bytes()
    assert main(["rebuild", "--out", str(tmp_path), "--expand-to", "0.3", "--quiet"]) == 0
    assert (tmp_path / "slim" / "state_dict.pt").read_bytes() == slim_weights
    described = json.loads((tmp_path / "slim_2" / "rebuild.json").read_text())
    assert described["slim"]["dir"] == "slim_2" and described["slim"]["width_multiplier"] is not None
    assert "slim_2" in capsys.readouterr().out
    assert main(["rebuild", "--out", str(tmp_path), "--slim-dir", "slim", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["rebuild", "--out", str(tmp_path), "--slim-dir", "slim", "--overwrite", "--quiet"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["slim"]["replaced_by"] == "slim/rebuild.json"
    assert "replaced" in (tmp_path / "report.html").read_text()


def _results(out):
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("seconds")
    summary["config"].pop("out")
    weights = torch.load(out / "slim" / "state_dict.pt", weights_only=True)
    return summary, json.loads((out / "history.json").read_text()), weights


def test_a_run_interrupted_in_learning_and_in_retraining_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    reference, out = tmp_path / "reference", tmp_path / "interrupted"
    assert main(["run", *SHORT, "--out", str(reference), "--quiet"]) == 0

    # Ctrl-C from outside while learning: the step ends, the checkpoint is written, exit 130
    child = subprocess.Popen([sys.executable, "-m", "morphnet", "run", *SHORT, "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        for line in child.stdout:
            if line.startswith("learn:"):
                child.send_signal(signal.SIGINT)
                break
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert "--resume --out" in err and (out / "checkpoints" / "learn.pt").is_file()
    assert not (out / "summary.json").exists()

    # resumed; Ctrl-C again at the first evaluation of retraining (step 10 of 30)
    from morphnet.pipeline import run as run_module

    evaluate = run_module.evaluate

    def evaluate_then_interrupt(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate", evaluate_then_interrupt)
    assert main(["run", "--resume", "--out", str(out), "--quiet"]) == 130
    assert torch.load(out / "checkpoints" / "retrain_slim.pt", weights_only=False)["step"] == 10
    monkeypatch.setattr(run_module, "evaluate", evaluate)

    assert main(["run", "--resume", "--out", str(out), "--quiet"]) == 0
    summary, history, weights = _results(out)
    expected_summary, expected_history, expected_weights = _results(reference)
    assert summary == expected_summary and history == expected_history
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[k], expected_weights[k]) for k in weights)
    assert json.loads((out / files.STATE).read_text())["stages"].keys() == {"learn", "retrain_slim"}
