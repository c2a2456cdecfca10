"""Every benchmark script runs end to end in its quick mode on CPU, so none of them rots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# script -> keys its JSON must hold
SCRIPTS = {
    "scaling.py": {"torch", "rows"},
    "zoo_costs.py": {"torch", "torchvision", "rows"},
    "overhead.py": {"environment", "settings", "rows"},
    "pareto.py": {"environment", "settings", "comparisons", "rows"},
    "latency_fidelity.py": {"environment", "settings", "summary", "rows"},
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Run a script once in quick mode (CPU); returns its JSON and its output folder."""
    cache: dict[str, tuple[dict, Path]] = {}

    def run(script: str) -> tuple[dict, Path]:
        if script not in cache:
            out = tmp_path_factory.mktemp(script.removesuffix(".py")) / "result.json"
            args = [sys.executable, str(BENCHMARKS / script), "--out", str(out)]
            if script == "zoo_costs.py":  # its quick form: two models instead of all of torchvision's
                args += ["resnet18", "mobilenet_v2"]
            else:
                args.append("--quick")
            if script not in ("scaling.py", "zoo_costs.py"):
                args += ["--device", "cpu"]
            done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=300, cwd=BENCHMARKS.parent)
            assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            cache[script] = json.loads(out.read_text()), out.parent
        return cache[script]

    return run


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_runs_in_quick_mode(quick, script):
    result, _ = quick(script)
    assert SCRIPTS[script] <= set(result)
    assert result["rows"]


def test_overhead_times_every_variant_against_the_plain_step(quick):
    result, folder = quick("overhead.py")
    variants = {row["variant"]: row for row in result["rows"]}
    assert {"plain", "gamma_flops", "group_lasso_flops", "per_layer_loop", "slimming_grad_injection"} <= set(variants)
    assert variants["plain"]["ratio"] == 1.0
    assert all(row["median_ms"] > 0 for row in result["rows"])
    assert (folder / "result.csv").exists()


def test_pareto_compares_every_learned_point_and_plots(quick):
    result, folder = quick("pareto.py")
    assert (folder / "result.png").stat().st_size > 0
    learned = {(r["arm"], r["target"]) for r in result["rows"] if r["arm"] != "uniform" and "accuracy" in r}
    assert learned == {(c["arm"], c["target"]) for c in result["comparisons"]}
    assert all(r["flops"] == r["flops_counted"] for r in result["rows"] if "accuracy" in r)


def test_latency_fidelity_correlates_both_predictions(quick):
    result, _ = quick("latency_fidelity.py")
    for batch in result["settings"]["batches"]:
        summary = result["summary"][f"batch_{batch}"]
        assert -1 <= summary["spearman_flops"] <= 1 and -1 <= summary["spearman_roofline"] <= 1
    assert any(row["rounded"] for row in result["rows"])


def test_pareto_combines_runs_over_disjoint_seeds(quick, tmp_path):
    result, _ = quick("pareto.py")
    other = json.loads(json.dumps(result))
    for row in other["rows"]:
        row["seed"] += 1
        if "accuracy" in row:
            row["accuracy"] = min(1.0, row["accuracy"] + 0.01)
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(result))
    second.write_text(json.dumps(other))
    out = tmp_path / "combined.json"
    args = [sys.executable, str(BENCHMARKS / "pareto.py"), "--combine", str(first), str(second), "--out", str(out)]
    done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=120, cwd=BENCHMARKS.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    combined = json.loads(out.read_text())
    assert combined["settings"]["seeds"] == 2
    assert all(c["seeds"] == 2 and c["verdict"] in {"win", "loss", "tie"} for c in combined["comparisons"])
    again = subprocess.run(args[:-4] + [str(first), str(first), "--out", str(out)], check=False,
                           capture_output=True, text=True, timeout=120, cwd=BENCHMARKS.parent)
    assert again.returncode != 0 and "share seeds" in again.stderr


def test_zoo_costs_match_flop_counter(quick):
    result, _ = quick("zoo_costs.py")
    assert [row["model"] for row in result["rows"]] == ["resnet18", "mobilenet_v2"]
    assert all(row["exact"] for row in result["rows"])
    assert all(row["rebuild_exact"] and row["killed_groups"] > 0 for row in result["rows"])


def test_every_benchmark_script_is_covered():
    scripts = {p.name for p in BENCHMARKS.glob("*.py")} - {"common.py"}
    assert scripts == set(SCRIPTS), "add new benchmark scripts to SCRIPTS so their quick mode runs in CI"
