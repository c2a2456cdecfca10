"""``morphnet run`` under torchrun with 2 CPU processes (gloo): DDP learning and retraining, every
rank agrees on the structure, only rank 0 writes."""

import json
import subprocess
import sys

import pytest

from test_cli import cli_env


def test_run_under_torchrun_with_two_processes(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "morphnet", "run", "--steps", "30", "--retrain-steps", "10", "--no-baseline",
               "--device", "cpu", "--out", str(out), "--quiet"]
    try:  # about 25 s on an idle 2-core box, 2-4x that on a loaded one
        result = subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=180)
    except subprocess.TimeoutExpired as hung:
        output = hung.stdout.decode(errors="replace") if isinstance(hung.stdout, bytes) else hung.stdout or ""
        pytest.fail(f"torchrun with 2 processes ran past 180 s; its output so far:\n{output[-3000:]}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_agree"] is True
    assert (out / "learned_structure" / "alive_30.json").is_file()
    assert summary["slim"]["flops_counted"] <= summary["seed"]["flops_counted"]
    assert result.stdout.count("FLOPs (FlopCounterMode)") == 1  # only rank 0 prints the summary
