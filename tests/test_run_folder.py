"""A run folder is never replaced silently, options are checked before anything is written,
`rebuild` never clobbers a run's slim model, a crash never leaves half a file, and an interrupted run
(once or twice Ctrl-C, in any stage) resumes to the same result."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from morphnet.cli.main import main
from morphnet.pipeline import files
from morphnet.pipeline.distributed import DistContext
from morphnet.pipeline.resume import Checkpointer, Interrupted

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
    from morphnet.pipeline import stages

    evaluate = stages.evaluate

    def evaluate_then_interrupt(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(stages, "evaluate", evaluate_then_interrupt)
    assert main(["run", "--resume", "--out", str(out), "--quiet"]) == 130
    assert torch.load(out / "checkpoints" / "retrain_slim.pt", weights_only=False)["step"] == 10
    monkeypatch.setattr(stages, "evaluate", evaluate)

    assert main(["run", "--resume", "--out", str(out), "--quiet"]) == 0
    summary, history, weights = _results(out)
    expected_summary, expected_history, expected_weights = _results(reference)
    assert summary == expected_summary and history == expected_history
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[k], expected_weights[k]) for k in weights)
    assert json.loads((out / files.STATE).read_text())["stages"].keys() == {"learn", "retrain_slim"}


# ---- crash safety: atomic files, Ctrl-C once and twice, every stage resumed -------------------------------


def test_every_file_a_run_writes_is_renamed_into_place(tmp_path, monkeypatch):
    """Written whole beside its final name, then renamed (atomic): a crash leaves the old file or the
    new one, never half of one. TensorBoard's event files are the writer's own (appended)."""
    renamed, replace = set(), os.replace

    def spy(src, dst):
        renamed.add(Path(dst).resolve())
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    assert main(["learn", "--steps", "5", "--out", str(tmp_path), "--quiet"]) == 0
    written = {p.resolve() for p in tmp_path.rglob("*")
               if p.is_file() and files.TENSORBOARD not in p.relative_to(tmp_path).parts}
    assert {files.CONFIG, files.SUMMARY, files.HISTORY, files.REPORT} <= {p.name for p in written}
    assert written <= renamed, sorted(str(p) for p in written - renamed)


CRASH_WHILE_SAVING = """
import os, sys, torch
from morphnet.pipeline import files

class DiesWhileSaved:
    def __reduce__(self):
        os._exit(3)  # the process dies in the middle of writing: no cleanup, no rename

files.save_checkpoint(sys.argv[1], {"step": 2, "model": torch.zeros(4096), "crash": DiesWhileSaved()})
"""


def test_a_process_that_dies_while_saving_a_checkpoint_leaves_the_previous_one(tmp_path):
    path = files.save_checkpoint(tmp_path / "learn.pt", {"step": 1, "model": torch.ones(4096)})
    done = subprocess.run([sys.executable, "-c", CRASH_WHILE_SAVING, str(path)], env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    state = files.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["model"], torch.ones(4096))
    assert all(name.endswith(".tmp") for name in os.listdir(tmp_path) if name != path.name)  # never mistaken for it


def test_the_first_ctrl_c_in_a_loop_lets_the_step_finish_and_the_second_stops_at_once():
    previous = signal.getsignal(signal.SIGINT)
    checkpointer = Checkpointer(DistContext(), every_seconds=3600)
    checkpointer.install()
    try:
        with pytest.raises(KeyboardInterrupt):  # outside a training loop: Python's own behaviour
            signal.raise_signal(signal.SIGINT)
        with checkpointer.loop():
            assert checkpointer.poll() == (False, False)
            signal.raise_signal(signal.SIGINT)  # noted; the step goes on
            assert checkpointer.poll() == (True, True)  # its end saves and stops
            with pytest.raises(KeyboardInterrupt) as stopped:
                signal.raise_signal(signal.SIGINT)
            assert not isinstance(stopped.value, Interrupted)  # at once, without saving
    finally:
        checkpointer.uninstall()
    assert signal.getsignal(signal.SIGINT) is previous


POLL = Checkpointer.poll


def ctrl_c_at_step_end(monkeypatch, number: int, times: int = 1) -> list[int]:
    """Press Ctrl-C ``times`` at the end of the ``number``-th training step of this process, counted
    over the stages (every loop asks its Checkpointer once per step); returns the step count so far."""
    steps = [0]

    def poll(self, *args, **kwargs):
        steps[0] += 1
        if steps[0] == number:
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)
        return POLL(self, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "poll", poll)
    return steps


def _learned(out):
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("seconds")
    summary["config"].pop("out")
    return summary, json.loads((out / "history.json").read_text())


def test_a_second_ctrl_c_stops_at_once_and_the_run_resumes_from_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """40 steps save at the step-20 export; Ctrl-C twice at step 27 stops there without saving (exit
    130), and --resume redoes steps 21-40 to the uninterrupted result."""
    learn = ["learn", "--steps", "40", "--threads", "1", "--quiet"]
    reference, out = tmp_path / "reference", tmp_path / "stopped"
    assert main([*learn, "--out", str(reference)]) == 0
    capsys.readouterr()
    ctrl_c_at_step_end(monkeypatch, 27, times=2)
    assert main([*learn, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "(from the last checkpoint)" in err and "stopped after" not in err
    assert files.load_checkpoint(out / "checkpoints" / "learn.pt")["step"] == 20
    assert not (out / "summary.json").exists()
    steps = ctrl_c_at_step_end(monkeypatch, 0)
    assert main(["learn", "--resume", "--out", str(out), "--quiet"]) == 0
    assert steps[0] == 20
    assert _learned(out) == _learned(reference)


def test_a_run_interrupted_in_the_seed_and_the_uniform_retraining_resumes_each_where_it_stopped(tmp_path, monkeypatch):
    """40 learning steps, then 30 steps each for the slim network, the seed and the uniform baseline.
    Ctrl-C at step 10 of the seed's retraining, resume, Ctrl-C at step 10 of the uniform one, resume:
    each resumed stage runs only its remaining 20 steps, finished stages are not redone, and the
    result is the uninterrupted run's (summary, every history, the slim and the seed weights)."""
    run = ["run", "--steps", "40", "--retrain-steps", "30", "--uniform-baseline", "--threads", "1", "--quiet",
           "--no-latency-check"]  # timings differ between runs
    reference, out = tmp_path / "reference", tmp_path / "interrupted"
    assert main([*run, "--out", str(reference)]) == 0

    ctrl_c_at_step_end(monkeypatch, 40 + 30 + 10)
    assert main([*run, "--out", str(out)]) == 130
    assert files.load_checkpoint(out / "checkpoints" / "retrain_seed.pt")["step"] == 10
    assert json.loads((out / files.STATE).read_text())["stages"].keys() == {"learn", "retrain_slim"}

    steps = ctrl_c_at_step_end(monkeypatch, 20 + 10)
    assert main(["run", "--resume", "--out", str(out), "--quiet"]) == 130
    assert steps[0] == 30  # the seed's steps 11-30, then the uniform network's first 10
    assert files.load_checkpoint(out / "checkpoints" / "retrain_uniform.pt")["step"] == 10
    assert not (out / "checkpoints" / "retrain_seed.pt").exists()  # a finished stage drops its checkpoint

    steps = ctrl_c_at_step_end(monkeypatch, 0)
    assert main(["run", "--resume", "--out", str(out), "--quiet"]) == 0
    assert steps[0] == 20
    summary, history, weights = _results(out)
    expected_summary, expected_history, expected_weights = _results(reference)
    assert summary == expected_summary and history == expected_history
    assert summary["uniform"]["accuracy"] is not None and history.keys() == {
        "learn", "retrain_slim", "retrain_seed", "retrain_uniform"}
    assert all(torch.equal(weights[k], expected_weights[k]) for k in expected_weights)
    seed, expected_seed = (files.load_checkpoint(d / "checkpoints" / "seed.pt")["model"] for d in (out, reference))
    assert seed.keys() == expected_seed.keys() and all(torch.equal(seed[k], expected_seed[k]) for k in seed)
